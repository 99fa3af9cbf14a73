//! A real ClickHouse server for tests: a `clickhouse-server` process on free loopback ports with
//! its data, config and logs in a temp dir.
//!
//! The dev machine has Debian's 18.16.1 package (`/usr/sbin/clickhouse-server`). 18.16 reads XML
//! config only (no YAML), so [`ClickHouse::start`] writes `config.xml` and `users.xml`:
//! `listen_host` 127.0.0.1 only, free `http_port`, `tcp_port` and `interserver_http_port`,
//! `path`/`tmp_path`/`user_files_path`/`format_schema_path` under the temp dir, logs to
//! `log/clickhouse-server{,.err}.log` at level `information`, small caches, timezone UTC, and a
//! `default` user without password allowed from 127.0.0.1 and ::1. Command line:
//!
//! ```text
//! clickhouse-server --config-file=DIR/config.xml            # Debian 18.16 / clickhouse-server
//! clickhouse server --config-file=DIR/config.xml            # upstream multi-call binary
//! ```
//!
//! Readiness is an HTTP `SELECT 1` that returns `1` (60 s deadline; the error carries the tail of
//! the server's log files). [`ClickHouse::client`] turns validation off because 18.16 lacks the
//! `RowBinaryWithNamesAndTypes` format; rows travel as plain `RowBinary`, and `Decimal(38, S)`
//! travels as an `i128` mantissa at scale `S`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::{
    bins::{clickhouse_bin, clickhouse_is_multicall},
    broker::KEEP_ENV,
    ports::{free_port, port_is_free},
    process::{log_tail, unique_name, ServerProcess},
};

/// How long [`ClickHouse::start`] and [`ClickHouse::restart`] wait for `SELECT 1`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The three ports a ClickHouse server listens on (all on 127.0.0.1).
#[derive(Debug, Clone, Copy)]
struct Ports {
    http: u16,
    tcp: u16,
    interserver: u16,
}

/// A running ClickHouse server on `127.0.0.1`. Dropping it SIGKILLs the process and removes its
/// data (unless `METERLINE_TESTKIT_KEEP` is set).
#[derive(Debug)]
pub struct ClickHouse {
    /// The server, `None` between [`ClickHouse::kill`] and [`ClickHouse::restart`].
    proc: Option<ServerProcess>,
    bin: PathBuf,
    ports: Ports,
    /// `config.xml`, `users.xml`, `data/`, `log/`.
    dir: TempDir,
}

impl ClickHouse {
    /// Starts a server with a fresh data dir on free loopback ports and waits until `SELECT 1`
    /// answers. If a port turns out to be taken when the server binds it, retries with new
    /// ports (up to 3 attempts).
    pub async fn start() -> Result<ClickHouse> {
        let bin = clickhouse_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("meterline-clickhouse-")
            .tempdir()
            .context("creating the ClickHouse temp dir")?;
        for sub in ["data", "data/tmp", "data/user_files", "data/format_schemas", "log"] {
            let p = dir.path().join(sub);
            std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        let mut ch = ClickHouse { proc: None, bin, ports: Ports { http: 0, tcp: 0, interserver: 0 }, dir };
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            ch.ports = Ports { http: free_port(), tcp: free_port(), interserver: free_port() };
            ch.write_config()?;
            match ch.launch().await {
                Ok(()) => return Ok(ch),
                Err(e) if attempt < ATTEMPTS && ch.lost_port_race() => {
                    tracing::warn!(ports = ?ch.ports, error = %e, "testkit: ClickHouse port taken, retrying");
                    ch.kill();
                }
                Err(e) => return Err(e),
            }
        }
        bail!("unreachable: ClickHouse start loop ended without a result")
    }

