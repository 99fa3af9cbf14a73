//! SHELL (distributed mode). Consume raw usage → decide (dedup + rating) → produce rated and
//! rejected records → commit the raw offsets.
//!
//! Exactly-once effect without relying on broker transactions:
//! - Every rated record carries a deterministic id derived from its dedup key, and goes to the
//!   rated partition with the same number as the raw partition it came from.
//! - Dedup state is per raw partition. When a partition is (re)assigned, its state is rebuilt
//!   before its first record is decided, by replaying the matching rated partition over the
//!   acceptance window plus slack ([`common::kafka::replay_partition`]). Whatever an earlier
//!   owner (or this process before a crash) produced is therefore known, and a redelivered raw
//!   record is an identical resend, produced nothing.
//! - Raw offsets are committed only after every output of the batch was acknowledged
//!   (`commit_batch`). A crash in between redelivers the batch; see above.
//! - A zombie instance that keeps producing after a rebalance writes records with the same ids;
//!   the aggregator folds each dedup key once.
//!
//! Undecodable raw messages go to the dead-letter topic with the reason; the partition flows on.
//! A delivery failure ends the process with an error (the idempotent producer has already
//! retried for `message.timeout.ms`): the supervisor restarts it and the rebuild takes over.

use crate::decision::{Decision, Rater};
use common::catalogue::PriceBook;
use common::codec;
use common::config::PipelineConfig;
use common::time::{Timestamp, HOUR_MS};
use common::topic::{partition_key, DeadLetter, RejectedEvent};
use common::usage::UsageRecord;
use futures::future::join_all;
use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Dedup state is kept this much beyond the acceptance window.
pub const DEDUP_SLACK_MS: i64 = HOUR_MS;

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
}

/// Records revoked partitions so their state is dropped (and rebuilt if they come back).
#[derive(Clone, Default)]
struct RebalanceLog(Arc<Mutex<Vec<i32>>>);

impl ClientContext for RebalanceLog {}
impl ConsumerContext for RebalanceLog {
    fn pre_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            if let Ok(mut revoked) = self.0.lock() {
                revoked.extend(tpl.elements().iter().map(|e| e.partition()));
            }
        }
    }
}

/// Runs the rater until `shutdown` resolves (then finishes and commits the current batch).
pub async fn run(cfg: &PipelineConfig, book: Arc<PriceBook>, shutdown: impl Future<Output = ()>) -> Result<RaterStats, RaterError> {
    let k = &cfg.kafka;
    let revoked = RebalanceLog::default();
    let consumer: StreamConsumer<RebalanceLog> =
        common::kafka::consumer_config(k, &cfg.rater.group).create_with_context(revoked.clone())?;
    consumer.subscribe(&[k.topics.raw.as_str()])?;
    let producer: FutureProducer = common::kafka::producer_config(k).create()?;
    let mut states: HashMap<i32, Rater> = HashMap::new();
    let mut stats = RaterStats::default();
    let window_ms = book.windows().acceptance_ms;
    let linger = Duration::from_millis(cfg.rater.linger_ms);
    tokio::pin!(shutdown);
    let mut stopping = false;

    while !stopping {
        let mut batch = Batch::default();
        let deadline = Instant::now() + linger;
        // Fill a batch: up to max_batch records or linger, whichever first.
        while batch.len < cfg.rater.max_batch {
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() && batch.len > 0 {
                break;
            }
            tokio::select! {
                // Finish the current batch before taking more when asked to stop.
                biased;
                () = &mut shutdown => { stopping = true; break; }
                m = tokio::time::timeout(wait.max(Duration::from_millis(50)), consumer.recv()) => match m {
                    Err(_) => if batch.len > 0 { break },
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "consume error");
                    }
                    Ok(Ok(msg)) => {
                        drop_revoked(&revoked, &mut states);
                        let p = msg.partition();
                        if !states.contains_key(&p) {
                            states.insert(p, rebuild(cfg, p, window_ms).await?);
                            stats.rebuilds += 1;
                        }
                        let rater = states.get_mut(&p).expect("state present after rebuild");
                        decide_one(&msg, rater, &book, cfg, &producer, &mut batch, &mut stats)?;
                    }
                }
            }
        }
        if batch.len > 0 {
            commit_batch(&consumer, batch, &mut states, &mut stats).await?;
            let now = now();
            for r in states.values_mut() {
                r.evict(now, window_ms, DEDUP_SLACK_MS);
            }
        }
    }
    Ok(stats)
}

#[derive(Default)]
struct Batch {
    len: usize,
    deliveries: Vec<(String, DeliveryFuture)>,
    /// Next offset to commit per partition.
    next_offsets: BTreeMap<i32, i64>,
    topic: String,
}

fn now() -> Timestamp {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    Timestamp(ms)
}

fn drop_revoked(log: &RebalanceLog, states: &mut HashMap<i32, Rater>) {
    if let Ok(mut revoked) = log.0.lock() {
        for p in revoked.drain(..) {
            states.remove(&p);
        }
    }
}

