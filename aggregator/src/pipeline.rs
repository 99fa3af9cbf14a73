//! SHELL (distributed mode). Rated topic → monthly fold → ClickHouse, exactly once; rejected
//! and dead-letter topics → their tables, at least once into tables that collapse replays.
//!
//! How a replay after a crash changes nothing:
//! - Each invoice line is owned by one rated partition (lines are per customer and product, and
//!   the topics are keyed by product + customer). Folds are staged in the partition's
//!   `MonthlyRollup`; a flush writes, for every staged line, the
//!   line's full exact sums as a new row of `monthly_charges` (a `ReplacingMergeTree(version)`)
//!   with `version` = the last rated offset folded in. Replaying the same offsets rebuilds the
//!   same sums for the same versions: identical rows, collapsed. The staged lines are kept
//!   (`commit`) only once ClickHouse confirmed the flush.
//! - ClickHouse, not Kafka, is the source of truth for progress. At start each owned partition's
//!   state is loaded from ClickHouse (`load_partition`): its lines (FINAL), the last offset they
//!   include, and the dedup keys of line items up to that offset; the partition is then assigned
//!   (explicitly, no consumer-group protocol) right after that offset. Records at or below it are
//!   skipped should they come again; Kafka offsets are committed after each flush for lag
//!   monitoring only.
//! - Line items (`rated_usage`) are written before the lines in each flush; a crash between
//!   the two leaves line items past the committed offset, which are ignored on load and written
//!   again, identically, by the replay.
//! - A rated record whose dedup key was already folded (a zombie rater's copy) is skipped, so
//!   each (product, customer, dimension, hour) is charged once.
//! - ClickHouse down: the flush is retried with back-off and nothing more is consumed meanwhile
//!   (back-pressure is consumer lag, never memory growth or loss).
//!
//! What an error makes the aggregator do (classes of [`common::shell::ErrorClass`]):
//! - **transient** (ClickHouse refused the connection, timed out, answered 5xx or a passing
//!   code such as too many parts; Kafka brokers down): the load or flush is retried with bounded
//!   exponential back-off (200 ms doubling to 5 s), for as long as it takes.
//! - **poison** (an undecodable rated message, a record whose value does not fit its column):
//!   the message goes to `dead_letters` with the reason; the partition flows on.
//! - **fatal** (bad ClickHouse credentials or grants, a table whose schema is not the one this
//!   version writes, a corrupt stored row; a Kafka authorization or configuration error): the
//!   aggregator stops at once with [`AggregatorError::Refused`], which names the table and what
//!   to fix. Nothing unconfirmed is committed, so the restart after the fix replays.
//! - **shutdown** (SIGTERM, SIGINT) is watched inside every retry: the back-off wait ends at once,
//!   one last attempt of at most [`LAST_ATTEMPT`] writes what is pending if ClickHouse takes it,
//!   and otherwise the aggregator stops with [`AggregatorStats::stopped_unflushed`] set, having
//!   committed nothing it did not write (the `aggregator` binary then exits 128 + the signal).

