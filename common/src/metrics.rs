//! Every Prometheus metric Meterline exposes, in one registry per process (one module, so the
//! `prometheus` crate can be swapped without touching the stages).
//!
//! All binaries share these names; a metric a binary never touches has no series there. The
//! `stage` label says which stage counted (`ingest`, `rater`, `aggregator`); the embedded
//! default counts its HTTP side as `ingest` and its writer as `rater`, so one dashboard serves
//! both modes.
//!
//! Labels are low-cardinality by construction: product and seller come from the price book
//! (anything else is counted as `unknown`), reason is a [`RejectCode`], currency an ISO code,
//! partition a topic partition. Customer ids never become labels.
//!
//! Per stage, `received = accepted + duplicate + conflicting + rejected` (ingest has no
//! duplicates or conflicts: dedup happens in the rater); undecodable messages are counted as
//! dead letters instead, and calls refused whole (429/503) in `meterline_sink_errors_total`.
//!
//! **Metrics are not the money of record.** `meterline_rated_amount_total` converts each exact
//! decimal amount to a float only here, at the edge, for rates and graphs; invoices come from
//! the store / ClickHouse, never from Prometheus.

use crate::catalogue::PriceBook;
use crate::money::Currency;
use crate::reject::RejectCode;
use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Re-exported so stages can hold a looked-up histogram without depending on the crate.
pub use prometheus::Histogram;

/// Estimated bytes of dedup state per key held: a `u128 → u128` hash-map entry (32 bytes) plus
/// the table's control byte and spare capacity. An estimate for the memory gauge and its alert.
pub const DEDUP_BYTES_PER_KEY: i64 = 48;

/// Counted as the product (or seller) label of a record that names none the price book knows.
pub const UNKNOWN: &str = "unknown";

/// Buckets for batch and flush sizes (records).
const SIZE_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5];
/// Buckets for in-process latencies: 1 ms … 60 s.
const FAST_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Buckets for event time → rated: sellers report an hour after it ends, up to the acceptance
/// window (6 h on AWS) later.
const EVENT_BUCKETS: &[f64] =
    &[1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 10800.0, 14400.0, 21600.0, 43200.0, 86400.0];

type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// One process's metrics.
pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    hooks: Mutex<Vec<ScrapeHook>>,
    ready: AtomicBool,
    /// The sink (store or broker) accepted its last write; `/ready` is 503 while it does not.
    sink_writable: AtomicBool,

    /// Records that reached a stage.
    pub records_received: IntCounterVec,
    /// Records a stage passed on (ingest: durable in the raw topic / store; rater: rated).
    pub records_accepted: IntCounterVec,
    /// Identical resends (no new charge).
    pub records_duplicate: IntCounterVec,
    /// Same slot, other content: refused as `DuplicateRecord`, the first stands.
    pub records_conflicting: IntCounterVec,
    /// Refused records by reason (conflicts excluded: see `records_conflicting`).
    pub records_rejected: IntCounterVec,
    /// Undecodable messages sent to the dead-letter path.
    pub dead_letters: IntCounterVec,
    /// Calls refused whole by the sink (`overloaded` → 429, `unavailable` → 503).
    pub sink_errors: IntCounterVec,
    /// Rated amount by currency (float at the edge; not the money of record).
    pub rated_amount: CounterVec,
    /// Rows written to ClickHouse by table.
    pub clickhouse_rows: IntCounterVec,
    /// Failed ClickHouse inserts by table.
    pub clickhouse_errors: IntCounterVec,
    /// ClickHouse insert duration by table.
    pub clickhouse_seconds: HistogramVec,
    /// Commits by stage and kind (`kafka_transaction`, `kafka_offsets`, `clickhouse_flush`,
    /// `sqlite_group_commit`).
    pub commits: IntCounterVec,
    /// Failed commits by stage and kind.
    pub commit_failures: IntCounterVec,
    /// Consumer lag (high watermark − position) by stage and partition.
    pub consumer_lag: IntGaugeVec,
    /// Records per batch (rater: decide-produce-commit; aggregator: flush; embedded: group commit).
    pub batch_records: HistogramVec,
    /// HTTP request duration until the answer (the ack) by route and status.
    pub http_seconds: HistogramVec,
    /// Usage timestamp → rating decision.
    pub event_to_rated_seconds: HistogramVec,
    /// Ingest's receipt → rating decision.
    pub received_to_rated_seconds: HistogramVec,
    /// Rated record produced → its line item acknowledged by ClickHouse.
    pub rated_to_clickhouse_seconds: HistogramVec,
    /// Messages waiting in librdkafka's producer queue (read at scrape time).
    pub producer_queue: IntGaugeVec,
    /// Failed Kafka deliveries by stage and topic.
    pub delivery_errors: IntCounterVec,
    /// Dedup keys held, by stage and partition.
    pub dedup_keys: IntGaugeVec,
    /// Estimated dedup-state memory by stage.
    pub dedup_bytes: IntGaugeVec,
    /// Dedup-state memory budget by stage: the alert threshold (not enforced: refusing records
    /// would lose billed usage).
    pub dedup_budget: IntGaugeVec,
    /// Records admitted and waiting for the sink (ingest back-pressure).
    pub in_flight: IntGauge,
    /// Admission limit before 429.
    pub in_flight_limit: IntGauge,
    /// Constant 1 with the version and the binary.
    pub build_info: IntGaugeVec,
    /// Selected configuration values (name → value).
    pub config: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("families", &self.names.len()).field("ready", &self.is_ready()).finish()
    }
}

