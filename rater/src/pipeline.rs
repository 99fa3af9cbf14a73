//! SHELL (distributed mode). Consume raw usage → decide (dedup + rating) → produce rated and
//! rejected records and the raw offsets in one Kafka transaction.
//!
//! Exactly-once effect, two lines of defence:
//! 1. **Kafka transactions.** Each batch is one transaction of a transactional producer: its
//!    rated, rejected and dead-letter records and the consumed raw offsets
//!    (`send_offsets_to_transaction` with the consumer's group metadata) commit together or not at
//!    all, and every reader (`aggregator`, the rebuild replay) is `read_committed`. A zombie (an
//!    instance paused past its session timeout while its partitions moved on) is fenced: its
//!    offsets carry a stale group generation, so its commit fails and its records are aborted;
//!    a restarted instance with the same `rater.instance_id` fences its predecessor's open
//!    transaction when it starts. An aborted batch rolls its dedup claims back and rewinds the
//!    consumer to the committed offsets.
//! 2. **Deterministic ids**, independent of the broker: every rated record carries an id derived
//!    from its dedup key and goes to the rated partition with the raw partition's number. Dedup
//!    state is per raw partition, rebuilt on (re)assignment by replaying the matching rated
//!    partition over the acceptance window plus slack ([`common::kafka::replay_partition`]), so a
//!    redelivered raw record is an identical resend and produces nothing; the aggregator folds
//!    each dedup key once and ClickHouse writes are versioned.
//!
//! Closed months: each batch is decided under the latest close the [`crate::closed`] follower
//! knows when the batch begins; a batch a close overtook is aborted just before its commit and
//! decided again under the close.
//!
//! The group uses the cooperative-sticky assignor: a member joining or leaving moves only the
//! partitions that change owner. Undecodable raw messages go to the dead-letter topic with the
//! reason; the partition flows on. A fatal producer error (fenced by a newer instance of the same
//! id) ends the process with an error; the supervisor restarts it and the rebuild takes over.
//!
//! Errors by class ([`RaterError::class`], [`common::shell::kafka_class`]): **transient** — a
//! full local producer queue waits 10 ms off the runtime's worker and resends; a consume error
//! is logged and consumption goes on; a failed delivery or an abortable transaction aborts the
//! batch, which is decided again. **Poison** — an undecodable raw message is dead-lettered.
//! **Fatal** — a fenced producer, an authorization or configuration error (also on consume):
//! the rater stops with the error.

use crate::batch::BatchEffects;
use crate::decision::{Decision, Rater};
use crate::fill::{Fill, FillPolicy};
use crate::reply::{self, Replies};
use common::catalogue::PriceBook;
use common::catalogue_topic::{self, CatalogueFollower};
use common::codec;
use common::config::PipelineConfig;
use common::metrics::{Histogram, Metrics};
use common::shell::{kafka_class, ErrorClass};
use common::time::{Clock, SystemClock, Timestamp};
use common::topic::{partition_key, DeadLetter, Decided};
use common::usage::UsageRecord;
use futures::future::join_all;
use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaError};
use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bound on each blocking transactional call (init, send offsets, commit, abort).
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a transactional call may run past [`TXN_TIMEOUT`] before the rater gives up on it.
/// librdkafka does not always honour the timeout: `send_offsets_to_transaction` was seen waiting
/// forever after a broker's kill -9 (the group coordinator moving). Nothing can be done with the
/// producer while one of its calls is in flight, so the rater stops with [`RaterError::Stalled`]
/// (transient): the restart fences the open transaction and rebuilds, exactly once as ever.
const TXN_STALL: Duration = Duration::from_secs(45);

/// Longest a rater waits for a catalogue change a raw record was validated under (published
/// before the record, so normally there within the follower's poll).
const CATALOGUE_WAIT: Duration = Duration::from_secs(60);

