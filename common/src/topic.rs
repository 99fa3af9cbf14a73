//! What travels on each topic (all through [`crate::codec`]) and how messages are keyed.
//!
//! | topic | payload | key |
//! |---|---|---|
//! | raw | [`crate::usage::UsageRecord`] | [`partition_key`] (product, customer) |
//! | rated | [`crate::rated::RatedRecord`] | same key; partition = the raw record's partition |
//! | rejected | [`RejectedEvent`] | same key (or the seller for unparsable records) |
//! | dead-letter | [`DeadLetter`] | none |
//! | decisions | [`DecisionBatch`] | none; partition = the asking ingest instance's [`ReplyTo::partition`] |
//!
//! A raw record that wants its decision back carries a [`REPLY_HEADER`] ([`ReplyTo`]): the
//! rater answers it on the decisions topic in the same transaction as its rated output.
//!
//! Keying by (product, customer) gives one partition everything a rater needs for a record:
//! its dedup slots and, later, month-to-date quantities for tiers.

use crate::id::{Fingerprinter, RecordId};
use crate::reject::{RejectCode, Rejection};
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

/// The raw-record header that asks the rater for the record's decision.
pub const REPLY_HEADER: &str = "meterline-reply";

/// Where a raw record's decision goes: a partition of the decisions topic, the asking call, and
/// the record's place in it. Encoded as 16 bytes, big-endian (partition, request, index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// Decisions-topic partition the asking `ingest` instance reads.
    pub partition: i32,
    /// The asking call, unique within that instance (random start, then counted).
    pub request: u64,
    /// The record's position among the call's accepted records.
    pub index: u32,
}

impl ReplyTo {
    /// The header value.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.partition.to_be_bytes());
        b[4..12].copy_from_slice(&self.request.to_be_bytes());
        b[12..].copy_from_slice(&self.index.to_be_bytes());
        b
    }

    /// Reads a header value; `None` unless it is exactly 16 bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; 16] = b.try_into().ok()?;
        let partition = i32::from_be_bytes(b[..4].try_into().ok()?);
        let request = u64::from_be_bytes(b[4..12].try_into().ok()?);
        let index = u32::from_be_bytes(b[12..].try_into().ok()?);
        Some(ReplyTo { partition, request, index })
    }
}

/// What the rater decided for one raw record, as the asking ingest instance needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decided {
    /// New and rated: `Success`.
    Rated {
        /// Its id.
        record_id: RecordId,
    },
    /// An identical resend of an accepted record: `Success` with the first record's id.
    Identical {
        /// The (same) id.
        record_id: RecordId,
    },
    /// Refused by the rater (a conflicting resend, not priceable, a closed month).
    Refused {
        /// This record's id.
        record_id: RecordId,
        /// Why.
        rejection: Rejection,
    },
    /// The raw message did not decode (dead-lettered).
    Undecodable {
        /// The decode error.
        reason: String,
    },
}

/// The decisions of one call's records that one rater batch decided (one message per call and
/// rater batch, so a bulk call costs a few messages, not one per record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionBatch {
    /// [`ReplyTo::request`].
    pub request: u64,
    /// (index in the call, decision).
    pub decisions: Vec<(u32, Decided)>,
}

#[cfg(test)]
mod reply_tests {
    use super::*;

    #[test]
    fn a_reply_header_round_trips_and_any_other_length_is_refused() {
        let r = ReplyTo { partition: 3, request: u64::MAX - 7, index: 24 };
        assert_eq!(ReplyTo::decode(&r.encode()), Some(r));
        assert_eq!(ReplyTo::decode(&r.encode()[..15]), None);
        assert_eq!(ReplyTo::decode(&[0u8; 17]), None);
    }
}
