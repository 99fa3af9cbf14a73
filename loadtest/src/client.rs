//! Posts usage through the real HTTP API and tallies what comes back.
//!
//! Behaves like well-written seller code: it sends AWS-shaped batches with its API key, and on
//! 429/503 waits for `Retry-After` and resends the same batch (a bounded number of times), so
//! nothing is lost to back-pressure. Ack latency per call goes into an HdrHistogram.

use crate::scenario::Batch;
use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// What a run saw.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Records by the `Status` the API answered.
    pub by_status: BTreeMap<String, u64>,
    /// HTTP calls that got a 200.
    pub calls: u64,
    /// Calls retried after 429/503.
    pub retries: u64,
    /// Records sent (each record once per call, resends included).
    pub records: u64,
    /// Ack latency per call in microseconds.
    pub latency_us: Histogram<u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            by_status: BTreeMap::new(),
            calls: 0,
            retries: 0,
            records: 0,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
        }
    }
}

impl Tally {
    /// Adds another tally.
    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.by_status {
            *self.by_status.entry(k.clone()).or_default() += v;
        }
        self.calls += other.calls;
        self.retries += other.retries;
        self.records += other.records;
        // Both use the same bounds, so adding cannot fail.
        self.latency_us.add(&other.latency_us).expect("both histograms have the same bounds");
    }
}

/// An HTTP client for one Meterline ingest endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

/// Most attempts for one call under back-pressure.
const MAX_ATTEMPTS: u32 = 20;

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        Ok(Client { http, base: base.trim_end_matches('/').to_owned() })
    }

    /// One `BatchMeterUsage` call; returns the statuses in order.
    pub async fn batch_meter_usage(
        &self,
        key: &str,
        product: &str,
        records: &[Value],
        tally: &mut Tally,
    ) -> anyhow::Result<Vec<Value>> {
        let body = serde_json::to_vec(&serde_json::json!({ "ProductCode": product, "UsageRecords": records }))?;
        let url = format!("{}/v1/BatchMeterUsage", self.base);
        let resp = self.post(&url, key, body, "application/x-amz-json-1.1", tally).await?;
        tally.records += records.len() as u64;
        let results = resp["Results"].as_array().cloned().unwrap_or_default();
        for r in &results {
            *tally.by_status.entry(r["Status"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        }
        Ok(results)
    }

    /// One native bulk call: JSON lines, each record carrying its `ProductCode`.
    pub async fn bulk(&self, key: &str, records: &[Value], tally: &mut Tally) -> anyhow::Result<Vec<Value>> {
        let mut body = Vec::with_capacity(records.len() * 160);
        for r in records {
            serde_json::to_writer(&mut body, r)?;
            body.push(b'\n');
        }
        let url = format!("{}/v1/usage", self.base);
        let resp = self.post(&url, key, body, "application/x-ndjson", tally).await?;
        tally.records += records.len() as u64;
        let results = resp["Results"].as_array().cloned().unwrap_or_default();
        for r in &results {
            *tally.by_status.entry(r["Status"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        }
        Ok(results)
    }

    async fn post(
        &self,
        url: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        tally: &mut Tally,
    ) -> anyhow::Result<Value> {
        for attempt in 1..=MAX_ATTEMPTS {
            let start = Instant::now();
            let resp = self
                .http
                .post(url)
                .header("X-Api-Key", key)
                // Per-record answers (docs/api.md): the demo and the load mix invalid records in
                // and tally every record's own status, which AWS's whole-call answers would hide.
                .header("X-Meterline-Per-Record", "true")
                .header("Content-Type", content_type)
                .body(body.clone())
                .send()
                .await
                .with_context(|| format!("POST {url}"))?;
            let status = resp.status();
            if status.as_u16() == 429 || status.as_u16() == 503 {
                let wait = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                tally.retries += 1;
                // Back off no longer than the server asks, but at least a little, with jitter.
                let jitter = u64::from(attempt) * 7 % 50;
                tokio::time::sleep(Duration::from_millis((wait * 1000).min(200 * u64::from(attempt)) + jitter)).await;
                continue;
            }
            let text = resp.text().await.with_context(|| format!("reading the answer of {url}"))?;
            if !status.is_success() {
                bail!("{url} answered {status}: {text}");
            }
            tally.latency_us.saturating_record(start.elapsed().as_micros().max(1) as u64);
            tally.calls += 1;
            return serde_json::from_str(&text).with_context(|| format!("{url} answered invalid JSON"));
        }
        bail!("{url}: still overloaded after {MAX_ATTEMPTS} attempts")
    }

    /// Sends batches with at most `concurrency` calls in flight; `key_of` maps seller → key.
    pub async fn send_all(
        &self,
        batches: Vec<Batch>,
        key_of: impl Fn(&str) -> String,
        concurrency: usize,
    ) -> anyhow::Result<Tally> {
        let sem = Arc::new(Semaphore::new(concurrency.max(1)));
        let mut tasks = Vec::with_capacity(batches.len());
        for b in batches {
            let permit = Arc::clone(&sem).acquire_owned().await?;
            let me = self.clone();
            let key = key_of(&b.seller);
            tasks.push(tokio::spawn(async move {
                let mut t = Tally::default();
                let r = me.batch_meter_usage(&key, &b.product, &b.records, &mut t).await;
                drop(permit);
                r.map(|_| t)
            }));
        }
        let mut total = Tally::default();
        for t in tasks {
            total.merge(&t.await??);
        }
        Ok(total)
    }
}