/// What stopped the rater.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RaterError {
    /// Client creation, consumption or commit failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A produced record was not acknowledged.
    #[error("producing to {topic}: {reason}")]
    Produce {
        /// Topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// The closed-months follower could not start.
    #[error("closed months: {0}")]
    ClosedMonths(#[from] crate::closed::FollowError),
    /// A raw record was validated under a catalogue change this rater did not learn in time.
    #[error("a raw record needs catalogue seq {need}, the catalogue topic gave only {have} within {waited:?}")]
    Catalogue {
        /// The seq the record was stamped with.
        need: i64,
        /// The seq this rater has.
        have: i64,
        /// How long it waited.
        waited: Duration,
    },
    /// A transactional call did not return within [`TXN_STALL`].
    #[error("the Kafka call `{step}` did not return within {after:?} (librdkafka ignored its timeout)")]
    Stalled {
        /// The call.
        step: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// The operating system refused a thread for a transactional call.
    #[error("starting a thread for `{step}`: {source}")]
    NoThread {
        /// The call.
        step: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The dedup rebuild of a partition failed.
    #[error("rebuilding partition {partition} from {topic}: {source}")]
    Rebuild {
        /// Rated topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Cause.
        source: KafkaError,
    },
}

impl RaterError {
    /// What the caller does about this error. Every variant ends the run (the supervisor's
    /// restart and the rebuild are the retry); the class says whether restarting can help.
    pub fn class(&self) -> ErrorClass {
        match self {
            RaterError::Kafka(e) | RaterError::Rebuild { source: e, .. } => kafka_class(e),
            // librdkafka already retried the delivery for `message.timeout.ms`.
            RaterError::Produce { .. } => ErrorClass::Transient,
            // The restart fences the stuck transaction.
            RaterError::Stalled { .. } | RaterError::NoThread { .. } => ErrorClass::Transient,
            RaterError::ClosedMonths(crate::closed::FollowError::Kafka(e)) => kafka_class(e),
            // The topic not read in time, or no thread: a restart tries again.
            RaterError::ClosedMonths(_) => ErrorClass::Transient,
            // The record stays uncommitted; a restarted rater reads the topic again.
            RaterError::Catalogue { .. } => ErrorClass::Transient,
        }
    }
}

/// Counters for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct RaterStats {
    /// Raw records decided.
    pub decided: u64,
    /// Rated records produced.
    pub rated: u64,
    /// Identical resends (nothing produced).
    pub identical: u64,
    /// Refused records produced to the rejected topic.
    pub refused: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Partition rebuilds.
    pub rebuilds: u64,
    /// Batches committed.
    pub batches: u64,
    /// Batches whose transaction was aborted (and decided again).
    pub aborted: u64,
}

/// Records revoked partitions so their state is dropped (and rebuilt if they come back), and
/// reports consumer lag from librdkafka's statistics.
#[derive(Clone)]
struct RebalanceLog(Arc<Mutex<Vec<i32>>>, Arc<Metrics>);

impl ClientContext for RebalanceLog {
    fn stats(&self, statistics: rdkafka::Statistics) {
        common::kafka::report_lag(&self.1, STAGE, &statistics);
    }
}
impl ConsumerContext for RebalanceLog {
    fn pre_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?partitions, "partitions revoked: their dedup state is dropped");
            if let Ok(mut revoked) = self.0.lock() {
                revoked.extend(partitions);
            }
        }
    }

    fn post_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?partitions, "partitions assigned: each is rebuilt on its first record");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Runs the rater until `shutdown` resolves (then finishes and commits the current batch).
pub async fn run(
    cfg: &PipelineConfig,
    catalogue: CatalogueFollower,
    shutdown: impl Future<Output = ()>,
) -> Result<RaterStats, RaterError> {
    run_with_metrics(cfg, catalogue, Metrics::new("rater"), shutdown).await
}

