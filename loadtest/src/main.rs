//! `loadtest`: a bounded load on Meterline, on loopback only.
//!
//! - `http`: posts the scenario's traffic through the real ingest API (AWS batches of 25 or the
//!   native bulk endpoint), at a target rate or as fast as it goes.
//! - `kafka` (feature `kafka`): produces the same traffic straight to the raw topic.
//! - `consume` (feature `kafka`): reads the raw topic back raw: the broker's limit.
//! - `price-book`: writes the scenario's price book (and prints its API keys) for `meterline serve`.
//!
//! Every run is bounded by a record count and by seconds, and prints a JSON summary: records/s,
//! HdrHistogram ack percentiles (p50/p90/p99/p999) and, when a ClickHouse is given, event →
//! charge visible percentiles. Non-loopback addresses are refused.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use loadtest::client::{Client, Tally};
use loadtest::probe::Prober;
use loadtest::scenario::{Scenario, ScenarioConfig};
use loadtest::traffic::{self, Endpoint, Pacer, Stream};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(about = "Bounded load on Meterline (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Post traffic through the HTTP API.
    Http(HttpArgs),
    /// Produce traffic straight to the raw topic (feature `kafka`).
    Kafka(KafkaArgs),
    /// Read the raw topic from the start, doing nothing with it (feature `kafka`).
    Consume(ConsumeArgs),
    /// Write, as JSONEachRow, the price in force for every (customer, product, dimension, hour)
    /// of the traffic's hours: what a query-time system joins raw usage with (P4).
    Prices {
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// Where to write it.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Write the scenario's price book (TOML) and print its API keys.
    PriceBook {
        #[command(flatten)]
        scenario: ScenarioArgs,
        /// Where to write it.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

/// The generated world and its traffic.
#[derive(Args, Debug, Clone)]
struct ScenarioArgs {
    /// Customers (the server must serve the same price book: see `price-book`).
    #[arg(long, default_value_t = 300)]
    customers: usize,
    /// Scenario seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Month of the catalogue and, with `--clock month`, of the traffic (YYYY-MM).
    #[arg(long, default_value = "2026-10")]
    month: String,
    /// `now`: the four complete hours before now (for a server on the system clock);
    /// `month`: `--hours` hours from the start of `--month`.
    #[arg(long, default_value = "now")]
    clock: String,
    /// Hours of traffic with `--clock month`.
    #[arg(long, default_value_t = 24)]
    hours: i64,
    /// Share of batches resent identically.
    #[arg(long, default_value_t = 0.01)]
    duplicate_share: f64,
    /// Share of records resent with another quantity.
    #[arg(long, default_value_t = 0.002)]
    conflict_share: f64,
    /// Share of invalid records.
    #[arg(long, default_value_t = 0.003)]
    invalid_share: f64,
}

/// Bounds and pace.
#[derive(Args, Debug, Clone)]
struct LoadArgs {
    /// Target records per second; 0 = as fast as it goes.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Stop after this many records.
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 60)]
    max_seconds: u64,
    /// Write the JSON summary here too.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
struct HttpArgs {
    /// Ingest base URL (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API shape.
    #[arg(long, value_enum, default_value_t = Endpoint::Aws)]
    endpoint: Endpoint,
    /// Records per bulk call.
    #[arg(long, default_value_t = 1000)]
    bulk_size: usize,
    /// Calls in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// ClickHouse HTTP URL (loopback) to measure event → charge visible (distributed mode).
    #[arg(long)]
    clickhouse_url: Option<String>,
    /// ClickHouse database of the pipeline.
    #[arg(long, default_value = "meterline")]
    clickhouse_db: String,
    /// One probe record per this many milliseconds.
    #[arg(long, default_value_t = 250)]
    probe_every_ms: u64,
    #[command(flatten)]
    scenario: ScenarioArgs,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Args, Debug)]
struct KafkaArgs {
    /// The pipeline's config (`meterline.toml`, e.g. the one `scripts/cluster.sh` writes): broker,
    /// topics and ClickHouse.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Probe event → charge visible in the config's ClickHouse.
    #[arg(long)]
    probe: bool,
    /// One probe record per this many milliseconds.
    #[arg(long, default_value_t = 250)]
    probe_every_ms: u64,
    /// Also write every produced record here as JSONEachRow (seq, slot, quantity) for P4.
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
    #[command(flatten)]
    scenario: ScenarioArgs,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Args, Debug)]
struct ConsumeArgs {
    /// The pipeline's config (`meterline.toml`).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Topic; default the raw topic of the config.
    #[arg(long)]
    topic: Option<String>,
    /// Stop after this many messages.
    #[arg(long)]
    records: u64,
    /// Stop after this many seconds without a message (once the first arrived).
    #[arg(long, default_value_t = 5)]
    idle_seconds: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
}

