//! A real Prometheus server (Debian's `prometheus` package, 2.42) on a free loopback port,
//! scraping the targets a test names every second and evaluating the given rule files, with its
//! TSDB in a temporary directory. Killed (SIGKILL) when dropped, like the other servers.
//!
//! Tests query it over its HTTP API at [`Prometheus::url`] (`/api/v1/query`, `/api/v1/rules`).

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    bins,
    ports::free_port,
    process::{log_tail, ServerProcess},
};

/// Env var that overrides the Prometheus binary.
pub const PROMETHEUS_BIN_ENV: &str = "METERLINE_PROMETHEUS_BIN";

/// A running Prometheus.
#[derive(Debug)]
pub struct Prometheus {
    proc: ServerProcess,
    port: u16,
    dir: tempfile::TempDir,
}

/// One scrape job: a name and its `host:port` targets.
#[derive(Debug, Clone)]
pub struct Job {
    /// `job` label.
    pub name: String,
    /// `host:port` of each target (loopback).
    pub targets: Vec<String>,
}

impl Prometheus {
    /// Starts Prometheus scraping `jobs` every second and evaluating `rule_files` every second;
    /// returns once `/-/ready` answers 200.
    pub async fn start(jobs: &[Job], rule_files: &[PathBuf]) -> Result<Prometheus> {
        let bin = bins::prometheus_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("meterline-prometheus-")
            .tempdir()
            .context("creating the Prometheus dir")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_text(jobs, rule_files)).context("writing prometheus.yml")?;
        let port = free_port();
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let log = dir.path().join("prometheus.log");
        let proc = ServerProcess::spawn("prometheus", cmd, &log)?;
        let mut p = Prometheus { proc, port, dir };
        p.wait_ready().await?;
        Ok(p)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its log file (for assertion messages).
    pub fn log_tail(&self) -> String {
        log_tail(&[self.dir.path().join("prometheus.log")], 30)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.proc.exited() {
                bail!("prometheus exited during start-up ({status}):{}", self.log_tail());
            }
            if ready(self.port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready on 127.0.0.1:{} within 60 s:{}", self.port, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Whether `GET /-/ready` answers 200 (a plain HTTP/1.0 request: testkit needs no HTTP client).
fn ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    if s.write_all(b"GET /-/ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).contains(" 200 ")
}

/// The generated configuration: 1 s scrape and evaluation intervals, loopback targets only.
fn config_text(jobs: &[Job], rule_files: &[PathBuf]) -> String {
    let mut s = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n");
    if !rule_files.is_empty() {
        s.push_str("rule_files:\n");
        for f in rule_files {
            s.push_str(&format!("  - {:?}\n", f.display().to_string()));
        }
    }
    s.push_str("scrape_configs:\n");
    for j in jobs {
        s.push_str(&format!("  - job_name: {:?}\n    static_configs:\n      - targets: [", j.name));
        let t: Vec<String> = j.targets.iter().map(|t| format!("{t:?}")).collect();
        s.push_str(&t.join(", "));
        s.push_str("]\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_scrapes_the_named_loopback_targets_every_second() {
        let c = config_text(
            &[Job { name: "meterline".into(), targets: vec!["127.0.0.1:8080".into()] }],
            &[PathBuf::from("/x/alerts.yml")],
        );
        assert!(c.contains("scrape_interval: 1s"), "{c}");
        assert!(c.contains("- \"/x/alerts.yml\""), "{c}");
        assert!(c.contains("job_name: \"meterline\""), "{c}");
        assert!(c.contains("targets: [\"127.0.0.1:8080\"]"), "{c}");
    }
}