/// Rebuilds partition `p`'s dedup state from the rated partition `p`.
async fn rebuild(cfg: &PipelineConfig, p: i32, window_ms: i64) -> Result<Rater, RaterError> {
    let k = cfg.kafka.clone();
    let since = now().plus_millis(-(window_ms + DEDUP_SLACK_MS));
    let started = Instant::now();
    let topic = k.topics.rated.clone();
    let (rater, n) = tokio::task::spawn_blocking(move || {
        let mut rater = Rater::new();
        let mut undecodable = 0u64;
        let n = common::kafka::replay_partition(&k, &k.topics.rated, p, since, Duration::from_secs(120), |_, payload| {
            match codec::decode::<common::rated::RatedRecord>(payload) {
                Ok(r) => rater.restore(&r),
                Err(_) => undecodable += 1,
            }
        });
        (rater, n)
    })
    .await
    .map_err(|e| RaterError::Produce { topic: topic.clone(), reason: format!("rebuild task failed: {e}") })?;
    let n = n.map_err(|source| RaterError::Rebuild { topic, partition: p, source })?;
    tracing::info!(partition = p, replayed = n, dedup_keys = rater.dedup_keys(), ms = started.elapsed().as_millis() as u64, "partition state rebuilt");
    Ok(rater)
}

fn decide_one(
    msg: &BorrowedMessage<'_>,
    rater: &mut Rater,
    book: &PriceBook,
    cfg: &PipelineConfig,
    producer: &FutureProducer,
    batch: &mut Batch,
    stats: &mut RaterStats,
) -> Result<(), RaterError> {
    let t = &cfg.kafka.topics;
    let p = msg.partition();
    batch.len += 1;
    batch.topic = msg.topic().to_owned();
    batch.next_offsets.insert(p, msg.offset() + 1);
    let payload = msg.payload().unwrap_or_default();
    let record: UsageRecord = match codec::decode(payload) {
        Ok(r) => r,
        Err(e) => {
            let dl = DeadLetter {
                source_topic: msg.topic().to_owned(),
                source_partition: p,
                source_offset: msg.offset(),
                stage: "rater".into(),
                reason: e.to_string(),
                payload: payload.to_vec(),
                at: now(),
            };
            tracing::warn!(partition = p, offset = msg.offset(), reason = %e, "undecodable raw message dead-lettered");
            stats.dead_lettered += 1;
            let bytes = codec::encode(&dl);
            return send(producer, &t.dead_letter, None, &[], &bytes, batch);
        }
    };
    stats.decided += 1;
    let key = partition_key(&record.product, &record.customer);
    match rater.decide(&record, book) {
        Decision::Rated(r) => {
            stats.rated += 1;
            send(producer, &t.rated, Some(p), &key, &codec::encode(&r), batch)
        }
        Decision::Identical { .. } => {
            stats.identical += 1;
            Ok(())
        }
        Decision::Refused { record_id, rejection } => {
            stats.refused += 1;
            tracing::debug!(record_id = %record_id, reason = %rejection, "record refused");
            let ev = RejectedEvent::new(
                record.received_at,
                &record.seller,
                &record.product,
                &record.customer,
                Some(record_id),
                rejection.code,
                rejection.message,
                raw_summary(&record),
            );
            send(producer, &t.rejected, None, &key, &codec::encode(&ev), batch)
        }
    }
}

/// A compact, readable rendering of a refused record for the rejected table.
fn raw_summary(r: &UsageRecord) -> String {
    format!(
        "{{\"ProductCode\":\"{}\",\"CustomerId\":\"{}\",\"Dimension\":\"{}\",\"Timestamp\":\"{}\",\"Quantity\":{},\"Allocations\":{}}}",
        r.product,
        r.customer,
        r.dimension,
        r.timestamp,
        r.quantity,
        r.allocations.len()
    )
}

fn send(producer: &FutureProducer, topic: &str, partition: Option<i32>, key: &[u8], payload: &[u8], batch: &mut Batch) -> Result<(), RaterError> {
    let mut rec = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(p) = partition {
        rec = rec.partition(p);
    }
    loop {
        match producer.send_result(rec) {
            Ok(f) => {
                batch.deliveries.push((topic.to_owned(), f));
                return Ok(());
            }
            // The local queue is full: give librdkafka's delivery thread a moment, then retry
            // the same record (bounded by the queue, never by our memory).
            Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                std::thread::sleep(Duration::from_millis(10));
                rec = r;
            }
            Err((e, _)) => return Err(RaterError::Produce { topic: topic.to_owned(), reason: e.to_string() }),
        }
    }
}

/// Waits for every output of the batch, then makes dedup claims permanent and commits offsets.
async fn commit_batch(
    consumer: &StreamConsumer<RebalanceLog>,
    batch: Batch,
    states: &mut HashMap<i32, Rater>,
    stats: &mut RaterStats,
) -> Result<(), RaterError> {
    let (topics, futures): (Vec<String>, Vec<DeliveryFuture>) = batch.deliveries.into_iter().unzip();
    for (topic, d) in topics.into_iter().zip(join_all(futures).await) {
        match d {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(RaterError::Produce { topic, reason: e.to_string() }),
            Err(_) => return Err(RaterError::Produce { topic, reason: "delivery report lost".into() }),
        }
    }
    for r in states.values_mut() {
        r.commit();
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &batch.next_offsets {
        tpl.add_partition_offset(&batch.topic, *p, Offset::Offset(*o))?;
    }
    // A partition revoked meanwhile cannot be committed by us; its new owner replays and the
    // rebuild makes that harmless.
    if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync) {
        tracing::warn!(error = %e, "offset commit failed; the records will be redelivered and recognised");
    }
    stats.batches += 1;
    tracing::debug!(records = batch.len, "batch committed");
    Ok(())
}
