//! SHELL. The embedded default: ingest → rater → aggregator in one process over SQLite.
//!
//! HTTP handlers validate records (ingest core) and hand each call to [`EmbeddedSink`]. One
//! writer thread owns the store and the rater and aggregator cores; it takes every call waiting
//! in its queue, decides them through the batch core ([`rater::batch`]: dedup + rating, counts,
//! refused rows), stages the rated records in the month's lines ([`MonthlyRollup::stage`]) and
//! writes all of it in one SQLite transaction (group commit). Only after that commit does it
//! make the batch's dedup claims and line sums permanent in memory and answer the callers: an
//! answer of `Success` means durable, and a failed commit leaves no trace in memory either.
//!
//! On start the writer rebuilds its state from the store: dedup claims for the acceptance window
//! plus slack (a bounded replay) and every line's exact sums.
//!
//! Back-pressure: at most a bound of records wait for the writer; beyond that callers get
//! [`SinkError::Overloaded`] (HTTP 429 with `Retry-After`) instead of an unbounded queue. The
//! bound follows the writer's measured rate ([`ingest::shed::QueueTarget`]): what it commits in
//! the queue target (default 250 ms), never above `max_in_flight` (issue 12).
//!
//! Readiness: a failed commit marks the sink unwritable (`/ready` answers 503); while it is, the
//! writer probes the store once a second and marks it writable again when a write commits.

use crate::store::{BatchWrite, RejectedRow, Store, StoreError};
use aggregator::rollup::MonthlyRollup;
use common::catalogue::LiveBook;
use common::metrics::Metrics;
use common::usage::UsageRecord;
use ingest::clock::Clock;
use ingest::shed::QueueTarget;
use ingest::sink::{InFlight, RefusedRecord, SinkError, SinkOutcome, UsageSink};
use rater::batch::{BatchEffects, Refusal};
use rater::decision::{Decision, Rater};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Most records one transaction takes (bounds a transaction's size and latency).
const MAX_RECORDS_PER_TXN: usize = 50_000;

/// Status names counted in `ingest_counts` besides the rejection codes (the batch core's).
pub use rater::batch::{STATUS_ACCEPTED, STATUS_IDENTICAL};

struct Job {
    accepted: Vec<UsageRecord>,
    refused: Vec<RefusedRecord>,
    reply: oneshot::Sender<Result<Vec<SinkOutcome>, SinkError>>,
}

/// The sink HTTP handlers write to; cheap to clone.
#[derive(Debug, Clone)]
pub struct EmbeddedSink {
    tx: mpsc::Sender<Job>,
    in_flight: InFlight,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({} accepted, {} refused)", self.accepted.len(), self.refused.len())
    }
}

impl UsageSink for EmbeddedSink {
    async fn submit(
        &self,
        accepted: Vec<UsageRecord>,
        refused: Vec<RefusedRecord>,
    ) -> Result<Vec<SinkOutcome>, SinkError> {
        let _admitted = self.in_flight.admit(accepted.len() + refused.len())?;
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Job { accepted, refused, reply });
        let result = match sent {
            Ok(()) => rx.await.unwrap_or_else(|_| Err(SinkError::Unavailable("the store writer stopped".into()))),
            Err(_) => Err(SinkError::Unavailable("the store writer stopped".into())),
        };
        result
    }
}

/// What the writer thread reports when it stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriterStats {
    /// Transactions committed.
    pub transactions: u64,
    /// Records written (accepted + refused).
    pub records: u64,
}

/// A running embedded pipeline: the sink to hand to ingest and the writer thread.
#[derive(Debug)]
pub struct Embedded {
    /// Where HTTP handlers submit.
    pub sink: EmbeddedSink,
    writer: std::thread::JoinHandle<Result<WriterStats, StoreError>>,
}

impl Embedded {
    /// Opens the store at `db`, rebuilds state, and starts the writer thread.
    pub fn start(
        db: &Path,
        book: impl Into<LiveBook>,
        clock: Arc<dyn Clock>,
        max_in_flight: usize,
    ) -> Result<Self, StoreError> {
        Self::start_with_metrics(db, book, clock, max_in_flight, Metrics::new("meterline"))
    }

    /// [`Embedded::start_with_metrics`] with the in-flight bound's queue target (the default is
    /// [`ingest::shed::DEFAULT_QUEUE_TARGET`]); `max_in_flight` is the bound's ceiling.
    pub fn start_with_target(
        db: &Path,
        book: impl Into<LiveBook>,
        clock: Arc<dyn Clock>,
        max_in_flight: usize,
        queue_target: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        Self::open(db, book, clock, QueueTarget::new(queue_target, max_in_flight), metrics)
    }

