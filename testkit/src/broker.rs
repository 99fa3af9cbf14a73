//! A real Apache Kafka for tests: KRaft-mode Java processes on free loopback ports.
//!
//! One node is a combined broker + controller ([`Broker::start`]); three nodes form a cluster
//! whose controllers are a static three-voter quorum, with topics at replication factor 3 and
//! `min.insync.replicas=2` ([`Broker::start_cluster`]). Each node runs
//!
//! ```text
//! java -cp '$KAFKA_LIBS/*' kafka.tools.StorageTool format -t CLUSTER_ID -c node.properties   # once
//! java -cp '$KAFKA_LIBS/*' kafka.Kafka node.properties
//! ```
//!
//! where `node.properties` is `deploy/kafka/broker.properties` (the settings compose uses too)
//! plus the node's id, listeners, quorum and log dir in the broker's temp dir, and the
//! replication keys raised for three nodes. The jars come from Maven Central through
//! `testkit/kafka/pom.xml` ([`crate::bins::kafka_libs`]).
//!
//! Readiness means a real request succeeds: an rdkafka metadata fetch listing every node as a
//! broker (60 s deadline; the error carries the tail of the node's log). [`Broker::kill`] is a
//! SIGKILL; [`Broker::restart`] starts the same nodes on the same ports and log dirs, so the data
//! survives (Kafka recovers its logs after an unclean stop).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    ClientConfig,
};
use tempfile::TempDir;

use crate::{
    bins::{java_bin, kafka_libs},
    ports::free_port,
    process::{log_tail, random_u64, unique_name, ServerProcess},
};

/// How long [`Broker::start`] and [`Broker::restart`] wait for every node to answer metadata.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Broker::create_topic`] waits for the new topic to show up in metadata.
const TOPIC_TIMEOUT: Duration = Duration::from_secs(30);
/// Env var: when set, server temp dirs (logs, data) are kept after drop.
pub const KEEP_ENV: &str = "METERLINE_TESTKIT_KEEP";
/// The broker settings shared with `deploy/compose.yaml`, compiled in so a test binary finds
/// them wherever it runs.
pub const SHARED_SETTINGS: &str = include_str!("../../deploy/kafka/broker.properties");

/// One KRaft node: its ports, files and (while running) its process.
#[derive(Debug)]
struct Node {
    id: u32,
    port: u16,
    controller_port: u16,
    properties: PathBuf,
    log: PathBuf,
    proc: Option<ServerProcess>,
}

/// A running Kafka (one node or a three-node cluster) on `127.0.0.1`. Dropping it SIGKILLs every
/// node.
#[derive(Debug)]
pub struct Broker {
    nodes: Vec<Node>,
    java: PathBuf,
    libs: PathBuf,
    /// Holds each node's properties, log dir and `kafka-N.log`.
    dir: TempDir,
}

impl Broker {
    /// Starts a single combined broker + controller and waits until it answers metadata.
    pub async fn start() -> Result<Broker> {
        Self::start_nodes(1).await
    }

    /// Starts a three-node cluster (each node broker + controller; replication factor 3 and
    /// `min.insync.replicas=2` for the topics it creates and its internal topics).
    pub async fn start_cluster() -> Result<Broker> {
        Self::start_nodes(3).await
    }

    async fn start_nodes(n: u32) -> Result<Broker> {
        let java = java_bin()?;
        let libs = kafka_libs()?;
        let dir =
            tempfile::Builder::new().prefix("meterline-kafka-").tempdir().context("creating the broker's temp dir")?;
        let mut nodes: Vec<Node> = (1..=n)
            .map(|id| Node {
                id,
                port: free_port(),
                controller_port: free_port(),
                properties: dir.path().join(format!("node-{id}.properties")),
                log: dir.path().join(format!("kafka-{id}.log")),
                proc: None,
            })
            .collect();
        let voters: Vec<String> =
            nodes.iter().map(|nd| format!("{}@127.0.0.1:{}", nd.id, nd.controller_port)).collect();
        let cluster_id = cluster_id();
        for node in &nodes {
            let props = node_properties(node, &voters.join(","), n, &dir.path().join(format!("data-{}", node.id)));
            std::fs::write(&node.properties, props)
                .with_context(|| format!("writing {}", node.properties.display()))?;
        }
        let mut broker = Broker { nodes: Vec::new(), java, libs, dir };
        for node in &nodes {
            broker.format(node, &cluster_id)?;
        }
        for node in &mut nodes {
            node.proc = Some(broker.spawn(node)?);
        }
        broker.nodes = nodes;
        broker.wait_ready().await?;
        Ok(broker)
    }