/// [`run`], counting into `metrics` (stage `rater`).
pub async fn run_with_metrics(
    cfg: &PipelineConfig,
    catalogue: CatalogueFollower,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<RaterStats, RaterError> {
    run_with_clock(cfg, catalogue, metrics, Arc::new(SystemClock), shutdown).await
}

/// [`run_with_metrics`], reading `now` (rebuild start, eviction, latencies) from `clock`.
///
/// Each batch is decided under one catalogue version, the newest `catalogue` has when the batch
/// opens, and every rated record carries it (`price_book_version`, and the seq in the
/// [`catalogue_topic::SEQ_HEADER`] the aggregator waits on). A raw record stamped with a newer
/// catalogue than the batch's cuts the batch and opens the next one, once the follower has it.
pub async fn run_with_clock(
    cfg: &PipelineConfig,
    catalogue: CatalogueFollower,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> Result<RaterStats, RaterError> {
    let k = &cfg.kafka;
    let revoked = RebalanceLog(Arc::default(), Arc::clone(&metrics));
    let consumer: StreamConsumer<RebalanceLog> =
        common::kafka::with_statistics(common::kafka::consumer_config(k, &cfg.rater.group))
            .create_with_context(revoked.clone())?;
    consumer.subscribe(&[k.topics.raw.as_str()])?;
    let transactional_id = cfg.rater.transactional_id();
    let producer: FutureProducer =
        common::kafka::transactional_producer_config(k, &transactional_id, cfg.rater.transaction_timeout_ms)
            .create()?;
    // Fences any earlier producer with this id and aborts its open transaction.
    let p = producer.clone();
    bounded_step("init transactions", move || p.init_transactions(TXN_TIMEOUT))??;
    tracing::info!(transactional_id, "transactional producer ready");
    // Every close published so far is known before the first decision (see `closed`).
    let closed = tokio::task::block_in_place(|| crate::closed::follow(k, &cfg.rater.group))?;
    let mut states: HashMap<i32, Rater> = HashMap::new();
    let mut stats = RaterStats::default();
    let window_ms = catalogue.snapshot().1.windows().acceptance_ms;
    let fill = FillPolicy {
        max_batch: cfg.rater.max_batch,
        linger: Duration::from_millis(cfg.rater.linger_ms),
        max_age: Duration::from_millis(cfg.rater.max_batch_age_ms),
    };
    let obs = Observer::new(metrics, cfg, &catalogue.snapshot().1, &producer);
    tokio::pin!(shutdown);
    let mut stopping = false;
    // The record that cut the last batch because it needs a newer catalogue: this batch's first.
    let mut carried: Option<BorrowedMessage<'_>> = None;

    while !stopping {
        if let Some(m) = &carried {
            // Its partition moved to another rater meanwhile: that rater decides it (it was
            // never committed here).
            if revoked.0.lock().is_ok_and(|r| r.contains(&m.partition())) {
                carried = None;
            }
        }
        if let Some(m) = &carried {
            let need = catalogue_topic::required_seq(m);
            if !tokio::task::block_in_place(|| catalogue.wait_for_seq(need, CATALOGUE_WAIT)) {
                return Err(RaterError::Catalogue { need, have: catalogue.seq(), waited: CATALOGUE_WAIT });
            }
        }
        let (book_seq, book) = catalogue.snapshot();
        let mut batch = Batch::new();
        let mut first = carried.take();
        // Fill a batch (see `fill`): wait for records until the linger runs out, then take only
        // records already waiting (the rater lags), up to max_batch or the batch's max age.
        loop {
            let msg = if let Some(m) = first.take() {
                m
            } else {
                let age = batch.opened.map_or(Duration::ZERO, |at| at.elapsed());
                let wait = match fill.next(batch.len, batch.started.elapsed(), age) {
                    Fill::Wait(wait) => wait,
                    // A zero timeout still polls the receive once: a record librdkafka already
                    // holds is taken, none cuts the batch (the timeout branch below).
                    Fill::TakeReady => Duration::ZERO,
                    Fill::Cut => break,
                };
                tokio::select! {
                    // Finish the current batch before taking more when asked to stop.
                    biased;
                    () = &mut shutdown => {
                        stopping = true;
                        obs.metrics.set_ready(false);
                        tracing::info!(records = batch.len, "shutdown requested: finishing the current batch");
                        break;
                    }
                    m = tokio::time::timeout(wait, consumer.recv()) => match m {
                        Err(_) => {
                            if batch.len > 0 { break }
                            continue;
                        }
                        Ok(Err(e)) if kafka_class(&e) == ErrorClass::Fatal => return Err(e.into()),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "consume error");
                            continue;
                        }
                        Ok(Ok(msg)) => msg,
                    }
                }
            };
            if catalogue_topic::required_seq(&msg) > book_seq {
                carried = Some(msg);
                break;
            }
            drop_revoked(&revoked, &mut states);
            if batch.len == 0 {
                batch.opened = Some(Instant::now());
                blocking_step("begin transaction", || producer.begin_transaction())?;
                // The group generation these records are consumed under: the commit
                // presents it, so a batch that outlived a rebalance (a zombie's) is
                // refused by the broker even if this instance has rejoined since.
                batch.group = consumer.group_metadata();
                batch.closed_through = closed.get();
            }
            let p = msg.partition();
            let rater = match states.entry(p) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    stats.rebuilds += 1;
                    tracing::info!(partition = p, "rebuilding the partition's dedup state");
                    e.insert(rebuild(cfg, p, window_ms, clock.now()).await?)
                }
            };
            rater.set_closed_through(batch.closed_through);
            let at = clock.now();
            decide_one(&msg, rater, (book_seq, &book), cfg, &producer, &mut batch, &mut stats, &obs, at)?;
        }
        if batch.len > 0 {
            // The asking calls' decisions join the same transaction (see `reply`).
            for (partition, decisions) in batch.replies.drain().collect::<Vec<_>>() {
                let payload = codec::encode(&decisions);
                send(&producer, &cfg.kafka.topics.decisions, Some(partition), &[], &payload, None, &mut batch)?;
            }
            let aborted = stats.aborted;
            commit_batch(&consumer, &producer, batch, &closed, &mut states, &mut stats, &obs).await?;
            if stats.aborted > aborted {
                // The consumer rewound past the carried record: it comes again, in order.
                carried = None;
            }
            let now = clock.now();
            for r in states.values_mut() {
                r.evict(now, window_ms);
            }
            obs.dedup(&states);
        }
    }
    tracing::info!(?stats, "rater stopped: last batch committed");
    Ok(stats)
}

