//! Event → charge visible: a sampled record is watched until its rated line item is in ClickHouse
//! (`rated_usage`, which the aggregator writes with the monthly sums), and the time from its send
//! to that moment goes into a histogram.
//!
//! Sampling (one record every `every`) keeps the polling load on ClickHouse small and constant.
//! The embedded default needs no probe: it folds a record into the monthly charges in the same
//! SQLite transaction that makes it durable, before the ack, so there event → charge = the ack.

use hdrhistogram::Histogram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Watches sampled records until ClickHouse shows them.
#[derive(Debug, Clone)]
pub struct Prober {
    http: reqwest::Client,
    url: String,
    db: String,
    every: Duration,
    last: Arc<Mutex<Option<Instant>>>,
    /// Send → visible, in microseconds.
    pub visible_us: Arc<Mutex<Histogram<u64>>>,
    /// Probes still unseen when the run ended (or that timed out).
    pub unseen: Arc<Mutex<u64>>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// How long one probe waits for its record before counting it unseen.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

impl Prober {
    /// A prober against ClickHouse's HTTP interface at `url`, database `db`.
    pub fn new(url: &str, db: &str, every: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(
            db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "database name `{db}` must be [A-Za-z0-9_]"
        );
        Ok(Prober {
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
            url: url.trim_end_matches('/').to_owned(),
            db: db.to_owned(),
            every,
            last: Arc::new(Mutex::new(None)),
            visible_us: Arc::new(Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?)),
            unseen: Arc::new(Mutex::new(0)),
            tasks: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Offers a record that was sent at `sent`; it is watched if a probe is due.
    pub fn offer(&self, record_id: &str, sent: Instant) {
        {
            let mut last = self.last.lock().expect("probe clock lock");
            if last.is_some_and(|l| l.elapsed() < self.every) {
                return;
            }
            *last = Some(Instant::now());
        }
        if !record_id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return;
        }
        let me = self.clone();
        let sql = format!("SELECT count() FROM {}.rated_usage WHERE record_id = '{record_id}'", self.db);
        let task = tokio::spawn(async move {
            while sent.elapsed() < PROBE_TIMEOUT {
                let seen = match me.http.post(&me.url).body(sql.clone()).send().await {
                    Ok(r) => r.text().await.ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0) > 0,
                    Err(_) => false,
                };
                if seen {
                    me.visible_us
                        .lock()
                        .expect("histogram lock")
                        .saturating_record(sent.elapsed().as_micros().max(1) as u64);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            *me.unseen.lock().expect("counter lock") += 1;
        });
        self.tasks.lock().expect("task list lock").push(task);
    }

    /// Waits for every probe to be seen or to time out.
    pub async fn finish(&self) {
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().expect("task list lock"));
        for t in tasks {
            // A probe task only records into the histogram; a panicked one is simply not counted.
            if t.await.is_err() {
                *self.unseen.lock().expect("counter lock") += 1;
            }
        }
    }
}