/// Registers collectors and remembers their names (for [`Metrics::names`]).
struct Builder {
    registry: Registry,
    names: Vec<String>,
}

impl Builder {
    fn reg<C: Collector + Clone + 'static>(&mut self, c: C) -> C {
        for d in c.desc() {
            self.names.push(d.fq_name.clone());
        }
        self.registry.register(Box::new(c.clone())).expect("metric names are unique");
        c
    }
    fn counter(&mut self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.reg(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
    fn gauge(&mut self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.reg(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
    fn histogram(&mut self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        self.reg(
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels).expect("valid metric"),
        )
    }
}

impl Metrics {
    /// A fresh registry for `binary` (`ingest`, `rater`, `aggregator`, `meterline`).
    pub fn new(binary: &str) -> Arc<Self> {
        let mut b = Builder { registry: Registry::new(), names: Vec::new() };
        let rec = &["stage", "product", "seller"];
        let m = Metrics {
            records_received: b.counter("meterline_records_received_total", "Usage records that reached a stage.", rec),
            records_accepted: b.counter(
                "meterline_records_accepted_total",
                "Records a stage passed on: ingest = durable in the raw topic or store, rater = rated.",
                rec,
            ),
            records_duplicate: b.counter("meterline_records_duplicate_total", "Identical resends: Success, no new charge.", rec),
            records_conflicting: b.counter(
                "meterline_records_conflicting_total",
                "Same (product, customer, dimension, hour) with other content: refused as DuplicateRecord, the first stands.",
                rec,
            ),
            records_rejected: b.counter(
                "meterline_records_rejected_total",
                "Refused records by reason (conflicting duplicates are counted separately).",
                &["stage", "product", "seller", "reason"],
            ),
            dead_letters: b.counter("meterline_dead_letters_total", "Undecodable messages sent to the dead-letter path.", &["stage"]),
            sink_errors: b.counter(
                "meterline_sink_errors_total",
                "Calls refused whole by the sink: overloaded (429) or unavailable (503).",
                &["stage", "kind"],
            ),
            rated_amount: b.reg(
                CounterVec::new(
                    Opts::new(
                        "meterline_rated_amount_total",
                        "Rated amount by currency, unrounded, converted to float for graphs only: not the money of record.",
                    ),
                    &["currency"],
                )
                .expect("valid metric"),
            ),
            clickhouse_rows: b.counter("meterline_clickhouse_rows_written_total", "Rows written to ClickHouse.", &["table"]),
            clickhouse_errors: b.counter("meterline_clickhouse_insert_errors_total", "Failed ClickHouse inserts (retried).", &["table"]),
            clickhouse_seconds: b.histogram(
                "meterline_clickhouse_insert_duration_seconds",
                "Duration of one successful ClickHouse insert.",
                &["table"],
                FAST_BUCKETS,
            ),
            commits: b.counter(
                "meterline_commits_total",
                "Commits: kafka_transaction (the rater's batch: outputs and raw offsets in one Kafka transaction), kafka_offsets (the aggregator's consumer offsets, for lag), clickhouse_flush, sqlite_group_commit.",
                &["stage", "kind"],
            ),
            commit_failures: b.counter("meterline_commit_failures_total", "Failed commits (aborted group commits, failed flush attempts, offset commits refused).", &["stage", "kind"]),
            consumer_lag: b.gauge("meterline_consumer_lag_records", "Records behind the partition's high watermark.", &["stage", "partition"]),
            batch_records: b.histogram(
                "meterline_batch_records",
                "Records per batch: rater produce-and-commit cycle, aggregator ClickHouse flush, embedded group commit.",
                &["stage"],
                SIZE_BUCKETS,
            ),
            http_seconds: b.histogram(
                "meterline_http_request_duration_seconds",
                "HTTP request duration until the answer; for usage calls this is the durable ack.",
                &["path", "code"],
                FAST_BUCKETS,
            ),
            event_to_rated_seconds: b.histogram(
                "meterline_event_to_rated_seconds",
                "Usage timestamp to the rating decision.",
                &["stage"],
                EVENT_BUCKETS,
            ),
            received_to_rated_seconds: b.histogram(
                "meterline_received_to_rated_seconds",
                "Receipt at ingest to the rating decision.",
                &["stage"],
                FAST_BUCKETS,
            ),
            rated_to_clickhouse_seconds: b.histogram(
                "meterline_rated_to_clickhouse_seconds",
                "Rated record produced to its line item acknowledged by ClickHouse.",
                &["stage"],
                FAST_BUCKETS,
            ),
            producer_queue: b.gauge("meterline_kafka_producer_queue_messages", "Messages in librdkafka's producer queue awaiting delivery.", &["stage"]),
            delivery_errors: b.counter("meterline_kafka_delivery_errors_total", "Messages the broker did not acknowledge.", &["stage", "topic"]),
            dedup_keys: b.gauge("meterline_dedup_keys", "Dedup keys held (the acceptance window plus slack).", &["stage", "partition"]),
            dedup_bytes: b.gauge("meterline_dedup_state_bytes", "Estimated memory of the dedup state.", &["stage"]),
            dedup_budget: b.gauge(
                "meterline_dedup_state_budget_bytes",
                "Memory budgeted for dedup state: the alert threshold, not enforced.",
                &["stage"],
            ),
            in_flight: b.reg(IntGauge::new("meterline_ingest_in_flight_records", "Records admitted and waiting for the sink.").expect("valid metric")),
            in_flight_limit: b.reg(IntGauge::new("meterline_ingest_in_flight_limit", "Records in flight before callers get 429.").expect("valid metric")),
            build_info: b.gauge("meterline_build_info", "Constant 1: version and binary.", &["version", "binary"]),
            config: b.gauge("meterline_config", "Selected configuration values.", &["name"]),
            registry: Registry::new(),
            names: Vec::new(),
            hooks: Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
            sink_writable: AtomicBool::new(true),
        };
        let m = Metrics { registry: b.registry, names: b.names, ..m };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), binary]).set(1);
        Arc::new(m)
    }

    /// Every metric family name this registry can expose (histograms without their
    /// `_bucket`/`_sum`/`_count` suffixes).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Adds a function run before every scrape (gauges read from a client, e.g. queue depth).
    pub fn on_scrape(&self, f: impl Fn(&Metrics) + Send + Sync + 'static) {
        if let Ok(mut h) = self.hooks.lock() {
            h.push(Box::new(f));
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        if let Ok(hooks) = self.hooks.lock() {
            for h in hooks.iter() {
                h(self);
            }
        }
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).ok();
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Marks the process ready (or not) for `/ready`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether `/ready` answers 200: marked ready, and the sink accepts writes.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.sink_writable.load(Ordering::SeqCst)
    }

    /// Records whether the sink (store or broker) accepts writes now (issue 12): a load balancer
    /// then stops sending calls that could only get 503.
    pub fn set_sink_writable(&self, writable: bool) {
        self.sink_writable.store(writable, Ordering::SeqCst);
    }

    /// Whether the sink accepted its last write (or probe).
    pub fn sink_writable(&self) -> bool {
        self.sink_writable.load(Ordering::SeqCst)
    }

    /// Sets a configuration gauge.
    pub fn set_config(&self, name: &str, value: i64) {
        self.config.with_label_values(&[name]).set(value);
    }

    /// Creates every (stage, product, seller) series of the price book at zero, so a seller
    /// that never sends shows up as 0 rather than as no data.
    pub fn init_catalogue(&self, stage: &str, book: &PriceBook) {
        for p in &book.doc().products {
            let l = [stage, p.code.as_str(), p.seller.as_str()];
            self.records_received.with_label_values(&l);
            self.records_accepted.with_label_values(&l);
        }
        self.set_config("acceptance_window_seconds", book.windows().acceptance_ms / 1000);
    }

    /// Counts one record's outcome at `stage`.
    pub fn outcome(&self, stage: &str, labels: &RecordLabels<'_>, outcome: Outcome) {
        self.outcomes(stage, labels, outcome, 1);
    }

    /// Counts `n` records with the same labels and outcome at `stage`.
    pub fn outcomes(&self, stage: &str, labels: &RecordLabels<'_>, outcome: Outcome, n: u64) {
        let l = [stage, labels.product, labels.seller];
        self.records_received.with_label_values(&l).inc_by(n);
        match outcome {
            Outcome::Accepted => self.records_accepted.with_label_values(&l).inc_by(n),
            Outcome::Duplicate => self.records_duplicate.with_label_values(&l).inc_by(n),
            Outcome::Conflicting => self.records_conflicting.with_label_values(&l).inc_by(n),
            Outcome::Rejected(code) => self
                .records_rejected
                .with_label_values(&[stage, labels.product, labels.seller, code.as_str()])
                .inc_by(n),
        }
    }

    /// Adds an exact amount to the revenue counter (the one float conversion, for graphs).
    pub fn add_rated_amount(&self, currency: Currency, amount: Decimal) {
        if let Some(f) = amount.to_f64() {
            self.rated_amount.with_label_values(&[currency.as_str()]).inc_by(f.max(0.0));
        }
    }

    /// Sets the dedup gauges of `stage` for one partition and the stage's memory estimate.
    pub fn set_dedup(&self, stage: &str, partition: i32, keys: usize, total_keys: usize) {
        self.dedup_keys.with_label_values(&[stage, &partition.to_string()]).set(keys as i64);
        self.dedup_bytes.with_label_values(&[stage]).set(total_keys as i64 * DEDUP_BYTES_PER_KEY);
    }
}

