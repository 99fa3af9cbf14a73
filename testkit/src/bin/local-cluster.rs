//! `local-cluster`: the distributed mode on one machine, on loopback, for trying it out.
//!
//! Starts Apache Kafka (one KRaft node) and a ClickHouse server (through `testkit`), writes a
//! `meterline.toml` for them, starts the `ingest`, `rater` and `aggregator` binaries, prints
//! where to post usage and where to look, and stops everything on Ctrl-C. Run it through
//! `scripts/cluster.sh`, which installs the servers and builds the binaries first.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use testkit::{Broker, ClickHouse};

struct Args {
    price_book: PathBuf,
    dir: PathBuf,
    listen_port: u16,
    partitions: u32,
    session_timeout_ms: u32,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        price_book: "docs/examples/price-book.toml".into(),
        dir: "meterline-cluster".into(),
        listen_port: 8080,
        partitions: 4,
        session_timeout_ms: 6000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--price-book" => a.price_book = value.into(),
            "--dir" => a.dir = value.into(),
            "--port" => a.listen_port = value.parse().context("--port")?,
            "--partitions" => a.partitions = value.parse().context("--partitions")?,
            "--session-timeout-ms" => a.session_timeout_ms = value.parse().context("--session-timeout-ms")?,
            other => anyhow::bail!("unknown flag {other} (use --price-book FILE, --dir DIR, --port N, --partitions N, --session-timeout-ms N)"),
        }
    }
    Ok(a)
}

fn spawn(bin_dir: &Path, name: &str, config: &Path, dir: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let bin = bin_dir.join(name);
    Command::new(&bin)
        .arg("--config")
        .arg(config)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| {
            format!("starting {} (build it with cargo build --release --workspace --all-features)", bin.display())
        })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    std::fs::create_dir_all(&a.dir)?;
    let dir = std::fs::canonicalize(&a.dir)?;
    let price_book =
        std::fs::canonicalize(&a.price_book).with_context(|| format!("price book {}", a.price_book.display()))?;
    let bin_dir = std::env::current_exe()?.parent().context("binary directory")?.to_owned();

    let broker = Broker::start().await?;
    let clickhouse = ClickHouse::start().await?;
    let config = dir.join("meterline.toml");
    // /metrics, /health and /ready of the rater and the aggregator (ingest serves them on its port).
    let (rater_metrics, aggregator_metrics) = (testkit::free_port(), testkit::free_port());
    std::fs::write(
        &config,
        format!(
            "price_book = \"{}\"\n\n[kafka]\nbootstrap = \"{}\"\npartitions = {}\nsession_timeout_ms = {}\n\n[clickhouse]\nurl = \"{}\"\ndatabase = \"meterline\"\n\n[ingest]\nlisten = \"127.0.0.1:{}\"\n\n[rater]\nmetrics_listen = \"127.0.0.1:{rater_metrics}\"\n\n[aggregator]\nmetrics_listen = \"127.0.0.1:{aggregator_metrics}\"\n",
            price_book.display(),
            broker.bootstrap(),
            a.partitions,
            a.session_timeout_ms,
            clickhouse.url(),
            a.listen_port
        ),
    )?;
    let mut children = Vec::new();
    for name in ["aggregator", "rater", "ingest"] {
        children.push((name, spawn(&bin_dir, name, &config, &dir)?));
    }
    println!(
        "Meterline local cluster (loopback only)\n\
         \x20 ingest      POST http://127.0.0.1:{port}/v1/BatchMeterUsage   (header X-Api-Key; keys of {pb})\n\
         \x20 broker      {bootstrap}   (Apache Kafka, KRaft, one node; data in a temp dir)\n\
         \x20 clickhouse  {ch}   (database meterline)\n\
         \x20 config      {cfg}\n\
         \x20 logs        {dir}/ingest.log, rater.log, aggregator.log\n\
         \x20 metrics     http://127.0.0.1:{port}/metrics  http://127.0.0.1:{rater_metrics}/metrics  http://127.0.0.1:{aggregator_metrics}/metrics\n\n\
         Look at the monthly charges:\n\
         \x20 clickhouse-client --port {tcp} --query \"SELECT month, customer, product, dimension, currency, customer_billed_amount FROM meterline.monthly_charges FINAL ORDER BY month, customer\"\n\
         Ctrl-C stops everything.",
        port = a.listen_port,
        pb = price_book.display(),
        bootstrap = broker.bootstrap(),
        dir = dir.display(),
        ch = clickhouse.url(),
        cfg = config.display(),
        tcp = clickhouse.tcp_port(),
    );
    tokio::signal::ctrl_c().await?;
    for (name, mut c) in children {
        // SIGKILL is safe: every stage is crash-safe by design.
        // Already exited is fine: it is stopped either way.
        c.kill().ok();
        c.wait().ok();
        eprintln!("stopped {name}");
    }
    drop((broker, clickhouse));
    Ok(())
}