/// The rater's metric handles, looked up once.
struct Observer {
    metrics: Arc<Metrics>,
    event_to_rated: Histogram,
    received_to_rated: Histogram,
}

impl Observer {
    fn new(metrics: Arc<Metrics>, cfg: &PipelineConfig, book: &PriceBook, producer: &FutureProducer) -> Self {
        metrics.init_catalogue(STAGE, book);
        metrics.set_config("partitions", i64::from(cfg.kafka.partitions));
        metrics.set_config("rater_max_batch", cfg.rater.max_batch as i64);
        metrics.dedup_budget.with_label_values(&[STAGE]).set(cfg.rater.dedup_memory_budget_bytes as i64);
        let p = producer.clone();
        metrics.on_scrape(move |m| m.producer_queue.with_label_values(&[STAGE]).set(i64::from(p.in_flight_count())));
        metrics.set_ready(true);
        Observer {
            event_to_rated: metrics.event_to_rated_seconds.with_label_values(&[STAGE]),
            received_to_rated: metrics.received_to_rated_seconds.with_label_values(&[STAGE]),
            metrics,
        }
    }

    fn dedup(&self, states: &HashMap<i32, Rater>) {
        let total: usize = states.values().map(Rater::dedup_keys).sum();
        for (p, r) in states {
            self.metrics.set_dedup(STAGE, *p, r.dedup_keys(), total);
        }
        if states.is_empty() {
            self.metrics.dedup_bytes.with_label_values(&[STAGE]).set(0);
        }
    }
}