use crate::rollup::MonthlyRollup;
use crate::sink::{self, ChargeRow, DeadLetterRow, RatedRow, RejectedRow, SinkError};
use clickhouse::Client;
use common::catalogue::PriceBook;
use common::catalogue_topic::{self, CatalogueFollower};
use common::codec;
use common::config::PipelineConfig;
use common::id::DedupKey;
use common::metrics::{Metrics, Outcome, RecordLabels};
use common::rated::RatedRecord;
use common::shell::{kafka_class, Backoff, ErrorClass};
use common::time::{Hour, Timestamp};
use common::topic::{DeadLetter, RejectedEvent};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What stopped the aggregator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AggregatorError {
    /// Kafka client failure.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A value that does not fit its column, or a stored row that does not parse back.
    #[error("{0}")]
    Sink(#[from] SinkError),
    /// ClickHouse refused `table` in a way retrying cannot fix (credentials, grants, schema).
    #[error("ClickHouse refused {table} (not retried): {source}. What to do: {advice}")]
    Refused {
        /// The table written or read.
        table: &'static str,
        /// What the operator fixes before restarting.
        advice: &'static str,
        /// The error.
        source: SinkError,
    },
    /// A rated record was rated under a catalogue change this aggregator did not learn in time.
    #[error("a rated record needs catalogue seq {need}, the catalogue topic gave only {have} within {waited:?}; a restart reads it again")]
    Catalogue {
        /// The seq the record was stamped with.
        need: i64,
        /// The seq this aggregator has.
        have: i64,
        /// How long it waited.
        waited: Duration,
    },
}

/// Longest the aggregator waits for the catalogue change a rated record was rated under.
const CATALOGUE_WAIT: Duration = Duration::from_secs(60);

impl AggregatorError {
    /// A non-transient ClickHouse error as the error that stops the aggregator.
    fn refused(e: SinkError) -> Self {
        match e.table() {
            Some(table) if e.class() == ErrorClass::Fatal => {
                AggregatorError::Refused { table, advice: e.advice(), source: e }
            }
            _ => AggregatorError::Sink(e),
        }
    }
}

/// Bound on the one write attempted once shutdown was asked for (ClickHouse hung, not down).
pub const LAST_ATTEMPT: Duration = Duration::from_secs(5);

/// Whether shutdown was asked for. Every wait of the aggregator (back-off, a hung insert) also
/// waits on it, so a signal is seen while ClickHouse is down.
#[derive(Debug, Clone)]
struct Stop(tokio::sync::watch::Receiver<bool>);

impl Stop {
    fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is asked for (never, if the asking side is gone without asking).
    async fn wait(&mut self) {
        if self.0.wait_for(|asked| *asked).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How a retried step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Done,
    /// Shutdown came first; nothing of the step was committed.
    Stopped,
}

/// Counters for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct AggregatorStats {
    /// Rated records folded into lines.
    pub folded: u64,
    /// Rated records skipped because their dedup key was already folded.
    pub duplicates_skipped: u64,
    /// Rated records skipped because ClickHouse already includes their offset.
    pub replay_skipped: u64,
    /// Flushes confirmed by ClickHouse.
    pub flushes: u64,
    /// Failed flush attempts (retried).
    pub flush_retries: u64,
    /// Rejected records written.
    pub rejected: u64,
    /// Dead letters written.
    pub dead_letters: u64,
    /// Partition loads from ClickHouse.
    pub loads: u64,
    /// Shutdown came while ClickHouse could not be written (or read): what was read since the
    /// last flush is not in ClickHouse and nothing of it was committed; the next start replays it.
    pub stopped_unflushed: bool,
}

/// One rated partition's state: lines, folded keys, and what the next flush writes.
#[derive(Debug, Default)]
struct PartState {
    /// Last offset ClickHouse includes.
    committed: Option<i64>,
    /// Last offset read.
    last_offset: Option<i64>,
    rollup: MonthlyRollup,
    /// Folded dedup keys per hour (stream-time window).
    seen: BTreeMap<i64, HashSet<u128>>,
    max_hour: i64,
    rows: Vec<RatedRow>,
    /// When each pending row's rated record was produced (ms), for the rated → ClickHouse latency.
    produced_ms: Vec<i64>,
    dead: Vec<DeadLetterRow>,
}

impl PartState {
    fn pending(&self) -> usize {
        self.rows.len() + self.dead.len()
    }
    fn seen_keys(&self) -> usize {
        self.seen.values().map(HashSet::len).sum()
    }
    /// Drops folded keys of hours the window no longer admits, in stream time (the newest hour
    /// folded stands for `now`).
    fn evict(&mut self, window_ms: i64) {
        let oldest = common::window::eviction_horizon(Hour(self.max_hour).start(), window_ms);
        self.seen = self.seen.split_off(&oldest.0);
    }
}

fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0),
    )
}