/// Counts outcomes of a batch in memory and adds them to the registry once (a label lookup per
/// distinct (labels, outcome), not per record).
#[derive(Debug, Default)]
pub struct Tally<'a> {
    counts: Vec<(RecordLabels<'a>, Outcome, u64)>,
}

impl<'a> Tally<'a> {
    /// Counts one record.
    pub fn add(&mut self, labels: RecordLabels<'a>, outcome: Outcome) {
        // Calls and batches hold few distinct (product, outcome) pairs: a linear scan wins.
        match self
            .counts
            .iter_mut()
            .find(|(l, o, _)| *o == outcome && l.product == labels.product && l.seller == labels.seller)
        {
            Some((_, _, n)) => *n += 1,
            None => self.counts.push((labels, outcome, 1)),
        }
    }

    /// Adds the counts to `m` under `stage`.
    pub fn flush(self, m: &Metrics, stage: &str) {
        for (l, o, n) in self.counts {
            m.outcomes(stage, &l, o, n);
        }
    }
}

/// What happened to one record at a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Passed on.
    Accepted,
    /// Identical resend.
    Duplicate,
    /// Conflicting duplicate (`DuplicateRecord`).
    Conflicting,
    /// Refused for another reason.
    Rejected(RejectCode),
}

impl Outcome {
    /// Classifies a refusal: `DuplicateRecord` is a conflict, anything else a rejection.
    pub fn refused(code: RejectCode) -> Self {
        if code == RejectCode::DuplicateRecord {
            Outcome::Conflicting
        } else {
            Outcome::Rejected(code)
        }
    }
}

