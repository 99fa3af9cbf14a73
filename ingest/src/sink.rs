//! Where validated records go to become durable, and what the sink says about each.
//!
//! The HTTP shell answers a record only with what the sink reports, after the sink reports it:
//! `Success` means durable (design guarantee 1). The embedded default's sink is the SQLite store,
//! which also deduplicates in the same transaction, so it can tell an identical resend or a
//! conflicting duplicate apart before answering.

use common::id::RecordId;
use common::reject::Rejection;
use common::time::Timestamp;
use common::usage::UsageRecord;
use std::future::Future;

/// A record refused before it reached the sink, kept for the rejected-records table.
#[derive(Debug, Clone)]
pub struct RefusedRecord {
    /// When it arrived.
    pub received_at: Timestamp,
    /// The authenticated seller (or the product's seller for offline tools).
    pub seller: String,
    /// The product the call named, as sent.
    pub product: String,
    /// The record's JSON as sent (truncated to [`RefusedRecord::MAX_RAW`] bytes).
    pub raw: String,
    /// Its id, when it parsed far enough to have one.
    pub record_id: Option<RecordId>,
    /// Why.
    pub rejection: Rejection,
}

impl RefusedRecord {
    /// Longest raw record kept (a hostile record must not bloat the table).
    pub const MAX_RAW: usize = 4096;

    /// Truncates `raw` on a character boundary.
    pub fn clip(raw: &str) -> String {
        if raw.len() <= Self::MAX_RAW {
            return raw.to_owned();
        }
        let mut end = Self::MAX_RAW;
        while !raw.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &raw[..end])
    }
}

/// What the sink did with one validated record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkOutcome {
    /// Durable and new.
    Accepted {
        /// Its id.
        record_id: RecordId,
    },
    /// An identical record was already accepted: nothing new stored or charged.
    AlreadyAccepted {
        /// The (same) id.
        record_id: RecordId,
    },
    /// Refused at the sink (a conflicting duplicate, or not priceable).
    Refused {
        /// This record's id.
        record_id: RecordId,
        /// Why.
        rejection: Rejection,
    },
}

/// The sink cannot take the batch now; nothing of it was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// Too much in flight: retry after the given seconds (HTTP 429).
    #[error("overloaded: {in_flight} records in flight, retry after {retry_after_secs}s")]
    Overloaded {
        /// Records in flight when refused.
        in_flight: usize,
        /// Suggested wait.
        retry_after_secs: u32,
    },
    /// The store or broker is not available (HTTP 503).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Durable, but not decided in time (distributed mode: no rater answered yet). HTTP 503
    /// with `Retry-After`; the identical resend answers with the decision.
    #[error("not decided yet: {0}")]
    Undecided(String),
}

/// A durable destination for validated records.
pub trait UsageSink: Send + Sync + 'static {
    /// Makes `accepted` durable (all or nothing) and records `refused` for audit; returns one
    /// outcome per accepted record, in order.
    fn submit(
        &self,
        accepted: Vec<UsageRecord>,
        refused: Vec<RefusedRecord>,
    ) -> impl Future<Output = Result<Vec<SinkOutcome>, SinkError>> + Send;
}

/// Admission control shared by the sinks: at most `max` records in flight.
///
/// The count is released by dropping the [`Admitted`] guard, so a call whose HTTP client went
/// away mid-request (its future dropped) gives its share back too. The bound can be moved while
/// calls are in flight ([`InFlight::set_max`]): the embedded writer sets it from its measured
/// rate (see [`crate::shed`]).
#[derive(Debug, Clone)]
pub struct InFlight {
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Records admitted by [`InFlight::admit`]; released on drop.
#[derive(Debug)]
pub struct Admitted {
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    n: usize,
}

impl InFlight {
    /// At most `max` records in flight (a single call larger than `max` is still admitted alone).
    pub fn new(max: usize) -> Self {
        InFlight { count: Default::default(), max: std::sync::Arc::new(max.into()) }
    }

    /// Admits `n` records, or answers [`SinkError::Overloaded`].
    pub fn admit(&self, n: usize) -> Result<Admitted, SinkError> {
        use std::sync::atomic::Ordering;
        let before = self.count.fetch_add(n, Ordering::SeqCst);
        if before > 0 && before + n > self.max() {
            self.count.fetch_sub(n, Ordering::SeqCst);
            return Err(SinkError::Overloaded { in_flight: before, retry_after_secs: 1 });
        }
        Ok(Admitted { count: std::sync::Arc::clone(&self.count), n })
    }

    /// Records in flight now.
    pub fn current(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The bound now.
    pub fn max(&self) -> usize {
        self.max.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves the bound (calls already admitted stay admitted).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.count.fetch_sub(self.n, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_is_released_even_when_the_call_is_abandoned() {
        let f = InFlight::new(10);
        let a = f.admit(8).unwrap();
        assert!(matches!(f.admit(5), Err(SinkError::Overloaded { in_flight: 8, .. })));
        drop(a);
        assert_eq!(f.current(), 0);
        let _big = f.admit(50).expect("a lone call larger than the bound is admitted");
        drop(_big);
        let shared = f.clone();
        shared.set_max(100);
        let _a = f.admit(60).unwrap();
        assert!(f.admit(30).is_ok(), "a moved bound applies to every clone");
    }
}
