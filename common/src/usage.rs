//! A usage record as accepted by ingest: validated, with its customer resolved.
//!
//! Ingest turns the seller's wire record (AWS `UsageRecord` JSON) into this canonical form; the
//! rater dedups and rates it; the embedded store and the raw topic persist it. Canonical means:
//! the customer is the catalogue's customer id whichever identifier the seller used (edge case 12),
//! the quantity is normalised (`5.0` = `5`), tags inside an allocation and the allocations
//! themselves are sorted, so two encodings of the same usage have the same [`RecordId`].

use crate::id::{DedupKey, Fingerprinter, RecordId};
use crate::time::{Hour, Timestamp};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// One tag on a usage allocation (`aws:marketplace:isv:` prefix is added by AWS, not by sellers).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Tag {
    /// 1–100 characters.
    pub key: String,
    /// 1–256 characters.
    pub value: String,
}

/// A share of a record's quantity attributed to a tag set (MET-17). Allocations never change the
/// price or the total; they are carried for the buyer's cost reports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Allocation {
    /// Tags sorted by key; empty for the (at most one) untagged bucket.
    pub tags: Vec<Tag>,
    /// The allocated quantity.
    pub quantity: Decimal,
}

/// How the caller named the customer (kept for audit; rating uses the resolved id).
///
/// New variants go at the end: the codec encodes the variant's index, so payloads written before
/// a variant existed still decode.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CustomerRef {
    /// Legacy `CustomerIdentifier`.
    CustomerIdentifier,
    /// `CustomerAWSAccountId`.
    AwsAccountId,
    /// The catalogue's own customer id (native bulk API).
    CustomerId,
    /// The caller was this deployment of the customer (`MeterUsage` with a deployment key). The
    /// deployment is part of the dedup key: MET-12 allows one record per hour × dimension ×
    /// instance/task, and the hour's charge is the sum over the customer's deployments.
    Deployment(String),
    /// The record named this licence (`LicenseArn`). Not part of the dedup key: a licence is one
    /// agreement of one customer, and a customer holds one agreement per product at a time, so
    /// the licence and the customer's account id name the same billable slot (never two charges).
    License(String),
}

impl CustomerRef {
    /// What the dedup key adds to (product, customer, dimension, hour), if anything.
    pub fn dedup_scope(&self) -> Option<&str> {
        match self {
            CustomerRef::Deployment(id) => Some(id),
            _ => None,
        }
    }
}

/// A validated usage record for one (product, customer, dimension, hour).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Seller that owns the product and sent the record.
    pub seller: String,
    /// Product code.
    pub product: String,
    /// Catalogue customer id.
    pub customer: String,
    /// How the seller referred to the customer.
    pub customer_ref: CustomerRef,
    /// Dimension API name.
    pub dimension: String,
    /// Event time as sent; only its hour matters for dedup and billing.
    pub timestamp: Timestamp,
    /// Usage in the hour (integer under the AWS profile; scale ≤ 9 under profiles that allow decimals).
    pub quantity: Decimal,
    /// Canonical allocations (sorted); empty when the seller sent none.
    pub allocations: Vec<Allocation>,
    /// When ingest accepted the record (used for latency metrics, never for billing).
    pub received_at: Timestamp,
}

/// Largest quantity any marketplace profile accepts (ingest refuses more, by name).
pub const MAX_QUANTITY: i64 = 1_000_000_000_000_000;
/// Most decimal places of any quantity.
pub const MAX_QUANTITY_SCALE: u32 = 9;