/// The stage label the rater counts under.
const STAGE: &str = "rater";

struct Batch<'o> {
    len: usize,
    deliveries: Vec<(String, DeliveryFuture)>,
    /// Next offset to commit per partition.
    next_offsets: BTreeMap<i32, i64>,
    topic: String,
    /// What the decided records produced (outcomes, amounts per currency), counted into the
    /// registry once the batch is committed.
    effects: BatchEffects<'o>,
    dead_lettered: u64,
    started: Instant,
    /// When the batch's first record came (its transaction began): the age `max_batch_age_ms`
    /// bounds.
    opened: Option<Instant>,
    /// The consumer's group metadata when the batch's transaction began.
    group: Option<rdkafka::consumer::ConsumerGroupMetadata>,
    /// Decisions to send back to the ingest calls that asked.
    replies: Replies,
    /// The closed-through month every decision of the batch was made under.
    closed_through: Option<common::time::Month>,
}

impl Batch<'_> {
    fn new() -> Self {
        Batch {
            len: 0,
            deliveries: Vec::new(),
            next_offsets: BTreeMap::new(),
            topic: String::new(),
            effects: BatchEffects::new(),
            dead_lettered: 0,
            started: Instant::now(),
            opened: None,
            group: None,
            replies: Replies::default(),
            closed_through: None,
        }
    }
}

fn drop_revoked(log: &RebalanceLog, states: &mut HashMap<i32, Rater>) {
    if let Ok(mut revoked) = log.0.lock() {
        for p in revoked.drain(..) {
            states.remove(&p);
        }
    }
}

/// Rebuilds partition `p`'s dedup state from the rated partition `p`, over the span eviction keeps
/// at `now`.
async fn rebuild(cfg: &PipelineConfig, p: i32, window_ms: i64, now: Timestamp) -> Result<Rater, RaterError> {
    let k = cfg.kafka.clone();
    let since = common::window::replay_start(now, window_ms);
    let started = Instant::now();
    let topic = k.topics.rated.clone();
    let (rater, n) = tokio::task::spawn_blocking(move || {
        let mut rater = Rater::new();
        let mut undecodable = 0u64;
        let n =
            common::kafka::replay_partition(&k, &k.topics.rated, p, since, Duration::from_secs(120), |_, payload| {
                match common::rated::decode(payload) {
                    Ok(r) => rater.restore(&r),
                    Err(_) => undecodable += 1,
                }
            });
        (rater, n)
    })
    .await
    .map_err(|e| RaterError::Produce { topic: topic.clone(), reason: format!("rebuild task failed: {e}") })?;
    let n = n.map_err(|source| RaterError::Rebuild { topic, partition: p, source })?;
    tracing::info!(
        partition = p,
        replayed = n,
        dedup_keys = rater.dedup_keys(),
        ms = started.elapsed().as_millis() as u64,
        "partition state rebuilt"
    );
    Ok(rater)
}