    /// `http://127.0.0.1:HTTP_PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.http)
    }

    /// The native-protocol port (for `clickhouse-client --port`).
    pub fn tcp_port(&self) -> u16 {
        self.ports.tcp
    }

    /// The server's pid, or `None` while it is killed.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(ServerProcess::pid)
    }

    /// The directory holding `config.xml`, `users.xml`, `data/` and `log/`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client for this server with validation off (18.16 lacks
    /// `RowBinaryWithNamesAndTypes`) and no database set.
    pub fn client(&self) -> clickhouse::Client {
        clickhouse::Client::default().with_url(self.url()).with_validation(false)
    }

    /// Creates a database named `{test}_{16 hex digits}` (characters outside `[A-Za-z0-9_]`
    /// become `_`) and returns its name and a [`ClickHouse::client`] bound to it.
    pub async fn database(&self, test: &str) -> Result<(String, clickhouse::Client)> {
        let name = unique_name(test, '_', false);
        self.query_text(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        Ok((name.clone(), self.client().with_database(name)))
    }

    /// SIGKILLs the server now (for fault tests). Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Kills the server if it runs, then starts it again with the same ports and data dir and
    /// waits until `SELECT 1` answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch().await.with_context(|| format!("restarting ClickHouse on {}", self.url()))
    }

    /// Runs `sql` over HTTP (`default_format=TabSeparated`) and returns the response body as
    /// text, e.g. `"1\n"` for `SELECT 1`. Works for DDL and `INSERT ... VALUES` too (empty body).
    /// `?` in `sql` is sent verbatim (no client-side binding).
    pub async fn query_text(&self, sql: &str) -> Result<String> {
        let bytes = self
            .client()
            .query_raw(sql)
            .fetch_bytes("TabSeparated")
            .with_context(|| format!("sending to ClickHouse at {}: {sql}", self.url()))?
            .collect()
            .await
            .with_context(|| format!("ClickHouse at {} running: {sql}", self.url()))?;
        String::from_utf8(bytes.to_vec()).with_context(|| format!("ClickHouse answer to {sql} is not UTF-8"))
    }

    /// Spawns the server with the config in `self.dir` and waits until it is ready.
    async fn launch(&mut self) -> Result<()> {
        let config = self.dir.path().join("config.xml");
        let mut cmd = Command::new(&self.bin);
        if clickhouse_is_multicall(&self.bin) {
            cmd.arg("server");
        }
        cmd.arg(format!("--config-file={}", config.display())).current_dir(self.dir.path());
        let log = self.dir.path().join("log").join("stdout.log");
        self.proc = Some(ServerProcess::spawn("clickhouse", cmd, &log)?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let deadline = started + READY_TIMEOUT;
        let mut last_error = String::from("no attempt yet");
        loop {
            if let Some(status) = self.proc.as_mut().and_then(ServerProcess::exited) {
                bail!(
                    "clickhouse-server ({}) exited during startup ({status}); config {}{}",
                    self.bin.display(),
                    self.dir.path().join("config.xml").display(),
                    self.tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "ClickHouse at {} not ready after {READY_TIMEOUT:?} (last error: {last_error}){}",
                    self.url(),
                    self.tail()
                );
            }
            match tokio::time::timeout(Duration::from_secs(2), self.query_text("SELECT 1")).await {
                Ok(Ok(body)) if body.trim() == "1" => {
                    tracing::debug!(url = %self.url(), elapsed = ?started.elapsed(), "testkit: ClickHouse ready");
                    return Ok(());
                }
                Ok(Ok(body)) => last_error = format!("SELECT 1 returned {body:?}"),
                Ok(Err(e)) => last_error = format!("{e:#}"),
                Err(_) => last_error = "SELECT 1 timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// After a failed start: did the server die because someone else took one of our ports?
    fn lost_port_race(&mut self) -> bool {
        let exited = self.proc.as_mut().and_then(ServerProcess::exited).is_some();
        let Ports { http, tcp, interserver } = self.ports;
        exited && [http, tcp, interserver].iter().any(|&p| !port_is_free(p))
    }

    fn tail(&self) -> String {
        let log = self.dir.path().join("log");
        log_tail(
            &[log.join("stdout.log"), log.join("clickhouse-server.err.log"), log.join("clickhouse-server.log")],
            30,
        )
    }

    /// Writes `config.xml` and `users.xml` for the current ports.
    fn write_config(&self) -> Result<()> {
        let dir = self.dir.path();
        let config = config_xml(dir, self.ports)?;
        std::fs::write(dir.join("config.xml"), config).context("writing ClickHouse config.xml")?;
        std::fs::write(dir.join("users.xml"), USERS_XML).context("writing ClickHouse users.xml")?;
        Ok(())
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os(KEEP_ENV).is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("testkit: kept ClickHouse dir {}", self.dir.path().display());
        }
    }
}

/// Escapes text for an XML element body.
fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `config.xml` for a server rooted at `dir` (see the module docs for what it sets).
fn config_xml(dir: &Path, ports: Ports) -> Result<String> {
    let root = dir.to_str().with_context(|| format!("ClickHouse temp dir {} is not UTF-8", dir.display()))?;
    let root = xml_escape(root);
    let mut x = String::new();
    // `write!` into a String cannot fail; the result is still propagated to keep clippy quiet.
    write!(
        x,
        r#"<?xml version="1.0"?>
<!-- Written by meterline testkit for one test server. -->
<yandex>
    <logger>
        <level>information</level>
        <log>{root}/log/clickhouse-server.log</log>
        <errorlog>{root}/log/clickhouse-server.err.log</errorlog>
        <size>50M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <interserver_http_port>{interserver}</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <max_connections>256</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <mark_cache_size>67108864</mark_cache_size>
    <path>{root}/data/</path>
    <tmp_path>{root}/data/tmp/</tmp_path>
    <user_files_path>{root}/data/user_files/</user_files_path>
    <format_schema_path>{root}/data/format_schemas/</format_schema_path>
    <users_config>{root}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
</yandex>
"#,
        http = ports.http,
        tcp = ports.tcp,
        interserver = ports.interserver,
    )
    .context("formatting ClickHouse config.xml")?;
    Ok(x)
}

/// `users.xml`: one `default` user, no password, loopback only; no query limits beyond memory.
const USERS_XML: &str = r#"<?xml version="1.0"?>
<!-- Written by meterline testkit for one test server. -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_binds_loopback_and_keeps_paths_in_the_dir() {
        let ports = Ports { http: 1, tcp: 2, interserver: 3 };
        let x = config_xml(Path::new("/tmp/a&b"), ports).unwrap();
        assert!(x.contains("<listen_host>127.0.0.1</listen_host>"));
        assert!(x.contains("<http_port>1</http_port>"));
        assert!(x.contains("<path>/tmp/a&amp;b/data/</path>"));
        assert!(!x.contains("/var/lib"));
    }
}