/// One insert, timed and counted (rows on success, an error otherwise).
async fn timed_insert<T>(m: &Metrics, client: &Client, table: &'static str, rows: &[T]) -> Result<(), SinkError>
where
    T: clickhouse::Row + clickhouse::RowWrite + for<'a> clickhouse::RowOwned,
    for<'a> T: clickhouse::Row<Value<'a> = T>,
{
    if rows.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let r = sink::insert_rows(client, table, rows).await;
    match &r {
        Ok(()) => {
            m.clickhouse_seconds.with_label_values(&[table]).observe(started.elapsed().as_secs_f64());
            m.clickhouse_rows.with_label_values(&[table]).inc_by(rows.len() as u64);
        }
        Err(_) => m.clickhouse_errors.with_label_values(&[table]).inc(),
    }
    r
}

/// The partitions of `topic` this instance owns: `configured`, or all of them.
async fn owned_partitions<C: ConsumerContext + 'static>(
    consumer: &StreamConsumer<C>,
    topic: &str,
    configured: Option<&[i32]>,
    stop: &mut Stop,
) -> Result<Option<Vec<i32>>, AggregatorError> {
    if let Some(list) = configured {
        return Ok(Some(list.to_vec()));
    }
    let mut backoff = Backoff::standard();
    for _ in 0..20 {
        // fetch_metadata blocks (up to its timeout): keep it off the runtime's worker.
        match tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), Duration::from_secs(5))) {
            Ok(md) => {
                let parts: Vec<i32> = md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
                if !parts.is_empty() {
                    return Ok(Some(parts));
                }
            }
            Err(e) if kafka_class(&e) == ErrorClass::Fatal => return Err(e.into()),
            Err(e) => tracing::warn!(topic, error = %e, "fetching partitions; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = stop.wait() => return Ok(None),
        }
    }
    Err(AggregatorError::Kafka(KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)))
}

/// The stage label the aggregator counts under.
const STAGE: &str = "aggregator";

/// The aggregator's shell state.
struct Aggregator<'a> {
    cfg: &'a PipelineConfig,
    client: Client,
    marketplace: String,
    window_ms: i64,
    parts: HashMap<i32, PartState>,
    rejected: Vec<RejectedRow>,
    side_dead: Vec<DeadLetterRow>,
    side_offsets: BTreeMap<(String, i32), i64>,
    /// Rated positions last committed to Kafka (advisory: for the lag gauge).
    lag_committed: HashMap<i32, i64>,
    stats: AggregatorStats,
    metrics: Arc<Metrics>,
    /// The catalogue, followed; `book` is the newest this aggregator has read, at `book_seq`
    /// (labels, and the channel parties of each line).
    catalogue: CatalogueFollower,
    book: Arc<PriceBook>,
    book_seq: i64,
    stop: Stop,
    /// A flush was given up at shutdown: its rows are gone from memory, so no later flush may
    /// write the lines without them.
    abandoned: bool,
}

/// Runs until `shutdown`, then flushes what is pending (if ClickHouse takes it) and returns.
pub async fn run(
    cfg: &PipelineConfig,
    catalogue: CatalogueFollower,
    client: Client,
    shutdown: impl Future<Output = ()>,
) -> Result<AggregatorStats, AggregatorError> {
    run_with_metrics(cfg, catalogue, client, Metrics::new("aggregator"), shutdown).await
}

