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
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest the startup read of the closed-months topic may take.
const STARTUP_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the follower could not start.
pub use common::kafka::FollowError;

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
    let closed = ClosedThrough::default();
    let shared = Arc::downgrade(&closed.0);
    let poll = Duration::from_millis(CLOSED_MONTHS_POLL_MS);
    common::kafka::follow_partition(
        k,
        &topic,
        &format!("{group}-closed-months"),
        poll,
        STARTUP_READ_TIMEOUT,
        move |m| {
            // The rater dropped its handle: nobody reads what we learn any more.
            let Some(state) = shared.upgrade() else { return ControlFlow::Break(()) };
            if let Some((_, key, payload)) = m {
                ClosedThrough(state).update(key, payload);
            }
            ControlFlow::Continue(())
        },
    )?;
    tracing::info!(closed_through = ?closed.get().map(|m| m.to_string()), topic, "closed months read");
    Ok(closed)
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
