//! What travels on each topic (all through [`crate::codec`]) and how messages are keyed.
//!
//! | topic | payload | key |
//! |---|---|---|
//! | raw | [`crate::usage::UsageRecord`] | [`partition_key`] (product, customer) |
//! | rated | [`crate::rated::RatedRecord`] | same key; partition = the raw record's partition |
//! | rejected | [`RejectedEvent`] | same key (or the seller for unparsable records) |
//! | dead-letter | [`DeadLetter`] | none |
//!
//! Keying by (product, customer) gives one partition everything a rater needs for a record:
//! its dedup slots and, later, month-to-date quantities for tiers.

use crate::id::{Fingerprinter, RecordId};
use crate::reject::RejectCode;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// The message key of everything about (product, customer).
pub fn partition_key(product: &str, customer: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(product.len() + customer.len() + 1);
    k.extend_from_slice(product.as_bytes());
    k.push(0);
    k.extend_from_slice(customer.as_bytes());
    k
}

/// A refused record, for the rejected-records table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedEvent {
    /// Deterministic id of this rejection (replays write the same row).
    pub rejection_id: RecordId,
    /// Arrival time.
    pub received_at: Timestamp,
    /// Seller.
    pub seller: String,
    /// Product as named.
    pub product: String,
    /// Customer, when resolved.
    pub customer: String,
    /// The record's id, when it parsed far enough.
    pub record_id: Option<RecordId>,
    /// Reason class.
    pub code: RejectCode,
    /// Why.
    pub message: String,
    /// The record as sent (clipped), or its canonical JSON.
    pub raw: String,
}

impl RejectedEvent {
    /// Builds an event; its id fingerprints what identifies this rejection.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        received_at: Timestamp,
        seller: &str,
        product: &str,
        customer: &str,
        record_id: Option<RecordId>,
        code: RejectCode,
        message: String,
        raw: String,
    ) -> Self {
        let mut f = Fingerprinter::new(b'j');
        f.i64(received_at.millis()).str(seller).str(product).str(code.as_str()).str(&raw);
        if let Some(id) = record_id {
            f.u128(id.0);
        }
        RejectedEvent {
            rejection_id: RecordId(f.finish()),
            received_at,
            seller: seller.to_owned(),
            product: product.to_owned(),
            customer: customer.to_owned(),
            record_id,
            code,
            message,
            raw,
        }
    }
}

/// A message no stage could decode, kept with why and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Topic it was read from.
    pub source_topic: String,
    /// Partition.
    pub source_partition: i32,
    /// Offset.
    pub source_offset: i64,
    /// Which stage gave up on it.
    pub stage: String,
    /// The decode error.
    pub reason: String,
    /// The payload as it was.
    pub payload: Vec<u8>,
    /// When it was dead-lettered.
    pub at: Timestamp,
}
