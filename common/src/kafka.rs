//! Kafka client helpers shared by the distributed binaries (feature `kafka`).
//!
//! Every client is built here so the delivery-critical settings are set in one place, after the
//! passthrough map (which validation already forbids from touching them):
//! - producers: idempotent, `acks=all` (an acknowledged record survives a broker failover);
//! - consumers: no auto-commit and no auto offset store (offsets advance only after the
//!   downstream write is confirmed), `read_committed`, `auto.offset.reset=earliest`.
//!
//! [`replay_partition`] is the bounded replay that rebuilds a partition's state on assignment;
//! [`follow_partition`] the reader of a one-partition topic every instance follows whole (the
//! closed months, the catalogue).

use crate::config::KafkaConfig;
use crate::time::Timestamp;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// Why the follower of a one-partition topic could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FollowError {
    /// Creating the consumer or reading the topic failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The topic was not read to its end in time: deciding without it would be deciding blind.
    #[error("{topic} not read to its end within {timeout:?}: is the broker up?")]
    Timeout {
        /// The topic.
        topic: String,
        /// The bound.
        timeout: Duration,
    },
    /// The follower thread could not be started.
    #[error("starting the follower of {topic}: {source}")]
    Thread {
        /// The topic.
        topic: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One message of a followed topic: offset, key, payload.
pub type Followed<'m> = (i64, Option<&'m [u8]>, Option<&'m [u8]>);

/// Reads partition 0 of `topic` to its end (bounded by `startup_timeout`), handing each message
/// to `on_message`, then follows it on a thread of its own that polls every `poll` and calls
/// `on_message` after each poll (`None` when nothing came) until it answers `Break`. Every
/// instance reads the whole partition: assigned, not subscribed; the group id (`group`) is
/// required by librdkafka but never joined or committed to. Blocking: call it from
/// `block_in_place` or a blocking task.
pub fn follow_partition(
    k: &KafkaConfig,
    topic: &str,
    group: &str,
    poll: Duration,
    startup_timeout: Duration,
    mut on_message: impl FnMut(Option<Followed<'_>>) -> std::ops::ControlFlow<()> + Send + 'static,
) -> Result<(), FollowError> {
    let mut cfg = client_config(k);
    cfg.set("group.id", group)
        .set("session.timeout.ms", k.session_timeout_ms.to_string())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true");
    let consumer: BaseConsumer = cfg.create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + startup_timeout;
    // A topic created a moment ago has no leader yet (NotLeaderForPartition): transient, so
    // retried until the deadline; an error that outlasts it stops the start with its cause.
    let (low, high) = loop {
        match consumer.fetch_watermarks(topic, 0, poll.max(Duration::from_secs(1))) {
            Ok(w) => break w,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, topic, "topic not ready yet");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(e.into()),
        }
    };
    // `high` is the end as it was when we looked: stop at it, or at EOF (compaction may leave
    // the last offsets without a message).
    let mut next = low;
    while next < high {
        if Instant::now() > deadline {
            return Err(FollowError::Timeout { topic: topic.to_owned(), timeout: startup_timeout });
        }
        match consumer.poll(poll) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                // Whoever follows stopped wanting it during the read: nothing left to follow.
                if on_message(Some((m.offset(), m.key(), m.payload()))).is_break() {
                    return Ok(());
                }
                next = m.offset() + 1;
            }
        }
    }
    let name = topic.to_owned();
    std::thread::Builder::new()
        .name(format!("follow {topic}"))
        .spawn(move || loop {
            let flow = match consumer.poll(poll) {
                None | Some(Err(KafkaError::PartitionEOF(_))) => on_message(None),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic = name, "consume error (librdkafka retries)");
                    on_message(None)
                }
                Some(Ok(m)) => on_message(Some((m.offset(), m.key(), m.payload()))),
            };
            if flow.is_break() {
                return;
            }
        })
        .map_err(|source| FollowError::Thread { topic: topic.to_owned(), source })?;
    Ok(())
}

/// Base client settings: the passthrough map, then the bootstrap servers.
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (key, value) in &k.client {
        c.set(key, value);
    }
    c.set("bootstrap.servers", &k.bootstrap);
    c
}

/// An idempotent, `acks=all` producer configuration.
pub fn producer_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(k);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .set("queue.buffering.max.messages", "1000000");
    c
}

/// A transactional producer for the rater: [`producer_config`] plus `transactional.id` and the
/// transaction timeout (the broker aborts a transaction left open longer than this).
pub fn transactional_producer_config(k: &KafkaConfig, transactional_id: &str, timeout_ms: u32) -> ClientConfig {
    let mut c = producer_config(k);
    // librdkafka refuses a delivery timeout beyond the transaction's: a record cannot outlive it.
    let delivery_ms = timeout_ms.min(30_000);
    c.set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", timeout_ms.to_string())
        .set("message.timeout.ms", delivery_ms.to_string());
    c
}

/// A consumer configuration for `group`: manual offsets, `read_committed`, the cooperative-sticky
/// assignor (a member joining or leaving moves only the partitions that change owner).
pub fn consumer_config(k: &KafkaConfig, group: &str) -> ClientConfig {
    let mut c = client_config(k);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", k.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (k.session_timeout_ms / 5).max(100).to_string())
        .set("partition.assignment.strategy", "cooperative-sticky");
    c
}

/// How long decisions are kept: a decision only matters to a call still waiting for it.
const DECISIONS_RETENTION_MS: &str = "3600000";

/// The one key of the closed-months topic: compaction keeps its latest value, the latest closed
/// month as `YYYY-MM` text.
pub const CLOSED_THROUGH_KEY: &[u8] = b"closed_through";