/// Whether every host in `url` (a URL or a `host:port[,host:port]` list) is loopback.
fn is_loopback(url: &str) -> bool {
    url.split(',').all(|one| {
        let rest = one.split("://").last().unwrap_or("");
        let host = if let Some(v6) = rest.strip_prefix('[') {
            v6.split(']').next().unwrap_or("")
        } else {
            rest.split(['/', ':']).next().unwrap_or("")
        };
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    })
}

fn scenario(a: &ScenarioArgs) -> anyhow::Result<(Scenario, Vec<common::time::Hour>)> {
    let month = common::time::Month::parse(&a.month).map_err(anyhow::Error::msg)?;
    let clock_now = match a.clock.as_str() {
        "now" => true,
        "month" => false,
        other => bail!("--clock must be `now` or `month`, not `{other}`"),
    };
    let s = Scenario::generate(ScenarioConfig {
        customers: a.customers,
        month,
        seed: a.seed,
        identical_resend_share: a.duplicate_share,
        conflict_share: a.conflict_share,
        invalid_share: a.invalid_share,
    });
    let hours = traffic::hours(clock_now, month, a.hours, traffic::system_now());
    Ok((s, hours))
}

fn quantiles_ms(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let q = |p: f64| (h.value_at_quantile(p) as f64 / 10.0).round() / 100.0;
    json!({ "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": (h.max() as f64 / 10.0).round() / 100.0, "count": h.len() })
}

async fn probe_summary(p: Option<&Prober>) -> Value {
    let Some(p) = p else { return Value::Null };
    p.finish().await;
    let h = p.visible_us.lock().expect("histogram lock").clone();
    let mut v = quantiles_ms(&h);
    if let Some(o) = v.as_object_mut() {
        o.insert("unseen".into(), json!(*p.unseen.lock().expect("counter lock")));
    }
    v
}