impl UsageRecord {
    /// The quantity bounds ingest guarantees. Consumers of the raw topic re-check them, so a
    /// record from another producer (or a future bug) is refused by name instead of being rated
    /// into a negative or overflowing charge (found by the `rater_core` fuzz target).
    pub fn check_bounds(&self) -> Result<(), String> {
        let bad = |what: &str, q: Decimal| {
            if q.is_sign_negative() && !q.is_zero() {
                Some(format!("{what} {q} is negative"))
            } else if q > Decimal::from(MAX_QUANTITY) {
                Some(format!("{what} {q} exceeds the maximum of {MAX_QUANTITY}"))
            } else if q.normalize().scale() > MAX_QUANTITY_SCALE {
                Some(format!("{what} {q} has more than {MAX_QUANTITY_SCALE} decimal places"))
            } else {
                None
            }
        };
        let allocations = self.allocations.iter().map(|a| bad("an allocated quantity", a.quantity));
        match std::iter::once(bad("Quantity", self.quantity)).chain(allocations).flatten().next() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// The UTC hour the usage belongs to.
    pub fn hour(&self) -> Hour {
        self.timestamp.hour()
    }

    /// The (product, customer, dimension, hour) slot, per deployment for `MeterUsage` callers.
    pub fn dedup_key(&self) -> DedupKey {
        match self.customer_ref.dedup_scope() {
            None => DedupKey::of(&self.product, &self.customer, &self.dimension, self.hour()),
            Some(scope) => DedupKey::of_scoped(&self.product, &self.customer, &self.dimension, self.hour(), scope),
        }
    }

    /// Deterministic id over the key and the billable content. The exact timestamp within the
    /// hour is deliberately not part of it: 10:05 and 10:55 with the same quantity are the same
    /// record (edge case 22).
    pub fn record_id(&self) -> RecordId {
        self.record_id_for(self.dedup_key())
    }

    /// [`Self::record_id`] when the dedup key is already known (saves one hash on the hot path).
    pub fn record_id_for(&self, key: DedupKey) -> RecordId {
        let mut f = Fingerprinter::new(b'r');
        f.u128(key.0).decimal(self.quantity);
        f.i64(self.allocations.len() as i64);
        for a in &self.allocations {
            f.decimal(a.quantity).i64(a.tags.len() as i64);
            for t in &a.tags {
                f.str(&t.key).str(&t.value);
            }
        }
        RecordId(f.finish())
    }

    /// Puts tags and allocations in canonical order and normalises quantities.
    pub fn canonicalise(&mut self) {
        self.quantity = self.quantity.normalize();
        for a in &mut self.allocations {
            a.quantity = a.quantity.normalize();
            a.tags.sort();
        }
        self.allocations.sort();
    }
}

/// The text both stores keep a record's allocations in: canonical JSON, '' when there are none.
pub fn allocations_text(allocations: &[Allocation]) -> String {
    if allocations.is_empty() {
        return String::new();
    }
    // Tags and decimals as plain values: serialising cannot fail.
    serde_json::to_string(allocations).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(q: &str, ts: &str) -> UsageRecord {
        UsageRecord {
            seller: "s".into(),
            product: "p".into(),
            customer: "c".into(),
            customer_ref: CustomerRef::CustomerIdentifier,
            dimension: "users".into(),
            timestamp: Timestamp::parse_rfc3339(ts).unwrap(),
            quantity: q.parse().unwrap(),
            allocations: vec![],
            received_at: Timestamp(0),
        }
    }

    #[test]
    fn same_hour_same_quantity_is_the_same_record() {
        let a = rec("5", "2026-10-01T10:05:00Z");
        let b = rec("5.0", "2026-10-01T10:55:00Z");
        let mut b = b;
        b.canonicalise();
        assert_eq!(a.dedup_key(), b.dedup_key());
        assert_eq!(a.record_id(), b.record_id());
    }

    #[test]
    fn deployments_of_one_customer_are_separate_slots_but_a_licence_is_not() {
        let a = rec("5", "2026-10-01T10:05:00Z");
        let mut d1 = a.clone();
        d1.customer_ref = CustomerRef::Deployment("d1".into());
        let mut d2 = a.clone();
        d2.customer_ref = CustomerRef::Deployment("d2".into());
        assert_ne!(d1.dedup_key(), d2.dedup_key());
        assert_ne!(d1.dedup_key(), a.dedup_key());
        let mut l = a.clone();
        l.customer_ref = CustomerRef::License("arn:aws:license-manager::1:license:l-1".into());
        assert_eq!(l.dedup_key(), a.dedup_key(), "a licence names the customer's one agreement");
    }

    #[test]
    fn other_quantity_is_another_record_in_the_same_slot() {
        let a = rec("5", "2026-10-01T10:05:00Z");
        let b = rec("6", "2026-10-01T10:05:00Z");
        assert_eq!(a.dedup_key(), b.dedup_key());
        assert_ne!(a.record_id(), b.record_id());
    }

    #[test]
    fn allocation_order_does_not_change_the_id_but_content_does() {
        let tag = |k: &str, v: &str| Tag { key: k.into(), value: v.into() };
        let mut a = rec("5", "2026-10-01T10:05:00Z");
        a.allocations = vec![
            Allocation { tags: vec![tag("team", "a"), tag("env", "prod")], quantity: 2.into() },
            Allocation { tags: vec![tag("team", "b")], quantity: 3.into() },
        ];
        let mut b = a.clone();
        b.allocations.reverse();
        b.allocations[1].tags.reverse();
        a.canonicalise();
        b.canonicalise();
        assert_eq!(a.record_id(), b.record_id());
        let mut c = a.clone();
        c.allocations[0].quantity = 1.into();
        c.allocations[1].quantity = 4.into();
        assert_ne!(a.record_id(), c.record_id());
    }
}