#[allow(clippy::too_many_arguments)]
fn decide_one<'b>(
    msg: &BorrowedMessage<'_>,
    rater: &mut Rater,
    (book_seq, book): (i64, &'b PriceBook),
    cfg: &PipelineConfig,
    producer: &FutureProducer,
    batch: &mut Batch<'b>,
    stats: &mut RaterStats,
    obs: &Observer,
    now: Timestamp,
) -> Result<(), RaterError> {
    let t = &cfg.kafka.topics;
    let p = msg.partition();
    batch.len += 1;
    batch.topic = msg.topic().to_owned();
    batch.next_offsets.insert(p, msg.offset() + 1);
    let payload = msg.payload().unwrap_or_default();
    let reply_to = reply::reply_to(msg, cfg.kafka.partitions);
    let record: UsageRecord = match codec::decode(payload) {
        Ok(r) => r,
        Err(e) => {
            if let Some(to) = reply_to {
                batch.replies.add(to, Decided::Undecodable { reason: e.to_string() });
            }
            let dl = DeadLetter {
                source_topic: msg.topic().to_owned(),
                source_partition: p,
                source_offset: msg.offset(),
                stage: "rater".into(),
                reason: e.to_string(),
                payload: payload.to_vec(),
                at: now,
            };
            tracing::warn!(partition = p, offset = msg.offset(), reason = %e, "undecodable raw message dead-lettered");
            stats.dead_lettered += 1;
            batch.dead_lettered += 1;
            let bytes = codec::encode(&dl);
            return send(producer, &t.dead_letter, None, &[], &bytes, None, batch);
        }
    };
    stats.decided += 1;
    let key = partition_key(&record.product, &record.customer);
    obs.event_to_rated.observe(secs_between(record.timestamp, now));
    obs.received_to_rated.observe(secs_between(record.received_at, now));
    // The core decides and counts; this is the one place each message's outcome is known.
    let decision = batch.effects.decide(rater, &record, book);
    if let Some(to) = reply_to {
        batch.replies.add(to, reply::decided(decision));
    }
    let bytes = match decision {
        Decision::Rated(r) => {
            stats.rated += 1;
            Some((&t.rated, Some(p), codec::encode(r), catalogue_topic::stamp(book_seq)))
        }
        Decision::Identical { .. } => {
            stats.identical += 1;
            None
        }
        Decision::Refused { record_id, rejection } => {
            stats.refused += 1;
            tracing::debug!(record_id = %record_id, seller = %record.seller, product = %record.product, reason = rejection.code.as_str(), message = %rejection.message, "record refused");
            let refusal = batch.effects.refusals.last().expect("a refused decision adds its refusal");
            Some((&t.rejected, None, codec::encode(&refusal.to_event()), None))
        }
    };
    match bytes {
        Some((topic, partition, payload, headers)) => send(producer, topic, partition, &key, &payload, headers, batch),
        None => Ok(()),
    }
}

/// A transactional or broker step slower than this is logged with its name: a stall in
/// distributed mode shows up as a call no rater answered, and the log must say where it waited.
const SLOW_STEP: Duration = Duration::from_secs(2);

/// Runs the blocking `step` off the runtime's worker, logging it when it took over [`SLOW_STEP`].
fn blocking_step<T>(name: &str, step: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = tokio::task::block_in_place(step);
    log_if_slow(name, started);
    out
}

/// [`blocking_step`] for a transactional call: it runs on a thread of its own and is given
/// [`TXN_STALL`]; past that the rater stops with [`RaterError::Stalled`] and leaves the thread
/// stuck in librdkafka behind (the process exits next).
fn bounded_step<T: Send + 'static>(
    name: &'static str,
    step: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RaterError> {
    let started = Instant::now();
    let (done, result) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("kafka {name}"))
        .spawn(move || done.send(step()).ok())
        .map_err(|source| RaterError::NoThread { step: name, source })?;
    let out = tokio::task::block_in_place(|| result.recv_timeout(TXN_STALL));
    log_if_slow(name, started);
    out.map_err(|_| {
        tracing::error!(
            step = name,
            after_ms = TXN_STALL.as_millis() as u64,
            "Kafka call stuck past its timeout: stopping so a restart fences the transaction"
        );
        RaterError::Stalled { step: name, after: TXN_STALL }
    })
}

fn log_if_slow(name: &str, started: Instant) {
    if started.elapsed() > SLOW_STEP {
        tracing::warn!(step = name, ms = started.elapsed().as_millis() as u64, "slow Kafka step");
    }
}

/// Seconds from `from` to `to` (0 when `from` is later: clocks of two machines).
fn secs_between(from: Timestamp, to: Timestamp) -> f64 {
    (to.millis() - from.millis()).max(0) as f64 / 1000.0
}