    /// [`Embedded::start`], the writer counting into `metrics` under the stage `rater` (it
    /// dedups and rates; the HTTP side counts as `ingest`).
    pub fn start_with_metrics(
        db: &Path,
        book: impl Into<LiveBook>,
        clock: Arc<dyn Clock>,
        max_in_flight: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        Self::open(db, book, clock, QueueTarget::new(ingest::shed::DEFAULT_QUEUE_TARGET, max_in_flight), metrics)
    }

    fn open(
        db: &Path,
        book: impl Into<LiveBook>,
        clock: Arc<dyn Clock>,
        shed: QueueTarget,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let mut store = Store::open(db)?;
        // Refuse to start (and to say "listening") on a store that cannot take a write.
        store.probe_write()?;
        let book: LiveBook = book.into();
        let mut rater = Rater::new();
        let windows = book.current().windows();
        let oldest = common::window::eviction_horizon(clock.now(), windows.acceptance_ms);
        for (k, h, id) in store.dedup_claims_since(oldest)? {
            rater.restore_claim(k, h, id);
        }
        let mut rollup = MonthlyRollup::new();
        for (key, sums) in store.line_sums()? {
            rollup.restore(key, sums);
        }
        tracing::info!(dedup_keys = rater.dedup_keys(), lines = rollup.len(), "embedded store opened, state rebuilt");
        metrics.init_catalogue(STAGE, &book.current());
        let in_flight = InFlight::new(shed.bound());
        metrics.in_flight_limit.set(shed.bound() as i64);
        metrics.set_sink_writable(true);
        metrics.dedup_budget.with_label_values(&[STAGE]).set(common::config::DEFAULT_DEDUP_BUDGET_BYTES as i64);
        metrics.set_dedup(STAGE, 0, rater.dedup_keys(), rater.dedup_keys());
        let (tx, rx) = mpsc::channel();
        let admission = in_flight.clone();
        let writer = std::thread::Builder::new()
            .name("meterline-writer".into())
            .spawn(move || Writer { store, rater, rollup, book, clock, metrics, shed, in_flight: admission }.run(rx))
            .map_err(|e| StoreError::Sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Embedded { sink: EmbeddedSink { tx, in_flight }, writer })
    }

    /// Stops accepting, lets the writer finish what is queued, and waits for it.
    pub fn shutdown(self) -> Result<WriterStats, StoreError> {
        drop(self.sink);
        self.writer
            .join()
            .unwrap_or_else(|_| Err(StoreError::Corrupt { table: "-", column: "-", value: "writer panicked".into() }))
    }
}

struct Writer {
    store: Store,
    rater: Rater,
    rollup: MonthlyRollup,
    /// Read once per batch, after its calls were queued: a call validated under a catalogue
    /// version is rated under it or a later one.
    book: LiveBook,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// The in-flight bound, moved after every commit from the measured rate.
    shed: QueueTarget,
    in_flight: InFlight,
}