/// How often a rater's follower of the closed-months topic polls it (ms): part of the settle
/// time `aggregator close` waits after publishing a close.
pub const CLOSED_MONTHS_POLL_MS: u64 = 100;

/// Creates the seven topics if they are missing (an existing topic is fine). The closed-months
/// and catalogue topics have one partition (one ordered history) and are compacted.
pub async fn ensure_topics(k: &KafkaConfig) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(k).create()?;
    let t = &k.topics;
    let names = [&t.raw, &t.rated, &t.rejected, &t.dead_letter];
    let mut topics: Vec<NewTopic<'_>> =
        names.iter().map(|n| NewTopic::new(n.as_str(), k.partitions, TopicReplication::Fixed(k.replication))).collect();
    topics.push(
        NewTopic::new(t.decisions.as_str(), k.partitions, TopicReplication::Fixed(k.replication))
            .set("retention.ms", DECISIONS_RETENTION_MS),
    );
    topics.push(
        NewTopic::new(t.closed_months.as_str(), 1, TopicReplication::Fixed(k.replication))
            .set("cleanup.policy", "compact"),
    );
    topics.push(
        NewTopic::new(t.catalogue.as_str(), 1, TopicReplication::Fixed(k.replication)).set("cleanup.policy", "compact"),
    );
    let results =
        admin.create_topics(&topics, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))).await?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// Reads `partition` of `topic` from the first message at or after `since` to the end as it was
/// when the replay began, handing each `(offset, payload)` to `f`. Bounded by `timeout`; a
/// broker that cannot look offsets up by time is replayed from its start.
pub fn replay_partition(
    k: &KafkaConfig,
    topic: &str,
    partition: i32,
    since: Timestamp,
    timeout: Duration,
    mut f: impl FnMut(i64, &[u8]),
) -> Result<u64, KafkaError> {
    let mut cfg = client_config(k);
    // Not a group member (it assigns), but librdkafka still checks the group timeouts, which the
    // passthrough map may have tuned: keep them consistent with the other consumers.
    cfg.set("group.id", format!("meterline-replay-{topic}-{partition}"))
        .set("session.timeout.ms", k.session_timeout_ms.to_string())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        // EOF marks the end as the broker sees it, even when the high watermark counts entries
        // no fetch returns (control records, compacted or lost batches).
        .set("enable.partition.eof", "true");
    let consumer: BaseConsumer = cfg.create()?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
    if high <= low {
        return Ok(0);
    }
    let mut by_time = TopicPartitionList::new();
    by_time.add_partition_offset(topic, partition, Offset::Offset(since.millis()))?;
    let start = match consumer.offsets_for_times(by_time, timeout) {
        Ok(tpl) => match tpl.find_partition(topic, partition).map(|e| e.offset()) {
            Some(Offset::Offset(o)) if o >= low => o,
            // No message at or after `since`: nothing to replay.
            Some(Offset::End) => return Ok(0),
            _ => low,
        },
        Err(_) => low,
    };
    if start >= high {
        return Ok(0);
    }
    let mut assign = TopicPartitionList::new();
    assign.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&assign)?;
    let deadline = Instant::now() + timeout;
    let mut n = 0u64;
    loop {
        if Instant::now() > deadline {
            return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                f(m.offset(), m.payload().unwrap_or_default());
                n += 1;
                if m.offset() >= high - 1 {
                    return Ok(n);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(n),
            // A broker restarting mid-replay (transport failure, leader moving): librdkafka
            // reconnects by itself, so keep polling until the deadline instead of failing the
            // rebuild (which stopped the rater on every broker restart).
            Some(Err(e)) if crate::shell::kafka_class(&e) == crate::shell::ErrorClass::Transient => {
                tracing::debug!(topic, partition, error = %e, "replay: transient consume error; polling on");
            }
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
}

/// How often librdkafka reports statistics to a consumer's context (ms): the refresh interval
/// of `meterline_consumer_lag_records`. Set with [`with_statistics`].
pub const STATISTICS_INTERVAL_MS: u32 = 2_000;

/// Turns on librdkafka's statistics for a consumer whose context calls [`report_lag`].
pub fn with_statistics(mut c: ClientConfig) -> ClientConfig {
    c.set("statistics.interval.ms", STATISTICS_INTERVAL_MS.to_string());
    c
}

/// Sets `meterline_consumer_lag_records{stage, partition}` from a statistics report: records
/// between each fetched partition's high watermark and its committed offset. Partitions this
/// consumer no longer fetches lose their series.
pub fn report_lag(m: &crate::metrics::Metrics, stage: &str, stats: &rdkafka::Statistics) {
    for topic in stats.topics.values() {
        for p in topic.partitions.values() {
            if p.partition < 0 {
                continue; // librdkafka's internal "unassigned" partition
            }
            let label = p.partition.to_string();
            if p.fetch_state == "active" && p.hi_offset >= 0 {
                // The rater commits its offsets inside its Kafka transactions, which the consumer
                // does not see, and stores them locally after each commit: the stored offset is
                // its progress. Others commit through the consumer. Before the first commit the
                // offset is unknown (-1001): all of it is lag.
                let lag = if p.consumer_lag_stored >= 0 {
                    p.consumer_lag_stored
                } else if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else {
                    p.hi_offset - p.lo_offset.max(0)
                };
                m.consumer_lag.with_label_values(&[stage, &label]).set(lag.max(0));
            } else {
                // Absent already is fine: the series is gone either way.
                m.consumer_lag.remove_label_values(&[stage, &label]).ok();
            }
        }
    }
}

/// A consumer context that only reports lag (consumers with no rebalance hooks).
#[derive(Debug, Clone)]
pub struct LagContext {
    /// Where to report.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Stage label.
    pub stage: &'static str,
}

impl rdkafka::ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        report_lag(&self.metrics, self.stage, &statistics);
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}
