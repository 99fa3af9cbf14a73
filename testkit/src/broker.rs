//! A real Kafka-protocol broker for tests: a Tansu 0.6.0 process on a free loopback port.
//!
//! Command line (one listener; Tansu 0.6.0 opens no other port unless `--otlp-endpoint-url` is
//! given, which we never pass, and the OTEL/schema-registry env vars it reads are removed):
//!
//! ```text
//! tansu broker --listener-url tcp://127.0.0.1:PORT --advertised-listener-url tcp://127.0.0.1:PORT \
//!              --storage-engine memory://tansu/          # BrokerStorage::Memory
//!              --storage-engine sqlite:///FILE_NAME      # BrokerStorage::File, cwd = the file's dir
//! ```
//!
//! Tansu 0.6.0 resolves a `sqlite://` URL relative to its *working directory* (it pushes the
//! URL's host and path, leading `/` stripped, onto `current_dir()`), so a file-backed broker is
//! started with its cwd set to the database file's directory and the URL names only the file.
//! The cluster id defaults to `tansu_cluster` and the node id is fixed at build time; neither is
//! needed for a single broker.
//!
//! Readiness means a real request succeeds: a TCP connect, then an rdkafka metadata fetch that
//! lists at least one broker (30 s deadline; the error carries the tail of the broker's log).
//!
//! Known Tansu gaps, measured on the dev machine: with `memory://` storage a fetch from an
//! offset inside a record batch returns nothing of that batch (see [`BrokerStorage::Memory`];
//! `sqlite://` is correct), so resuming consumers need [`BrokerStorage::File`]; a consumer-group
//! join can take up to about half of `session.timeout.ms` (use 6000 in tests); aborted
//! transactions are visible to `read_committed` consumers; `kcat` cannot talk to it (rdkafka's
//! vendored librdkafka can).

use std::{
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
    bins::tansu_bin,
    ports::{free_port, port_is_free},
    process::{log_tail, unique_name, ServerProcess},
};

/// How long [`Broker::start`] and [`Broker::restart`] wait for the broker to answer metadata.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Broker::create_topic`] waits for the new topic to show up in metadata.
const TOPIC_TIMEOUT: Duration = Duration::from_secs(15);
/// Env var: when set, it becomes the broker's `RUST_LOG` (otherwise `RUST_LOG` is not passed on).
pub const TANSU_LOG_ENV: &str = "METERLINE_TANSU_LOG";
/// Env var: when set, server temp dirs (logs, ClickHouse data) are kept after drop.
pub const KEEP_ENV: &str = "METERLINE_TESTKIT_KEEP";

/// Where the broker keeps its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerStorage {
    /// `memory://tansu/`: fast (~130 k msgs/s produce here); everything is lost on kill/restart.
    ///
    /// **Caveat (Tansu 0.6.0 bug):** this engine answers a fetch at offset X only with record
    /// batches whose *base* offset is >= X. A consumer that resumes (committed offset, seek,
    /// restart, rebalance) at an offset *inside* a multi-record batch gets nothing of that batch:
    /// it stalls if the batch is the partition's last, and silently skips the batch's tail if
    /// more batches follow. Use [`BrokerStorage::File`] for any test that resumes consumers; the
    /// SQLite engine fetches record by record and is correct. Pinned by the self-test
    /// `memory_broker_cannot_resume_inside_a_batch_known_tansu_gap`.
    Memory,
    /// A SQLite (libsql) file at this path: slower (~14 k msgs/s) but keeps messages, offsets and
    /// topics across [`Broker::kill`] + [`Broker::restart`]. The parent directory is created if
    /// missing; the file name must be plain (`[A-Za-z0-9._-]+`).
    File(PathBuf),
}

/// A running Tansu broker process on `127.0.0.1`. Dropping it SIGKILLs the process.
#[derive(Debug)]
pub struct Broker {
    /// The server, `None` between [`Broker::kill`] and [`Broker::restart`].
    proc: Option<ServerProcess>,
    bin: PathBuf,
    port: u16,
    storage: BrokerStorage,
    /// `--storage-engine` value and the working directory it is resolved against.
    storage_url: String,
    cwd: PathBuf,
    /// Holds `tansu.log` (stdout+stderr, appended across restarts); cwd for `Memory`.
    dir: TempDir,
}