/// [`run`], counting into `metrics` (stage `aggregator`).
pub async fn run_with_metrics(
    cfg: &PipelineConfig,
    catalogue: CatalogueFollower,
    client: Client,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<AggregatorStats, AggregatorError> {
    let (asked, stop) = tokio::sync::watch::channel(false);
    // The signal is polled beside the whole run, so every retry inside it can see it.
    let signal = async move {
        shutdown.await;
        asked.send_replace(true);
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = signal => unreachable!("the signal future never completes"),
        r = consume(cfg, catalogue, client, metrics, Stop(stop)) => r,
    }
}

async fn consume(
    cfg: &PipelineConfig,
    catalogue: CatalogueFollower,
    client: Client,
    metrics: Arc<Metrics>,
    stop: Stop,
) -> Result<AggregatorStats, AggregatorError> {
    let k = &cfg.kafka;
    metrics.set_config("partitions", i64::from(k.partitions));
    metrics.set_config("aggregator_flush_max_records", cfg.aggregator.flush_max_records as i64);
    let lag = common::kafka::LagContext { metrics: Arc::clone(&metrics), stage: STAGE };
    let rated: StreamConsumer<common::kafka::LagContext> =
        common::kafka::with_statistics(common::kafka::consumer_config(k, &cfg.aggregator.group))
            .create_with_context(lag)?;
    let side: StreamConsumer = common::kafka::consumer_config(k, &format!("{}-side", cfg.aggregator.group)).create()?;

    let (book_seq, book) = catalogue.snapshot();
    let mut agg = Aggregator {
        cfg,
        client,
        marketplace: book.marketplace().id.clone(),
        window_ms: book.windows().acceptance_ms,
        parts: HashMap::new(),
        rejected: Vec::new(),
        side_dead: Vec::new(),
        side_offsets: BTreeMap::new(),
        lag_committed: HashMap::new(),
        stats: AggregatorStats::default(),
        metrics,
        catalogue,
        book,
        book_seq,
        stop: stop.clone(),
        abandoned: false,
    };
    let mut stop = stop;
    let stopped = |mut stats: AggregatorStats| -> Result<AggregatorStats, AggregatorError> {
        tracing::warn!("aggregator stopped before it could start (ClickHouse or Kafka unavailable)");
        stats.stopped_unflushed = true;
        Ok(stats)
    };
    // Explicit assignment, no group protocol: progress lives in ClickHouse, so each partition
    // starts right after the offset its lines include (and concurrent writers of one partition
    // would converge on identical rows anyway). Scale out by giving instances disjoint
    // `aggregator.partitions`.
    let Some(owned) =
        owned_partitions(&rated, &k.topics.rated, cfg.aggregator.partitions.as_deref(), &mut stop).await?
    else {
        return stopped(agg.stats);
    };
    let mut tpl = TopicPartitionList::new();
    for &p in &owned {
        if agg.load(p).await? == Step::Stopped {
            return stopped(agg.stats);
        }
        let start = match agg.parts.get(&p).and_then(|st| st.committed) {
            Some(c) => Offset::Offset(c + 1),
            None => Offset::Beginning,
        };
        tpl.add_partition_offset(&k.topics.rated, p, start)?;
    }
    rated.assign(&tpl)?;
    // The side topics are written at least once into collapsing tables: resume from the group's
    // committed offsets.
    let mut side_tpl = TopicPartitionList::new();
    for topic in [&k.topics.rejected, &k.topics.dead_letter] {
        let Some(parts) = owned_partitions(&side, topic, cfg.aggregator.partitions.as_deref(), &mut stop).await? else {
            return stopped(agg.stats);
        };
        for p in parts {
            side_tpl.add_partition_offset(topic, p, Offset::Stored)?;
        }
    }
    side.assign(&side_tpl)?;
    tracing::info!(partitions = ?owned, "aggregator assigned");
    agg.metrics.set_ready(true);

    let interval = Duration::from_millis(cfg.aggregator.flush_interval_ms);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Order: stop, then flush, then new input — pending work is written before more is taken.
            biased;
            () = stop.wait() => {
                agg.metrics.set_ready(false);
                tracing::info!(pending = agg.pending(), "shutdown requested: flushing what is pending");
                // The flush makes one bounded attempt once shutdown is asked; the timeout is a
                // second bound on top (the Kafka commits after it).
                match tokio::time::timeout(2 * LAST_ATTEMPT, agg.flush(&rated, &side)).await {
                    Ok(Ok(Step::Done)) => tracing::info!(stats = ?agg.stats, "aggregator stopped: everything read is in ClickHouse"),
                    // Nothing is lost: ClickHouse holds the progress, the next start replays.
                    Ok(Ok(Step::Stopped)) => {
                        agg.stats.stopped_unflushed = true;
                        tracing::warn!("aggregator stopped without its last flush (ClickHouse unavailable); nothing unwritten was committed, the next start replays it");
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        agg.stats.stopped_unflushed = true;
                        tracing::warn!("aggregator stopped without its last flush (timed out); the next start replays it");
                    }
                }
                return Ok(agg.stats);
            }
            _ = tick.tick() => {
                agg.flush(&rated, &side).await?;
            }
            m = rated.recv() => match m {
                Ok(msg) => {
                    // A stopped load or flush is taken up by the shutdown branch next.
                    if agg.on_rated(&msg).await? == Step::Done && agg.pending() >= cfg.aggregator.flush_max_records {
                        agg.flush(&rated, &side).await?;
                    }
                }
                Err(e) if kafka_class(&e) == ErrorClass::Fatal => return Err(e.into()),
                Err(e) => tracing::warn!(error = %e, "consuming rated"),
            },
            m = side.recv() => match m {
                Ok(msg) => agg.on_side(&msg),
                Err(e) if kafka_class(&e) == ErrorClass::Fatal => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, "consuming rejected/dead-letter");
                    // On a new cluster the group coordinator may not exist yet when the assignment
                    // fetches its committed offsets; librdkafka then does not fetch them again and
                    // the side topics stall (seen on a fresh Kafka). Assigning afresh refetches.
                    if matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::NotCoordinator | rdkafka::types::RDKafkaErrorCode::CoordinatorNotAvailable)) {
                        side.unassign()?;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        side.assign(&side_tpl)?;
                    }
                }
            },
        }
    }
}