    /// `127.0.0.1:PORT[,…]` of every node, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        let all: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        all.join(",")
    }

    /// A `ClientConfig` with `bootstrap.servers` set to this broker; add the rest per test.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", self.bootstrap());
        cfg
    }

    /// Number of nodes (1 or 3).
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The replication factor topics get here: 1 on one node, 3 on a cluster.
    pub fn replication(&self) -> i32 {
        if self.nodes.len() >= 3 {
            3
        } else {
            1
        }
    }

    /// The first node's pid, or `None` while it is killed.
    pub fn pid(&self) -> Option<u32> {
        self.node_pid(0)
    }

    /// Node `i`'s pid (0-based), or `None` while it is killed.
    pub fn node_pid(&self, i: usize) -> Option<u32> {
        self.nodes.get(i).and_then(|n| n.proc.as_ref()).map(ServerProcess::pid)
    }

    /// The first node's log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.nodes[0].log.clone()
    }

    /// SIGKILLs every node now (for fault tests). Idempotent. Clients see connection errors
    /// until [`Broker::restart`].
    pub fn kill(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }

    /// SIGKILLs node `i` (0-based). Idempotent.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut p) = self.nodes.get_mut(i).and_then(|n| n.proc.take()) {
            p.kill();
        }
    }

    /// Kills every node that runs, then starts all of them again on the same ports and data and
    /// waits until the cluster answers metadata with every node.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        for i in 0..self.nodes.len() {
            let proc = self.spawn(&self.nodes[i])?;
            self.nodes[i].proc = Some(proc);
        }
        self.wait_ready().await.with_context(|| format!("restarting the broker on {}", self.bootstrap()))
    }

    /// Starts node `i` again (after [`Broker::kill_node`]) on its ports and data, and waits until
    /// metadata lists every node.
    pub async fn restart_node(&mut self, i: usize) -> Result<()> {
        self.kill_node(i);
        let proc = self.spawn(&self.nodes[i])?;
        self.nodes[i].proc = Some(proc);
        self.wait_ready().await.with_context(|| format!("restarting node {} of {}", i + 1, self.bootstrap()))
    }

    /// A topic name unique to this call: `{test}-{16 hex digits}` (characters outside
    /// `[A-Za-z0-9._-]` in `test` become `_`).
    pub fn topic(&self, test: &str) -> String {
        unique_name(test, '-', true)
    }

    /// A consumer group id unique to this call: `{test}-{16 hex digits}`.
    pub fn group(&self, test: &str) -> String {
        unique_name(test, '-', true)
    }

    /// A transactional id unique to this call: `{test}-{16 hex digits}`.
    pub fn transactional_id(&self, test: &str) -> String {
        unique_name(test, '-', true)
    }

    /// Creates `name` with `partitions` partitions at [`Broker::replication`] through rdkafka's
    /// `AdminClient`, then waits until metadata shows every partition with a leader.
    /// An existing topic is an error (names from [`Broker::topic`] never collide).
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> =
            self.client_config().create().context("creating an rdkafka AdminClient")?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(self.replication()));
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(20)))
            .request_timeout(Some(Duration::from_secs(20)));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .with_context(|| format!("creating topic {name} on {}", self.bootstrap()))?;
        for result in results {
            if let Err((topic, code)) = result {
                bail!("creating topic {topic} on {}: {code:?}", self.bootstrap());
            }
        }
        let deadline = Instant::now() + TOPIC_TIMEOUT;
        loop {
            let bootstrap = self.bootstrap();
            let t = name.to_string();
            let ready = run_blocking(move || {
                let admin: AdminClient<DefaultClientContext> =
                    ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
                let md = admin.inner().fetch_metadata(Some(&t), Duration::from_secs(2))?;
                Ok(md.topics().iter().any(|mt| {
                    mt.name() == t
                        && mt.error().is_none()
                        && mt.partitions().len() == usize::try_from(partitions).unwrap_or(0)
                        && mt.partitions().iter().all(|p| p.leader() >= 0)
                }))
            })
            .await;
            match ready {
                Ok(true) => return Ok(()),
                Ok(false) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(false) => bail!(
                    "topic {name} was created but metadata did not show {partitions} partitions with leaders within {TOPIC_TIMEOUT:?}"
                ),
                Err(e) => return Err(e.context(format!("waiting for topic {name} to appear in metadata"))),
            }
        }
    }

    /// Formats a node's log dir for `cluster_id` (Kafka's own storage tool).
    fn format(&self, node: &Node, cluster_id: &str) -> Result<()> {
        let out = self
            .java_command()
            .arg("kafka.tools.StorageTool")
            .arg("format")
            .arg("--ignore-formatted")
            .arg("-t")
            .arg(cluster_id)
            .arg("-c")
            .arg(&node.properties)
            .output()
            .context("running kafka.tools.StorageTool")?;
        if !out.status.success() {
            bail!(
                "formatting kafka node {} failed ({}): {}{}",
                node.id,
                out.status,
                String::from_utf8_lossy(&out.stderr).lines().rev().take(20).collect::<Vec<_>>().join("\n"),
                String::from_utf8_lossy(&out.stdout).lines().rev().take(5).collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    fn spawn(&self, node: &Node) -> Result<ServerProcess> {
        let mut cmd = self.java_command();
        cmd.arg("-Xms128m").arg("-Xmx512m").arg("kafka.Kafka").arg(&node.properties);
        ServerProcess::spawn("kafka", cmd, &node.log)
    }

    /// `java` with Kafka's class path and a console-only log4j2 config, like `kafka-run-class.sh`.
    fn java_command(&self) -> Command {
        let mut cmd = Command::new(&self.java);
        let log4j = self.dir.path().join("log4j2.properties");
        if !log4j.exists() {
            // Errors surface as a missing-config warning in the node's log, nothing worse.
            std::fs::write(&log4j, LOG4J2).ok();
        }
        cmd.arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .arg("-Djava.awt.headless=true")
            .env_remove("KAFKA_OPTS")
            .env_remove("KAFKA_HEAP_OPTS")
            .env_remove("JAVA_TOOL_OPTIONS");
        cmd
    }

    /// Polls until a metadata request lists every node as a broker; fails early if one exits.
    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let deadline = started + READY_TIMEOUT;
        let want = self.nodes.len();
        let mut last_error = String::from("no attempt yet");
        loop {
            for node in &mut self.nodes {
                if let Some(status) = node.proc.as_mut().and_then(ServerProcess::exited) {
                    let tail = log_tail(std::slice::from_ref(&node.log), 40);
                    bail!("kafka node {} on 127.0.0.1:{} exited during startup ({status}){tail}", node.id, node.port);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "kafka on {} not ready after {READY_TIMEOUT:?} (last error: {last_error}){}",
                    self.bootstrap(),
                    self.tail()
                );
            }
            let bootstrap = self.bootstrap();
            let md = run_blocking(move || {
                let admin: AdminClient<DefaultClientContext> =
                    ClientConfig::new().set("bootstrap.servers", bootstrap).set("log_level", "0").create()?;
                let md = admin.inner().fetch_metadata(None, Duration::from_secs(2))?;
                Ok(md.brokers().len())
            })
            .await;
            match md {
                Ok(n) if n >= want => {
                    tracing::debug!(nodes = want, elapsed = ?started.elapsed(), "testkit: kafka ready");
                    return Ok(());
                }
                Ok(n) => last_error = format!("metadata listed {n} of {want} brokers"),
                Err(e) => last_error = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn tail(&self) -> String {
        let logs: Vec<PathBuf> = self.nodes.iter().map(|n| n.log.clone()).collect();
        log_tail(&logs, 30)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os(KEEP_ENV).is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("testkit: kept broker dir {}", self.dir.path().display());
        }
    }
}

/// Console-only logging at INFO (Kafka's own default is INFO to files under `kafka.logs.dir`).
const LOG4J2: &str = "\
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
logger.state.name = state.change.logger
logger.state.level = WARN
";

/// The node's `server.properties`: the shared settings, then what is particular to this node.
/// Later keys win in Java's `Properties`, so the replication overrides for a cluster come last.
fn node_properties(node: &Node, voters: &str, nodes: u32, data: &Path) -> String {
    let mut p = String::from(SHARED_SETTINGS);
    write!(
        p,
        "\n# --- testkit: node {id} of {nodes} ---\n\
         process.roles=broker,controller\n\
         node.id={id}\n\
         controller.quorum.voters={voters}\n\
         listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
         advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\n\
         listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
         log.dirs={data}\n",
        id = node.id,
        port = node.port,
        cport = node.controller_port,
        data = data.display(),
    )
    .expect("writing to a String cannot fail");
    if nodes >= 3 {
        p.push_str(
            "offsets.topic.replication.factor=3\n\
             transaction.state.log.replication.factor=3\n\
             transaction.state.log.min.isr=2\n\
             default.replication.factor=3\n\
             min.insync.replicas=2\n",
        );
    }
    p
}

/// A KRaft cluster id: 16 random bytes in URL-safe base64 without padding (22 characters), the
/// form `kafka-storage.sh random-uuid` prints.
fn cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bits = (u128::from(random_u64()) << 64) | u128::from(random_u64());
    // 22 characters × 6 bits = 132 bits; the top 4 are zero, as in a base64 of 16 bytes.
    (0..22).rev().map(|i| ALPHABET[((bits >> (i * 6)) & 63) as usize] as char).collect()
}

/// Runs blocking rdkafka calls off the async runtime.
async fn run_blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.context("blocking rdkafka task panicked or was cancelled")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_look_like_kafkas() {
        let a = cluster_id();
        assert_eq!(a.len(), 22);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{a}");
        assert_ne!(a, cluster_id());
    }

    #[test]
    fn a_cluster_node_raises_replication_after_the_shared_settings() {
        let node =
            Node { id: 2, port: 1, controller_port: 2, properties: PathBuf::new(), log: PathBuf::new(), proc: None };
        let p = node_properties(&node, "1@x:1,2@x:2,3@x:3", 3, Path::new("/d"));
        let shared = p.find("offsets.topic.replication.factor=1").unwrap();
        let raised = p.find("offsets.topic.replication.factor=3").unwrap();
        assert!(raised > shared, "the cluster override must come after the shared value");
        assert!(p.contains("min.insync.replicas=2"));
        assert!(p.contains("node.id=2\n"));
        let single = node_properties(&node, "2@x:2", 1, Path::new("/d"));
        assert!(!single.contains("min.insync.replicas="));
    }
}