/// How often an unwritable store is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The writer dedups and rates: it counts as the rater stage, so one dashboard serves both modes.
const STAGE: &str = "rater";

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) -> Result<WriterStats, StoreError> {
        let mut stats = WriterStats::default();
        loop {
            // Blocks until a job or until every sink handle is dropped (shutdown); while the store
            // refuses writes, wakes once a second to probe it, so `/ready` comes back by itself
            // even when the load balancer sends no calls meanwhile.
            let first = if self.metrics.sink_writable() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(PROBE_EVERY) {
                    Ok(j) => j,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.probe();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut jobs = vec![first];
            let mut n = jobs[0].accepted.len();
            while n < MAX_RECORDS_PER_TXN {
                match rx.try_recv() {
                    Ok(j) => {
                        n += j.accepted.len();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            let started = std::time::Instant::now();
            match self.commit_batch(&jobs) {
                Ok(outcomes) => {
                    let total: usize = jobs.iter().map(|j| j.accepted.len() + j.refused.len()).sum();
                    let bound = self.shed.observe(total, started.elapsed());
                    self.in_flight.set_max(bound);
                    self.metrics.in_flight_limit.set(bound as i64);
                    if !self.metrics.sink_writable() {
                        tracing::info!("the store accepts writes again: ready");
                        self.metrics.set_sink_writable(true);
                    }
                    stats.transactions += 1;
                    let refused: usize = jobs.iter().map(|j| j.refused.len()).sum();
                    tracing::info!(
                        calls = jobs.len(),
                        records = n,
                        refused_by_validation = refused,
                        ms = started.elapsed().as_millis() as u64,
                        "group commit"
                    );
                    for (job, out) in jobs.into_iter().zip(outcomes) {
                        stats.records += (job.accepted.len() + job.refused.len()) as u64;
                        // A caller that went away is answered by nobody; its records are durable.
                        drop(job.reply.send(Ok(out)));
                    }
                }
                Err(e) => {
                    self.metrics.commit_failures.with_label_values(&[STAGE, "sqlite_group_commit"]).inc();
                    self.metrics.set_sink_writable(false);
                    tracing::error!(error = %e, "batch not written; callers get 503 and retry; /ready is 503 until a write commits");
                    for job in jobs {
                        drop(job.reply.send(Err(SinkError::Unavailable(e.to_string()))));
                    }
                }
            }
        }
        Ok(stats)
    }

    /// While the store refuses writes: tries one, and marks the sink writable when it commits.
    fn probe(&mut self) {
        match self.store.probe_write() {
            Ok(()) => {
                tracing::info!("the store accepts writes again: ready");
                self.metrics.set_sink_writable(true);
            }
            Err(e) => tracing::debug!(error = %e, "the store still refuses writes"),
        }
    }

    /// Decides, writes and commits one group of calls. On error nothing changed, in the database
    /// or in memory.
    fn commit_batch(&mut self, jobs: &[Job]) -> Result<Vec<Vec<SinkOutcome>>, StoreError> {
        let now = self.clock.now();
        // `meterline close` runs as another process: read the closed months at every batch (a
        // one-row table), so late usage follows the profile's policy from the close on.
        self.rater.set_closed_through(Store::closed_months(self.store.conn())?.last().copied());
        let book = self.book.current();
        let (event_to_rated, received_to_rated) = (
            self.metrics.event_to_rated_seconds.with_label_values(&[STAGE]),
            self.metrics.received_to_rated_seconds.with_label_values(&[STAGE]),
        );
        // The batch core decides, counts and renders; the records refused by validation pass
        // through it too, each call's after its decided ones (the rejected table's order).
        let mut effects = BatchEffects::new();
        for job in jobs {
            for record in &job.accepted {
                event_to_rated.observe((now.millis() - record.timestamp.millis()).max(0) as f64 / 1000.0);
                received_to_rated.observe((now.millis() - record.received_at.millis()).max(0) as f64 / 1000.0);
                if let Decision::Refused { record_id, rejection } = effects.decide(&mut self.rater, record, &book) {
                    tracing::debug!(record_id = %record_id, seller = %record.seller, product = %record.product, reason = rejection.code.as_str(), message = %rejection.message, "record refused");
                }
            }
            for r in &job.refused {
                effects.pass_refused(refusal_of(r));
            }
        }

        // Fold into staged lines, so a failed commit changes nothing in memory.
        let mut write = BatchWrite::default();
        let records = jobs.iter().flat_map(|j| &j.accepted);
        for (decision, record) in effects.decisions.iter().zip(records) {
            let Decision::Rated(rated) = decision else { continue };
            if self.rollup.stage(rated).is_err() {
                self.rater.rollback();
                self.rollup.rollback();
                return Err(StoreError::Corrupt {
                    table: "monthly_charges",
                    column: "amount",
                    value: "overflow".into(),
                });
            }
            write.rated.push((rated, record));
        }
        write.rejected = effects.refusals.iter().map(RejectedRow::from).collect();
        write.lines = self.rollup.staged().map(|(k, s)| (k.clone(), s.clone())).collect();
        write.counts = effects.counts.iter().collect();

        if let Err(e) = self.store.apply(&write) {
            self.rater.rollback();
            self.rollup.rollback();
            return Err(e);
        }
        // Durable: now make claims and sums permanent in memory.
        self.rater.commit();
        self.rollup.commit();
        self.rater.evict(now, book.windows().acceptance_ms);
        let BatchEffects { decisions, tally, amounts, .. } = effects;
        let m = &self.metrics;
        tally.flush(m, STAGE);
        for (currency, amount) in amounts.iter() {
            m.add_rated_amount(currency, amount);
        }
        m.commits.with_label_values(&[STAGE, "sqlite_group_commit"]).inc();
        m.batch_records
            .with_label_values(&[STAGE])
            .observe(jobs.iter().map(|j| j.accepted.len() + j.refused.len()).sum::<usize>() as f64);
        m.set_dedup(STAGE, 0, self.rater.dedup_keys(), self.rater.dedup_keys());

        // One answer per accepted record, call by call.
        let mut answers = decisions.into_iter().map(|d| match d {
            Decision::Rated(r) => SinkOutcome::Accepted { record_id: r.record_id },
            Decision::Identical { record_id } => SinkOutcome::AlreadyAccepted { record_id },
            Decision::Refused { record_id, rejection } => SinkOutcome::Refused { record_id, rejection },
        });
        Ok(jobs.iter().map(|j| answers.by_ref().take(j.accepted.len()).collect()).collect())
    }
}

/// A record refused by ingest validation, for the batch core (it has no resolved customer).
fn refusal_of(r: &RefusedRecord) -> Refusal {
    Refusal {
        received_at: r.received_at,
        seller: r.seller.clone(),
        product: r.product.clone(),
        customer: String::new(),
        record_id: r.record_id,
        rejection: r.rejection.clone(),
        raw: r.raw.clone(),
    }
}
