//! SHELL (distributed mode). The rater's follower of the closed-months topic: the latest month
//! `aggregator close` has closed, so late usage meets the profile's policy
//! ([`crate::decision::Rater::set_closed_through`]) exactly as in the embedded default.
//!
//! [`follow`] reads the topic (compacted, one partition, one key) to its end before it returns —
//! so a rater decides nothing before it knows every close published so far — then a background
//! thread (a blocking consumer, never on a tokio worker) polls it every
//! [`common::kafka::CLOSED_MONTHS_POLL_MS`] and raises the shared [`ClosedThrough`]. The thread
//! ends once the last [`ClosedThrough`] handle is dropped. The pure rule is [`apply`].

use common::config::KafkaConfig;
use common::kafka::{CLOSED_MONTHS_POLL_MS, CLOSED_THROUGH_KEY};
use common::time::Month;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Longest the startup read of the closed-months topic may take.
const STARTUP_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the follower could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FollowError {
    /// Creating the consumer or reading the topic failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The topic was not read to its end in time: deciding without it could rate into a closed month.
    #[error("{topic} not read to its end within {timeout:?}")]
    Timeout {
        /// The closed-months topic.
        topic: String,
        /// The bound.
        timeout: Duration,
    },
    /// The follower thread could not be started.
    #[error("starting the closed-months follower: {0}")]
    Thread(#[from] std::io::Error),
}

/// The latest closed month this rater knows, shared with the follower thread. Only ever rises.
#[derive(Clone, Debug, Default)]
pub struct ClosedThrough(Arc<Mutex<Option<Month>>>);

impl ClosedThrough {
    /// Months up to and including this one are closed (none when nothing was ever closed).
    pub fn get(&self) -> Option<Month> {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn update(&self, key: Option<&[u8]>, payload: Option<&[u8]>) {
        let mut current = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match apply(*current, key, payload) {
            Ok(next) => {
                if next != *current {
                    tracing::info!(closed_through = ?next.map(|m| m.to_string()), "closed month learnt");
                }
                *current = next;
            }
            Err(reason) => tracing::warn!(reason, "closed-months message ignored"),
        }
    }
}

/// PURE. The closed-through month after one message of the closed-months topic: the greater of
/// `current` and the message's month, so an out-of-order or repeated close never reopens a
/// month. A message under another key is not ours (unchanged); an unreadable month is an error
/// (the caller logs it and keeps `current`).
pub fn apply(current: Option<Month>, key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<Option<Month>, String> {
    if key != Some(CLOSED_THROUGH_KEY) {
        return Ok(current);
    }
    let text = payload.map(String::from_utf8_lossy).unwrap_or_default();
    let month = Month::parse(text.trim())?;
    Ok(Some(current.map_or(month, |c| c.max(month))))
}

/// Reads the closed-months topic of `k` to its end, then follows it in a background thread.
/// Blocking: call it from `block_in_place` or a blocking task.
pub fn follow(k: &KafkaConfig, group: &str) -> Result<ClosedThrough, FollowError> {
    let topic = k.topics.closed_months.clone();
    let mut cfg = common::kafka::client_config(k);
    // Assigned, not subscribed: every rater reads the whole partition; the group id is required
    // by librdkafka but never joined or committed to.
    cfg.set("group.id", format!("{group}-closed-months"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true");
    let consumer: BaseConsumer = cfg.create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let closed = ClosedThrough::default();
    let (low, high) = consumer.fetch_watermarks(&topic, 0, STARTUP_READ_TIMEOUT)?;
    let deadline = Instant::now() + STARTUP_READ_TIMEOUT;
    // `high` is the end as it was when we looked: stop at it, or at EOF (compaction may leave
    // the last offsets without a message).
    let mut next = low;
    while next < high {
        if Instant::now() > deadline {
            return Err(FollowError::Timeout { topic, timeout: STARTUP_READ_TIMEOUT });
        }
        match consumer.poll(Duration::from_millis(CLOSED_MONTHS_POLL_MS)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                closed.update(m.key(), m.payload());
                next = m.offset() + 1;
            }
        }
    }
    tracing::info!(closed_through = ?closed.get().map(|m| m.to_string()), topic, "closed months read");
    let shared = Arc::downgrade(&closed.0);
    std::thread::Builder::new().name("closed-months".into()).spawn(move || keep_following(&consumer, &shared))?;
    Ok(closed)
}

fn keep_following(consumer: &BaseConsumer, shared: &Weak<Mutex<Option<Month>>>) {
    loop {
        let polled = consumer.poll(Duration::from_millis(CLOSED_MONTHS_POLL_MS));
        // The rater dropped its handle: nobody reads what we learn any more.
        let Some(state) = shared.upgrade() else { return };
        match polled {
            None | Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "closed-months consume error (librdkafka retries)"),
            Some(Ok(m)) => ClosedThrough(state).update(m.key(), m.payload()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn month(s: &str) -> Month {
        Month::parse(s).unwrap()
    }

    #[test]
    fn the_closed_month_only_rises_and_ignores_other_keys_and_bad_text() {
        let key = Some(CLOSED_THROUGH_KEY);
        // Nothing closed, then 2026-10 closed.
        assert_eq!(apply(None, key, Some(b"2026-10")), Ok(Some(month("2026-10"))));
        // 2026-11 after 2026-10: 2026-11.
        assert_eq!(apply(Some(month("2026-10")), key, Some(b"2026-11")), Ok(Some(month("2026-11"))));
        // 2026-09 closed again after 2026-11: still 2026-11 (nothing reopens).
        assert_eq!(apply(Some(month("2026-11")), key, Some(b"2026-09")), Ok(Some(month("2026-11"))));
        // Another key is not a close.
        assert_eq!(apply(None, Some(b"other"), Some(b"2026-10")), Ok(None));
        // Unreadable text is an error; the follower keeps what it knew.
        assert!(apply(Some(month("2026-10")), key, Some(b"October")).is_err());
        let closed = ClosedThrough::default();
        closed.update(key, Some(b"2026-10"));
        closed.update(key, Some(b"October"));
        assert_eq!(closed.get(), Some(month("2026-10")));
    }
}