impl Broker {
    /// Starts a broker on a free loopback port and waits until it answers a metadata request.
    ///
    /// If the port turns out to be taken by the time Tansu binds it, retries with a new port
    /// (up to 3 attempts).
    pub async fn start(storage: BrokerStorage) -> Result<Broker> {
        let bin = tansu_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("meterline-tansu-")
            .tempdir()
            .context("creating the broker's temp dir")?;
        let (storage_url, cwd) = match &storage {
            BrokerStorage::Memory => ("memory://tansu/".to_string(), dir.path().to_path_buf()),
            BrokerStorage::File(path) => sqlite_url(path)?,
        };
        let mut broker = Broker {
            proc: None,
            bin,
            port: 0,
            storage,
            storage_url,
            cwd,
            dir,
        };
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            broker.port = free_port();
            match broker.launch().await {
                Ok(()) => return Ok(broker),
                Err(e) if attempt < ATTEMPTS && broker.lost_port_race() => {
                    tracing::warn!(port = broker.port, error = %e, "testkit: broker port taken, retrying");
                    broker.kill();
                }
                Err(e) => return Err(e),
            }
        }
        bail!("unreachable: broker start loop ended without a result")
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A `ClientConfig` with `bootstrap.servers` set to this broker; add the rest per test.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", self.bootstrap());
        cfg
    }

    /// The storage this broker was started with.
    pub fn storage(&self) -> &BrokerStorage {
        &self.storage
    }

    /// The broker's pid, or `None` while it is killed.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(ServerProcess::pid)
    }

    /// The broker's log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    /// SIGKILLs the broker now (for fault tests). Idempotent. Clients see connection errors
    /// until [`Broker::restart`].
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Kills the broker if it runs, then starts it again on the same port with the same storage
    /// and waits until it is ready. A `File` broker keeps its data; a `Memory` broker comes back
    /// empty.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
            .await
            .with_context(|| format!("restarting the broker on port {}", self.port))
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

    /// Creates `name` with `partitions` partitions and replication factor 1 through rdkafka's
    /// `AdminClient`, then waits until metadata shows every partition with a leader.
    /// An existing topic is an error (names from [`Broker::topic`] never collide).
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .context("creating an rdkafka AdminClient")?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
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
        let topic_name = name.to_string();
        loop {
            let bootstrap = self.bootstrap();
            let t = topic_name.clone();
            let ready = run_blocking(move || {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", bootstrap)
                    .create()?;
                let md = admin
                    .inner()
                    .fetch_metadata(Some(&t), Duration::from_secs(2))?;
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
                Err(e) => {
                    return Err(e.context(format!(
                        "waiting for topic {name} to appear in metadata"
                    )))
                }
            }
        }
    }

    /// Spawns Tansu on `self.port` and waits until it is ready.
    async fn launch(&mut self) -> Result<()> {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("broker")
            .arg("--listener-url")
            .arg(&listener)
            .arg("--advertised-listener-url")
            .arg(&listener)
            .arg("--storage-engine")
            .arg(&self.storage_url)
            .current_dir(&self.cwd)
            // Tansu reads these from the env; keep a developer's shell from changing the broker.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("CLUSTER_ID")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE");
        match std::env::var_os(TANSU_LOG_ENV) {
            Some(level) => cmd.env("RUST_LOG", level),
            None => cmd.env_remove("RUST_LOG"),
        };
        let log = self.log_path();
        self.proc = Some(ServerProcess::spawn("tansu", cmd, &log)?);
        self.wait_ready().await
    }

    /// Polls until a metadata request succeeds; fails early if the process exits.
    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let deadline = started + READY_TIMEOUT;
        let mut last_error = String::from("no attempt yet");
        loop {
            if let Some(status) = self.proc.as_mut().and_then(ServerProcess::exited) {
                bail!(
                    "tansu broker on {} exited during startup ({status}); command used storage {} in {}{}",
                    self.bootstrap(),
                    self.storage_url,
                    self.cwd.display(),
                    self.tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "tansu broker on {} not ready after {READY_TIMEOUT:?} (last error: {last_error}){}",
                    self.bootstrap(),
                    self.tail()
                );
            }
            // A plain connect first keeps librdkafka from logging refused connections in a loop.
            let connect = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(("127.0.0.1", self.port)),
            )
            .await;
            match connect {
                Ok(Ok(_)) => {
                    let bootstrap = self.bootstrap();
                    let md = run_blocking(move || {
                        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                            .set("bootstrap.servers", bootstrap)
                            .create()?;
                        let md = admin.inner().fetch_metadata(None, Duration::from_secs(2))?;
                        Ok(md.brokers().len())
                    })
                    .await;
                    match md {
                        Ok(n) if n > 0 => {
                            tracing::debug!(port = self.port, elapsed = ?started.elapsed(), "testkit: broker ready");
                            return Ok(());
                        }
                        Ok(_) => last_error = "metadata listed no brokers".into(),
                        Err(e) => last_error = format!("{e:#}"),
                    }
                }
                Ok(Err(e)) => last_error = format!("connect: {e}"),
                Err(_) => last_error = "connect timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// After a failed start: did Tansu die because someone else took our port?
    fn lost_port_race(&mut self) -> bool {
        let exited = self.proc.as_mut().and_then(ServerProcess::exited).is_some();
        exited && !port_is_free(self.port)
    }

    fn tail(&self) -> String {
        log_tail(&[self.log_path()], 40)
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

/// `(--storage-engine URL, working dir)` for a SQLite file: see the module docs for why the
/// URL names only the file and the cwd is its directory.
fn sqlite_url(path: &Path) -> Result<(String, PathBuf)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("broker storage file {} has no file name", path.display()))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        bail!(
            "broker storage file name {name:?} must match [A-Za-z0-9._-]+ (it goes into a sqlite:// URL)"
        );
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("creating broker storage dir {}", parent.display()))?;
    let parent = parent
        .canonicalize()
        .with_context(|| format!("resolving broker storage dir {}", parent.display()))?;
    Ok((format!("sqlite:///{name}"), parent))
}

/// Runs blocking rdkafka calls off the async runtime.
async fn run_blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .context("blocking rdkafka task panicked or was cancelled")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_url_names_the_file_and_uses_its_dir_as_cwd() {
        let dir = tempfile::tempdir().unwrap();
        let (url, cwd) = sqlite_url(&dir.path().join("sub").join("tansu.db")).unwrap();
        assert_eq!(url, "sqlite:///tansu.db");
        assert_eq!(cwd, dir.path().join("sub").canonicalize().unwrap());
        assert!(sqlite_url(&dir.path().join("bad name.db")).is_err());
    }
}