fn emit(summary: &Value, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(summary)?;
    println!("{text}");
    if let Some(path) = out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn http(a: HttpArgs) -> anyhow::Result<()> {
    if !is_loopback(&a.url) {
        bail!("{} is not a loopback address; loadtest only targets 127.0.0.0/8 or ::1", a.url);
    }
    let prober = match &a.clickhouse_url {
        Some(u) if !is_loopback(u) => bail!("{u} is not a loopback address"),
        Some(u) => Some(Prober::new(u, &a.clickhouse_db, Duration::from_millis(a.probe_every_ms))?),
        None => None,
    };
    let (scenario, hours) = scenario(&a.scenario)?;
    let client = Client::new(&a.url)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.load.max_seconds);
    let stream = Stream::new(
        &scenario,
        SmallRng::seed_from_u64(a.scenario.seed),
        hours,
        a.endpoint,
        a.bulk_size,
        a.load.records,
        deadline,
    );
    let pacer = Pacer::new(a.load.rate);
    let sem = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let mut tasks = Vec::new();
    let mut sent = 0u64;
    for call in stream {
        pacer.wait(sent).await;
        sent += call.records.len() as u64;
        let permit = Arc::clone(&sem).acquire_owned().await?;
        let (client, key, endpoint, prober) =
            (client.clone(), scenario.key_of(&call.seller).to_owned(), a.endpoint, prober.clone());
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let at = Instant::now();
            let results = match endpoint {
                Endpoint::Aws => client.batch_meter_usage(&key, &call.product, &call.records, &mut t).await,
                Endpoint::Bulk => client.bulk(&key, &call.records, &mut t).await,
            };
            drop(permit);
            if let (Some(p), Ok(rs)) = (&prober, &results) {
                if let Some(id) =
                    rs.iter().find(|r| r["Status"] == "Success").and_then(|r| r["MeteringRecordId"].as_str())
                {
                    p.offer(id, at);
                }
            }
            results.map(|_| t)
        }));
    }
    let mut tally = Tally::default();
    for t in tasks {
        tally.merge(&t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    let summary = json!({
        "mode": format!("http-{:?}", a.endpoint).to_lowercase(),
        "url": a.url,
        "target_rate": a.load.rate,
        "records": tally.records,
        "calls": tally.calls,
        "retries": tally.retries,
        "seconds": secs,
        "records_per_sec": tally.records as f64 / secs.max(1e-9),
        "ack_ms_per_call": quantiles_ms(&tally.latency_us),
        "charge_visible_ms": probe_summary(prober.as_ref()).await,
        "by_status": tally.by_status,
    });
    emit(&summary, a.load.out.as_deref())
}

#[cfg(feature = "kafka")]
async fn kafka(a: KafkaArgs) -> anyhow::Result<()> {
    let cfg =
        common::config::PipelineConfig::load(&a.config).with_context(|| format!("loading {}", a.config.display()))?;
    let k = &cfg.kafka;
    if !is_loopback(&k.bootstrap) {
        bail!("{} is not a loopback address", k.bootstrap);
    }
    let prober = match (&cfg.clickhouse, a.probe) {
        (Some(ch), true) if is_loopback(&ch.url) => {
            Some(Prober::new(&ch.url, &ch.database, Duration::from_millis(a.probe_every_ms))?)
        }
        (Some(ch), true) => bail!("{} is not a loopback address", ch.url),
        (None, true) => bail!("--probe needs a [clickhouse] section in the config"),
        (_, false) => None,
    };
    let (scenario, hours) = scenario(&a.scenario)?;
    let book = common::catalogue::PriceBook::new(scenario.doc.clone())?;
    let deadline = Instant::now() + Duration::from_secs(a.load.max_seconds);
    let stream = Stream::new(
        &scenario,
        SmallRng::seed_from_u64(a.scenario.seed),
        hours,
        Endpoint::Aws,
        25,
        a.load.records,
        deadline,
    );
    let mut dump = match &a.dump {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let p = loadtest::kafka::produce(
        k,
        &book,
        stream,
        Pacer::new(a.load.rate),
        prober.as_ref(),
        dump.as_mut().map(|w| w as &mut dyn std::io::Write),
    )
    .await?;
    if let Some(mut w) = dump {
        std::io::Write::flush(&mut w)?;
    }
    let summary = json!({
        "mode": "kafka-produce",
        "topic": k.topics.raw,
        "target_rate": a.load.rate,
        "records": p.acked,
        "invalid_not_produced": p.invalid,
        "expected_rated": p.expected_rated,
        "failed": p.failed,
        "seconds": p.seconds,
        "records_per_sec": p.acked as f64 / p.seconds.max(1e-9),
        "ack_ms_per_record": quantiles_ms(&p.ack_us),
        "charge_visible_ms": probe_summary(prober.as_ref()).await,
    });
    emit(&summary, a.load.out.as_deref())
}

#[cfg(not(feature = "kafka"))]
async fn kafka(_: KafkaArgs) -> anyhow::Result<()> {
    bail!("built without the `kafka` feature (cargo build --release -p meterline-loadtest --features kafka)")
}

#[cfg(feature = "kafka")]
fn consume(a: ConsumeArgs) -> anyhow::Result<()> {
    let cfg =
        common::config::PipelineConfig::load(&a.config).with_context(|| format!("loading {}", a.config.display()))?;
    let k = &cfg.kafka;
    if !is_loopback(&k.bootstrap) {
        bail!("{} is not a loopback address", k.bootstrap);
    }
    let topic = a.topic.clone().unwrap_or_else(|| k.topics.raw.clone());
    let c = loadtest::kafka::consume(
        k,
        &topic,
        a.records,
        Duration::from_secs(a.idle_seconds),
        Duration::from_secs(a.max_seconds),
    )?;
    emit(
        &json!({
            "mode": "kafka-consume-raw",
            "topic": topic,
            "records": c.messages,
            "bytes": c.bytes,
            "seconds": c.seconds,
            "records_per_sec": c.messages as f64 / c.seconds.max(1e-9),
        }),
        None,
    )
}

#[cfg(not(feature = "kafka"))]
fn consume(_: ConsumeArgs) -> anyhow::Result<()> {
    bail!("built without the `kafka` feature (cargo build --release -p meterline-loadtest --features kafka)")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Http(a) => http(a).await,
        Command::Kafka(a) => kafka(a).await,
        Command::Consume(a) => tokio::task::spawn_blocking(move || consume(a)).await?,
        Command::Prices { scenario: a, out } => {
            let (s, hours) = scenario(&a)?;
            let book = common::catalogue::PriceBook::new(s.doc.clone())?;
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&out).with_context(|| format!("writing {}", out.display()))?,
            );
            let rows = loadtest::prices::write_rows(&book, &hours, &mut w)?;
            std::io::Write::flush(&mut w)?;
            println!("{rows} price rows");
            Ok(())
        }
        Command::PriceBook { scenario: a, out } => {
            let (s, _) = scenario(&a)?;
            let book = common::catalogue::PriceBook::new(s.doc.clone())?;
            std::fs::write(&out, book.to_toml()?).with_context(|| format!("writing {}", out.display()))?;
            for k in &s.keys {
                println!("{} {}", k.seller, k.key);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_loopback_targets_are_allowed() {
        assert!(is_loopback("http://127.0.0.1:8080"));
        assert!(is_loopback("http://127.3.4.5:1/x"));
        assert!(is_loopback("http://localhost:9"));
        assert!(is_loopback("http://[::1]:8080/"));
        assert!(is_loopback("127.0.0.1:9092,localhost:9093"));
        assert!(!is_loopback("http://10.0.0.1:8080"));
        assert!(!is_loopback("http://example.com"));
        assert!(!is_loopback("127.0.0.1:9092,10.0.0.2:9092"));
    }
}
