//! A bounded, paced stream of the scenario's traffic.
//!
//! Hours: either the last complete hours before now (for a server on the system clock: records
//! must be inside its acceptance window) or hours of a given month (for tools that take history).
//! Calls: AWS batches of at most 25 records of one product, or native bulk calls of up to
//! `bulk_size` records of one seller. Pacing: open loop at a target rate in records per second
//! (a call of n records is released when the schedule reaches it), or as fast as it goes.

use crate::scenario::{Batch, Scenario};
use common::time::{Hour, Month, Timestamp};
use rand::rngs::SmallRng;
use std::time::{Duration, Instant};

/// Which API shape the calls take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    /// `POST /v1/BatchMeterUsage`, at most 25 records of one product per call.
    Aws,
    /// `POST /v1/usage`, JSON lines with `ProductCode` on each record.
    Bulk,
}

/// The system clock as a [`Timestamp`].
pub fn system_now() -> Timestamp {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    Timestamp(ms)
}

/// The hours to generate traffic for.
pub fn hours(clock_now: bool, month: Month, max_hours: i64, now: Timestamp) -> Vec<Hour> {
    if clock_now {
        // The four complete hours before the current one: the oldest is < 5 h old, inside a
        // 6-hour acceptance window for the whole of a bounded run.
        let current = now.hour().0;
        (current - 4..current).collect::<Vec<_>>().into_iter().map(Hour).collect()
    } else {
        (0..max_hours.min(month.hours())).map(|h| Hour(month.first_hour().0 + h)).collect()
    }
}

/// One call's worth of records.
#[derive(Debug, Clone)]
pub struct Call {
    /// Seller (whose key sends it).
    pub seller: String,
    /// The AWS call's product (bulk calls carry it per record).
    pub product: String,
    /// Records; in bulk calls each has its `ProductCode`.
    pub records: Vec<serde_json::Value>,
}

/// Turns one hour's AWS batches into calls for `endpoint`.
pub fn calls(batches: Vec<Batch>, endpoint: Endpoint, bulk_size: usize) -> Vec<Call> {
    match endpoint {
        Endpoint::Aws => {
            batches.into_iter().map(|b| Call { seller: b.seller, product: b.product, records: b.records }).collect()
        }
        Endpoint::Bulk => {
            let mut out: Vec<Call> = Vec::new();
            for b in batches {
                let open = out.iter_mut().rev().find(|c| c.seller == b.seller && c.records.len() < bulk_size);
                let call = match open {
                    Some(c) => c,
                    None => {
                        out.push(Call { seller: b.seller.clone(), product: String::new(), records: Vec::new() });
                        out.last_mut().expect("just pushed")
                    }
                };
                for mut r in b.records {
                    r["ProductCode"] = serde_json::Value::String(b.product.clone());
                    call.records.push(r);
                }
            }
            out
        }
    }
}

/// Lazily yields calls hour after hour until the traffic, the record budget or the time runs out.
#[derive(Debug)]
pub struct Stream<'a> {
    scenario: &'a Scenario,
    rng: SmallRng,
    hours: std::vec::IntoIter<Hour>,
    pending: std::vec::IntoIter<Call>,
    endpoint: Endpoint,
    bulk_size: usize,
    budget: u64,
    deadline: Instant,
}

impl<'a> Stream<'a> {
    /// A stream over `hours` of `scenario`, at most `records` records, until `deadline`.
    pub fn new(
        scenario: &'a Scenario,
        rng: SmallRng,
        hours: Vec<Hour>,
        endpoint: Endpoint,
        bulk_size: usize,
        records: u64,
        deadline: Instant,
    ) -> Self {
        Stream {
            scenario,
            rng,
            hours: hours.into_iter(),
            pending: Vec::new().into_iter(),
            endpoint,
            bulk_size: bulk_size.max(1),
            budget: records,
            deadline,
        }
    }
}

impl Iterator for Stream<'_> {
    type Item = Call;
    fn next(&mut self) -> Option<Call> {
        if self.budget == 0 || Instant::now() >= self.deadline {
            return None;
        }
        let mut call = loop {
            if let Some(c) = self.pending.next() {
                break c;
            }
            let hour = self.hours.next()?;
            self.pending =
                calls(self.scenario.hour_traffic(hour, &mut self.rng), self.endpoint, self.bulk_size).into_iter();
        };
        call.records.truncate(self.budget.min(usize::MAX as u64) as usize);
        self.budget -= call.records.len() as u64;
        Some(call)
    }
}

/// Open-loop pacing: when the call that starts after `sent` records may go.
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    started: Instant,
    rate: f64,
}

impl Pacer {
    /// `rate` records per second; 0 = as fast as it goes.
    pub fn new(rate: f64) -> Self {
        Pacer { started: Instant::now(), rate }
    }
    /// Sleeps until the schedule reaches `sent` records.
    pub async fn wait(&self, sent: u64) {
        if self.rate > 0.0 {
            let due = self.started + Duration::from_secs_f64(sent as f64 / self.rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }
}