fn send(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    key: &[u8],
    payload: &[u8],
    headers: Option<OwnedHeaders>,
    batch: &mut Batch<'_>,
) -> Result<(), RaterError> {
    let mut rec = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(h) = headers {
        rec = rec.headers(h);
    }
    if let Some(p) = partition {
        rec = rec.partition(p);
    }
    loop {
        match producer.send_result(rec) {
            Ok(f) => {
                batch.deliveries.push((topic.to_owned(), f));
                return Ok(());
            }
            // The local queue is full (transient): give librdkafka's delivery thread a moment,
            // then retry the same record (bounded by the queue, never by our memory). The wait
            // is synchronous because `send` runs inside the synchronous decide step; the rater
            // runs on the multi-threaded runtime, so `block_in_place` hands this worker's other
            // tasks (metrics, replies) to another thread meanwhile.
            Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(10)));
                rec = r;
            }
            Err((e, _)) => return Err(RaterError::Produce { topic: topic.to_owned(), reason: e.to_string() }),
        }
    }
}

/// Waits for every output of the batch, then commits the batch's transaction with its raw
/// offsets and makes the dedup claims permanent. An abortable failure (a rebalance moved a
/// partition, a delivery failed) aborts the transaction instead: the claims are rolled back and
/// the consumer rewinds to the committed offsets, so the batch is decided again by whoever owns
/// each partition now. So does a close the rater learnt while the batch was open (`closed` moved
/// past the month the batch was decided under): the batch is decided again under the close.
/// Only a fatal error (this producer was fenced) ends the rater.
async fn commit_batch(
    consumer: &StreamConsumer<RebalanceLog>,
    producer: &FutureProducer,
    batch: Batch<'_>,
    closed: &crate::closed::ClosedThrough,
    states: &mut HashMap<i32, Rater>,
    stats: &mut RaterStats,
    obs: &Observer,
) -> Result<(), RaterError> {
    let m = &obs.metrics;
    let (topics, futures): (Vec<String>, Vec<DeliveryFuture>) = batch.deliveries.into_iter().unzip();
    let mut failure = None;
    let waited = Instant::now();
    let delivered = join_all(futures).await;
    log_if_slow("deliveries", waited);
    for (topic, d) in topics.into_iter().zip(delivered) {
        let reason = match d {
            Ok(Ok(_)) => continue,
            Ok(Err((e, _))) => e.to_string(),
            Err(_) => "delivery report lost".into(),
        };
        m.delivery_errors.with_label_values(&[STAGE, &topic]).inc();
        failure.get_or_insert(format!("producing to {topic}: {reason}"));
    }
    // Checked as late as possible, just before the commit: see "Closed months" in ARCHITECTURE.md.
    if failure.is_none() && closed.get() != batch.closed_through {
        failure = Some("a month was closed while the batch was open".to_owned());
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &batch.next_offsets {
        tpl.add_partition_offset(&batch.topic, *p, Offset::Offset(*o))?;
    }
    let outcome = match (failure, batch.group) {
        (Some(reason), _) => Err(reason),
        (None, None) => Err("the consumer had no group metadata when the batch began".to_owned()),
        (None, Some(group)) => {
            let (p, offsets) = (producer.clone(), tpl.clone());
            bounded_step("commit transaction", move || commit_transaction(&group, &p, &offsets))?
        }
    };
    if let Err(reason) = outcome {
        m.commit_failures.with_label_values(&[STAGE, "kafka_transaction"]).inc();
        tracing::warn!(records = batch.len, reason = %reason, "batch transaction aborted: its records will be decided again");
        let p = producer.clone();
        bounded_step("abort transaction", move || p.abort_transaction(TXN_TIMEOUT))??;
        for r in states.values_mut() {
            r.rollback();
        }
        rewind(consumer, &batch.topic, &batch.next_offsets);
        stats.aborted += 1;
        return Ok(());
    }
    for r in states.values_mut() {
        r.commit();
    }
    // The consumer cannot see offsets committed by the producer's transaction: store them locally
    // (never committed by the consumer, auto-commit is off) so its lag statistics follow.
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::debug!(error = %e, "storing committed offsets for lag statistics failed (a partition moved)");
    }
    m.commits.with_label_values(&[STAGE, "kafka_transaction"]).inc();
    stats.batches += 1;
    // The outputs are committed: count the batch, and log it in one line.
    m.batch_records.with_label_values(&[STAGE]).observe(batch.len as f64);
    m.dead_letters.with_label_values(&[STAGE]).inc_by(batch.dead_lettered);
    let mut per_currency = Vec::new();
    for (currency, amount) in batch.effects.amounts.iter() {
        m.add_rated_amount(currency, amount);
        per_currency.push(format!("{amount} {currency}"));
    }
    batch.effects.tally.flush(m, STAGE);
    tracing::info!(
        records = batch.len,
        dead_lettered = batch.dead_lettered,
        partitions = ?batch.next_offsets.keys().collect::<Vec<_>>(),
        rated_amount = %per_currency.join(", "),
        ms = batch.started.elapsed().as_millis() as u64,
        totals = ?stats,
        "batch committed"
    );
    Ok(())
}