/// The product and seller labels of a record, bounded by the price book.
#[derive(Debug, Clone, Copy)]
pub struct RecordLabels<'a> {
    /// Product code, or [`UNKNOWN`].
    pub product: &'a str,
    /// Seller id, or [`UNKNOWN`].
    pub seller: &'a str,
}

impl<'a> RecordLabels<'a> {
    /// Labels for `product` sent by `seller`; a product the book does not know is `unknown` (a
    /// caller must not be able to mint label values).
    pub fn new(book: &'a PriceBook, product: &str, seller: &str) -> Self {
        match book.product(product) {
            Some(p) => RecordLabels { product: &p.code, seller: &p.seller },
            None => RecordLabels {
                product: UNKNOWN,
                seller: book.doc().sellers.iter().find(|s| s.id == seller).map_or(UNKNOWN, |s| s.id.as_str()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOK: &str = include_str!("../../docs/examples/price-book.toml");

    #[test]
    fn names_are_prefixed_unique_and_rendered_once_touched() {
        let m = Metrics::new("test");
        let mut names = m.names().to_vec();
        assert!(names.iter().all(|n| n.starts_with("meterline_")), "{names:?}");
        names.sort();
        names.dedup();
        assert_eq!(names.len(), m.names().len());
        let book = PriceBook::from_toml(BOOK).unwrap();
        let p = &book.doc().products[0];
        let l = RecordLabels::new(&book, &p.code, &p.seller);
        m.outcome("ingest", &l, Outcome::Accepted);
        m.outcome("ingest", &l, Outcome::refused(RejectCode::InvalidQuantity));
        let text = m.render();
        assert!(
            text.contains(&format!(
                "meterline_records_received_total{{product=\"{}\",seller=\"{}\",stage=\"ingest\"}} 2",
                p.code, p.seller
            )),
            "{text}"
        );
        assert!(text.contains("reason=\"InvalidQuantity\""), "{text}");
        assert!(text.contains("meterline_build_info{binary=\"test\""), "{text}");
    }

    #[test]
    fn unknown_products_and_sellers_cannot_mint_labels() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let l = RecordLabels::new(&book, "anything-a-caller-sends", "someone");
        assert_eq!((l.product, l.seller), (UNKNOWN, UNKNOWN));
    }

    #[test]
    fn revenue_is_converted_only_for_the_metric() {
        let m = Metrics::new("test");
        m.add_rated_amount(Currency::USD, Decimal::new(12345, 2));
        m.add_rated_amount(Currency::USD, Decimal::new(5, 1));
        assert!(m.render().contains("meterline_rated_amount_total{currency=\"USD\"} 123.95"));
    }
}