impl Aggregator<'_> {
    fn pending(&self) -> usize {
        self.parts.values().map(PartState::pending).sum::<usize>() + self.rejected.len() + self.side_dead.len()
    }

    /// Loads partition `p`'s state from ClickHouse, retrying transient errors until shutdown.
    async fn load(&mut self, p: i32) -> Result<Step, AggregatorError> {
        let since = common::window::eviction_horizon(now(), self.window_ms);
        let mut backoff = Backoff::standard();
        let mut stop = self.stop.clone();
        let snap = loop {
            let attempt = tokio::select! {
                r = sink::load_partition(&self.client, p, since) => r,
                () = stop.wait() => return Ok(Step::Stopped),
            };
            match attempt {
                Ok(s) => break s,
                Err(e) if e.class() == ErrorClass::Transient => {
                    let delay = backoff.next_delay();
                    tracing::warn!(partition = p, error = %e, retry_in_ms = delay.as_millis() as u64, "loading partition state; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.wait() => return Ok(Step::Stopped),
                    }
                }
                Err(e) => return Err(AggregatorError::refused(e)),
            }
        };
        let mut st = PartState { committed: snap.committed, last_offset: snap.committed, ..Default::default() };
        for (key, sums) in snap.lines {
            st.rollup.restore(key, sums);
        }
        for (hour, key) in snap.keys {
            if let Ok(k) = DedupKey::from_str(&key) {
                st.seen.entry(hour.0).or_default().insert(k.0);
                st.max_hour = st.max_hour.max(hour.0);
            }
        }
        tracing::info!(partition = p, committed = ?st.committed, lines = st.rollup.len(), "partition state loaded from ClickHouse");
        self.metrics.dedup_keys.with_label_values(&[STAGE, &p.to_string()]).set(st.seen_keys() as i64);
        self.stats.loads += 1;
        self.parts.insert(p, st);
        Ok(Step::Done)
    }

    async fn on_rated(&mut self, msg: &BorrowedMessage<'_>) -> Result<Step, AggregatorError> {
        let (p, o) = (msg.partition(), msg.offset());
        if !self.parts.contains_key(&p) && self.load(p).await? == Step::Stopped {
            return Ok(Step::Stopped);
        }
        let window_ms = self.window_ms;
        let st = self.parts.get_mut(&p).expect("state loaded above");
        if st.committed.is_some_and(|c| o <= c) {
            self.stats.replay_skipped += 1;
            return Ok(Step::Done);
        }
        st.last_offset = Some(o);
        let payload = msg.payload().unwrap_or_default();
        let r: RatedRecord = match common::rated::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(partition = p, offset = o, reason = %e, "undecodable rated message dead-lettered");
                self.metrics.dead_letters.with_label_values(&[STAGE]).inc();
                st.dead.push(DeadLetterRow::from(&DeadLetter {
                    source_topic: msg.topic().to_owned(),
                    source_partition: p,
                    source_offset: o,
                    stage: "aggregator".into(),
                    reason: e.to_string(),
                    payload: payload.to_vec(),
                    at: now(),
                }));
                return Ok(Step::Done);
            }
        };
        let need = catalogue_topic::required_seq(msg);
        if need > self.book_seq {
            if !tokio::task::block_in_place(|| self.catalogue.wait_for_seq(need, CATALOGUE_WAIT)) {
                return Err(AggregatorError::Catalogue { need, have: self.catalogue.seq(), waited: CATALOGUE_WAIT });
            }
            (self.book_seq, self.book) = self.catalogue.snapshot();
        }
        let hour = r.hour.0;
        let labels = RecordLabels::new(&self.book, &r.product, &r.seller);
        if st.seen.get(&hour).is_some_and(|s| s.contains(&r.dedup_key.0)) {
            self.stats.duplicates_skipped += 1;
            self.metrics.outcome(STAGE, &labels, Outcome::Duplicate);
            return Ok(Step::Done);
        }
        let row = match RatedRow::new(&r, p, o, now()) {
            Ok(row) => row,
            // Poison: this record can never be written (a value finer than its column). It is
            // kept in dead_letters with the reason, not folded, and the partition flows on.
            Err(e) if e.class() == ErrorClass::Poison => {
                tracing::warn!(partition = p, offset = o, record_id = %r.record_id, reason = %e, "rated record does not fit its columns: dead-lettered");
                self.metrics.dead_letters.with_label_values(&[STAGE]).inc();
                st.dead.push(DeadLetterRow::from(&DeadLetter {
                    source_topic: msg.topic().to_owned(),
                    source_partition: p,
                    source_offset: o,
                    stage: "aggregator".into(),
                    reason: e.to_string(),
                    payload: payload.to_vec(),
                    at: now(),
                }));
                return Ok(Step::Done);
            }
            Err(e) => return Err(AggregatorError::refused(e)),
        };
        // Staged until the flush that writes the line is confirmed.
        st.rollup.stage(&r).map_err(|e| SinkError::Corrupt { table: "monthly_charges", what: e.to_string() })?;
        st.seen.entry(hour).or_default().insert(r.dedup_key.0);
        if hour > st.max_hour {
            st.max_hour = hour;
            st.evict(window_ms);
        }
        st.rows.push(row);
        st.produced_ms.push(msg.timestamp().to_millis().unwrap_or_else(|| now().millis()));
        self.stats.folded += 1;
        self.metrics.outcome(STAGE, &labels, Outcome::Accepted);
        Ok(Step::Done)
    }

    /// Commits the rated consumer's positions to Kafka for the lag gauge (advisory: ClickHouse
    /// holds the progress). Everything consumed is folded and flushed by the time this runs, and
    /// the position is past the transaction markers that follow each of the rater's batches,
    /// which `last folded + 1` is not (the lag would never reach 0). `advanced` are the partitions
    /// just flushed, a floor for their position.
    fn commit_positions<C: ConsumerContext + 'static>(&mut self, rated: &StreamConsumer<C>, advanced: &[(i32, i64)]) {
        let topic = &self.cfg.kafka.topics.rated;
        let mut at: HashMap<i32, i64> = advanced.iter().map(|(p, last)| (*p, last + 1)).collect();
        if let Ok(positions) = rated.position() {
            for e in positions.elements_for_topic(topic) {
                if let Offset::Offset(o) = e.offset() {
                    let slot = at.entry(e.partition()).or_insert(o);
                    *slot = (*slot).max(o);
                }
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &at {
            if self.lag_committed.get(p).is_none_or(|c| c < o)
                && self.parts.get(p).is_some_and(|st| st.pending() == 0)
                && tpl.add_partition_offset(topic, *p, Offset::Offset(*o)).is_ok()
            {
                self.lag_committed.insert(*p, *o);
            }
        }
        if tpl.count() == 0 {
            return;
        }
        let m = &self.metrics;
        match rated.commit(&tpl, CommitMode::Async) {
            Ok(()) => m.commits.with_label_values(&[STAGE, "kafka_offsets"]).inc(),
            Err(e) => {
                m.commit_failures.with_label_values(&[STAGE, "kafka_offsets"]).inc();
                tracing::debug!(error = %e, "rated offset commit failed");
            }
        }
    }

    fn on_side(&mut self, msg: &BorrowedMessage<'_>) {
        let payload = msg.payload().unwrap_or_default();
        // Only messages this stage could not decode are its dead letters (the rater counts its own).
        let dead_before = if msg.topic() == self.cfg.kafka.topics.rejected { self.side_dead.len() } else { usize::MAX };
        let topics = &self.cfg.kafka.topics;
        if msg.topic() == topics.rejected {
            match codec::decode::<RejectedEvent>(payload) {
                Ok(ev) => self.rejected.push(RejectedRow::from(&ev)),
                Err(e) => self.side_dead.push(DeadLetterRow::from(&DeadLetter {
                    source_topic: msg.topic().to_owned(),
                    source_partition: msg.partition(),
                    source_offset: msg.offset(),
                    stage: "aggregator".into(),
                    reason: e.to_string(),
                    payload: payload.to_vec(),
                    at: now(),
                })),
            }
        } else {
            let row = match codec::decode::<DeadLetter>(payload) {
                Ok(d) => DeadLetterRow::from(&d),
                Err(e) => DeadLetterRow::from(&DeadLetter {
                    source_topic: msg.topic().to_owned(),
                    source_partition: msg.partition(),
                    source_offset: msg.offset(),
                    stage: "aggregator".into(),
                    reason: format!("dead letter itself undecodable: {e}"),
                    payload: payload.to_vec(),
                    at: now(),
                }),
            };
            self.side_dead.push(row);
        }
        self.side_offsets.insert((msg.topic().to_owned(), msg.partition()), msg.offset() + 1);
        self.metrics
            .dead_letters
            .with_label_values(&[STAGE])
            .inc_by(self.side_dead.len().saturating_sub(dead_before) as u64);
    }

    /// Writes everything pending (retrying transient errors with back-off until shutdown), then
    /// commits the Kafka offsets it covers. `Stopped`: shutdown came before ClickHouse took it;
    /// nothing was committed and no later flush runs.
    async fn flush<C: ConsumerContext + 'static>(
        &mut self,
        rated: &StreamConsumer<C>,
        side: &StreamConsumer,
    ) -> Result<Step, AggregatorError> {
        if self.abandoned {
            return Ok(Step::Stopped);
        }
        let t = now();
        let mut rows = Vec::new();
        let mut dead = std::mem::take(&mut self.side_dead);
        let mut lines = Vec::new();
        let mut advanced: Vec<(i32, i64)> = Vec::new();
        let mut produced_ms = Vec::new();
        for (p, st) in &mut self.parts {
            let Some(last) = st.last_offset else { continue };
            if st.committed == Some(last) {
                continue;
            }
            rows.append(&mut st.rows);
            produced_ms.append(&mut st.produced_ms);
            dead.append(&mut st.dead);
            for (key, sums) in st.rollup.staged() {
                // The channel the close computes (direct, cppo, dsor), not `direct` for all.
                let parties = crate::close::line_parties(&self.book, &sums.offer_id, &sums.seller);
                lines.push(ChargeRow::new(key, sums, &self.marketplace, &parties, *p, last, t)?);
            }
            advanced.push((*p, last));
        }
        let rejected = std::mem::take(&mut self.rejected);
        if rows.is_empty() && dead.is_empty() && lines.is_empty() && rejected.is_empty() && self.side_offsets.is_empty()
        {
            // Nothing new, but the consumer may have moved past transaction markers since.
            self.commit_positions(rated, &[]);
            return Ok(Step::Done);
        }
        let started = Instant::now();
        let mut backoff = Backoff::standard();
        let m = Arc::clone(&self.metrics);
        let mut stop = self.stop.clone();
        loop {
            let attempt = async {
                // Line items before lines: the lines are the commit marker.
                timed_insert(&m, &self.client, "rated_usage", &rows).await?;
                timed_insert(&m, &self.client, "dead_letters", &dead).await?;
                timed_insert(&m, &self.client, "rejected_records", &rejected).await?;
                timed_insert(&m, &self.client, "monthly_charges", &lines).await
            };
            let stopping = stop.requested();
            let result = if stopping {
                // The last attempt, bounded: a hung ClickHouse must not hold the shutdown.
                match tokio::time::timeout(LAST_ATTEMPT, attempt).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.abandoned = true;
                        return Ok(Step::Stopped);
                    }
                }
            } else {
                tokio::select! {
                    r = attempt => r,
                    // Abandon this attempt (an interrupted INSERT is a crash mid-flush: replayed
                    // identically) and make the bounded last one.
                    () = stop.wait() => continue,
                }
            };
            let e = match result {
                Ok(()) => break,
                Err(e) => e,
            };
            if e.class() != ErrorClass::Transient {
                return Err(AggregatorError::refused(e));
            }
            self.stats.flush_retries += 1;
            m.commit_failures.with_label_values(&[STAGE, "clickhouse_flush"]).inc();
            if stopping {
                tracing::warn!(error = %e, "ClickHouse insert failed at shutdown; not retrying");
                self.abandoned = true;
                return Ok(Step::Stopped);
            }
            let delay = backoff.next_delay();
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "ClickHouse insert failed; retrying, consuming nothing meanwhile");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                // Shutdown: no more back-off, straight to the last attempt.
                () = stop.wait() => {}
            }
        }
        self.stats.flushes += 1;
        self.stats.rejected += rejected.len() as u64;
        self.stats.dead_letters += dead.len() as u64;
        m.commits.with_label_values(&[STAGE, "clickhouse_flush"]).inc();
        m.batch_records.with_label_values(&[STAGE]).observe((rows.len() + dead.len() + rejected.len()) as f64);
        let done_ms = now().millis();
        let latency = m.rated_to_clickhouse_seconds.with_label_values(&[STAGE]);
        for p in &produced_ms {
            latency.observe((done_ms - p).max(0) as f64 / 1000.0);
        }
        let seen: usize = self.parts.values().map(PartState::seen_keys).sum();
        for (p, st) in &self.parts {
            m.set_dedup(STAGE, *p, st.seen_keys(), seen);
        }
        tracing::info!(
            rows = rows.len(),
            lines = lines.len(),
            rejected = rejected.len(),
            dead_letters = dead.len(),
            partitions = ?advanced.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            ms = started.elapsed().as_millis() as u64,
            "flushed to ClickHouse"
        );
        for (p, last) in &advanced {
            if let Some(st) = self.parts.get_mut(p) {
                st.committed = Some(*last);
                // ClickHouse holds the staged lines now.
                st.rollup.commit();
            }
        }
        self.commit_positions(rated, &advanced);
        if !self.side_offsets.is_empty() {
            let mut side_tpl = TopicPartitionList::new();
            for ((topic, p), o) in std::mem::take(&mut self.side_offsets) {
                side_tpl.add_partition_offset(&topic, p, Offset::Offset(o))?;
            }
            if let Err(e) = side.commit(&side_tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "side offset commit failed; the rows will be written again and collapse");
            }
        }
        Ok(Step::Done)
    }
}