/// Adds the raw offsets to the open transaction and commits it, retrying retriable errors within
/// [`TXN_TIMEOUT`]. `Err` carries the reason; the caller aborts. A fatal error (a fenced producer) then
/// fails the abort too, which ends the rater.
fn commit_transaction(
    group: &rdkafka::consumer::ConsumerGroupMetadata,
    producer: &FutureProducer,
    offsets: &TopicPartitionList,
) -> Result<(), String> {
    // One budget for every attempt, so the whole commit stays within TXN_STALL.
    let deadline = Instant::now() + TXN_TIMEOUT;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    let mut attempt = 0;
    loop {
        let result = producer
            .send_offsets_to_transaction(offsets, group, left())
            .and_then(|()| producer.commit_transaction(left()));
        match result {
            Ok(()) => return Ok(()),
            Err(e) if retriable(&e) && Instant::now() < deadline => {
                tracing::warn!(attempt, error = %e, "committing the batch transaction failed; retrying");
                attempt += 1;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn retriable(e: &KafkaError) -> bool {
    let inner: Option<&RDKafkaError> = match e {
        KafkaError::Transaction(t) => Some(t),
        _ => None,
    };
    inner.is_some_and(|t| t.is_retriable() && !t.txn_requires_abort() && !t.is_fatal())
}

/// Seeks every partition of the aborted batch back to its committed offset (the start of the
/// topic when none is committed). A partition no longer assigned cannot be sought: its new owner
/// starts from the same committed offset anyway.
fn rewind(consumer: &StreamConsumer<RebalanceLog>, topic: &str, partitions: &BTreeMap<i32, i64>) {
    let mut tpl = TopicPartitionList::new();
    for p in partitions.keys() {
        tpl.add_partition(topic, *p);
    }
    let committed = match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "reading committed offsets to rewind failed; the next rebalance or restart redelivers");
            return;
        }
    };
    for e in committed.elements() {
        let to = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        if let Err(err) = consumer.seek(topic, e.partition(), to, Duration::from_secs(10)) {
            tracing::debug!(partition = e.partition(), error = %err, "not rewound (no longer assigned)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as C;

    #[test]
    fn a_fenced_producer_or_a_refused_group_is_fatal_and_a_broker_outage_transient() {
        let fenced = RaterError::Kafka(KafkaError::MessageProduction(C::ProducerFenced));
        assert_eq!(fenced.class(), ErrorClass::Fatal);
        let refused = RaterError::Kafka(KafkaError::MessageConsumption(C::GroupAuthorizationFailed));
        assert_eq!(refused.class(), ErrorClass::Fatal);
        let down = RaterError::Rebuild {
            topic: "rated".into(),
            partition: 3,
            source: KafkaError::MessageConsumption(C::AllBrokersDown),
        };
        assert_eq!(down.class(), ErrorClass::Transient);
        let undelivered = RaterError::Produce { topic: "rated".into(), reason: "Message timed out".into() };
        assert_eq!(undelivered.class(), ErrorClass::Transient);
    }
}
