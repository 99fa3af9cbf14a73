//! `loadtest`: a bounded load on a Meterline ingest endpoint on loopback.
//!
//! Generates the demo scenario's traffic for a number of hours and posts it through the real API
//! (AWS batches of 25, or the native bulk endpoint), then prints a JSON summary with records/s and
//! ack-latency percentiles. Refuses any target that is not a loopback address, and stops after
//! `--hours` of traffic or `--max-seconds`, whichever comes first.

use anyhow::{bail, Context};
use clap::Parser;
use loadtest::client::{Client, Tally};
use loadtest::scenario::{Scenario, ScenarioConfig};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Bounded load on a Meterline ingest endpoint (loopback only)")]
struct Args {
    /// Ingest base URL (must be loopback).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Customers in the generated scenario (must match the server's price book: generate it with
    /// `meterline demo --customers N` or serve the scenario's price book).
    #[arg(long, default_value_t = 300)]
    customers: usize,
    /// Hours of traffic to send, from the start of `--month`.
    #[arg(long, default_value_t = 24)]
    hours: i64,
    /// Month, YYYY-MM.
    #[arg(long, default_value = "2026-10")]
    month: String,
    /// Calls in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Hard stop after this many seconds.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
    /// Scenario seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn is_loopback(url: &str) -> bool {
    let host = url.split("://").nth(1).unwrap_or("").split(['/', ':']).next().unwrap_or("");
    let host = if url.contains("://[") { url.split("://[").nth(1).unwrap_or("").split(']').next().unwrap_or("") } else { host };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !is_loopback(&args.url) {
        bail!("{} is not a loopback address; loadtest only targets 127.0.0.0/8 or ::1", args.url);
    }
    let month = common::time::Month::parse(&args.month).map_err(anyhow::Error::msg)?;
    let scenario = Scenario::generate(ScenarioConfig { customers: args.customers, month, seed: args.seed, ..Default::default() });
    let client = Client::new(&args.url)?;
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let started = Instant::now();
    let mut tally = Tally::default();
    for h in 0..args.hours.min(month.hours()) {
        if Instant::now() > deadline {
            break;
        }
        let hour = common::time::Hour(month.first_hour().0 + h);
        let batches = scenario.hour_traffic(hour, &mut rng);
        let t = client
            .send_all(batches, |s| scenario.key_of(s).to_owned(), args.concurrency)
            .await
            .with_context(|| format!("sending hour {hour}"))?;
        tally.merge(&t);
    }
    let secs = started.elapsed().as_secs_f64();
    let q = |p: f64| tally.latency_us.value_at_quantile(p) as f64 / 1000.0;
    let summary = serde_json::json!({
        "records": tally.records,
        "calls": tally.calls,
        "retries": tally.retries,
        "seconds": secs,
        "records_per_sec": tally.records as f64 / secs.max(1e-9),
        "ack_ms": { "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999) },
        "by_status": tally.by_status,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
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
        assert!(!is_loopback("http://10.0.0.1:8080"));
        assert!(!is_loopback("http://example.com"));
    }
}
