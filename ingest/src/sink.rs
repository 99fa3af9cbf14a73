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
