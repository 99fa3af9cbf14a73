//! PURE. What happens to one accepted usage record: dedup, then rating.

use crate::dedup::{DedupOutcome, Deduper};
use crate::rating;
use common::catalogue::{LateUsage, PriceBook};
use common::id::RecordId;
use common::rated::{ChargeType, RatedRecord};
use common::reject::{RejectCode, Rejection};
use common::time::{Hour, Month, Timestamp};
use common::usage::UsageRecord;

/// The rater's verdict on a record.
// `Rated` is much larger than the others; boxing it would cost an allocation per rated record on
// the hot path, while a decision lives only until its batch is written.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A new record, priced. Persist it, then [`Rater::commit`].
    Rated(RatedRecord),
    /// An identical resend of an accepted record: `Success`, no new charge.
    Identical {
        /// The (same) record id.
        record_id: RecordId,
    },
    /// Refused: a conflicting duplicate, or a record that cannot be priced.
    Refused {
        /// This record's id.
        record_id: RecordId,
        /// Why.
        rejection: Rejection,
    },
}

/// Dedup state plus the rating core. One per partition (embedded: one per store).
#[derive(Debug, Default)]
pub struct Rater {
    dedup: Deduper,
    /// The latest closed month: usage for it or earlier follows the profile's late-usage policy.
    closed_through: Option<Month>,
}

impl Rater {
    /// A rater with empty dedup state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Months up to and including `month` are closed (the shell reads this from its store).
    pub fn set_closed_through(&mut self, month: Option<Month>) {
        self.closed_through = month;
    }

    /// Decides one record. A `Rated` decision stages a dedup claim that becomes permanent only
    /// with [`Rater::commit`].
    pub fn decide(&mut self, record: &UsageRecord, book: &PriceBook) -> Decision {
        if let Err(why) = record.check_bounds() {
            return Decision::Refused {
                record_id: record.record_id(),
                rejection: Rejection::new(RejectCode::InvalidQuantity, why),
            };
        }
        let key = record.dedup_key();
        let record_id = record.record_id_for(key);
        match self.dedup.check_and_stage(key, record.hour(), record_id) {
            DedupOutcome::Identical => Decision::Identical { record_id },
            DedupOutcome::Conflict { standing } => Decision::Refused {
                record_id,
                rejection: Rejection::new(
                    RejectCode::DuplicateRecord,
                    format!(
                        "{} of `{}` for `{}` in hour {} was already metered as record {standing} with another quantity or allocations; the first record stands",
                        record.dimension,
                        record.product,
                        record.customer,
                        record.hour()
                    ),
                ),
            },
            DedupOutcome::New => match rating::rate(record, key, record_id, book)
                .and_then(|rated| late_usage(rated, self.closed_through, book.marketplace().late_usage))
            {
                Ok(rated) => Decision::Rated(rated),
                Err(rejection) => {
                    self.dedup.unstage(key);
                    Decision::Refused { record_id, rejection }
                }
            },
        }
    }

    /// The decided batch is durable: keep its claims.
    pub fn commit(&mut self) {
        self.dedup.commit();
    }

    /// The decided batch was not persisted: forget its claims.
    pub fn rollback(&mut self) {
        self.dedup.rollback();
    }

    /// Replays a durable claim (restart).
    pub fn restore(&mut self, rated: &RatedRecord) {
        self.restore_claim(rated.dedup_key, rated.hour, rated.record_id);
    }

    /// Replays a durable claim given its parts (restart from a store).
    pub fn restore_claim(&mut self, key: common::id::DedupKey, hour: Hour, record_id: RecordId) {
        self.dedup.restore(key, hour, record_id);
    }

    /// Drops dedup state for hours that the acceptance window (plus slack) no longer admits at
    /// `now` ([`common::window::eviction_horizon`], the same span a rebuild replays).
    pub fn evict(&mut self, now: Timestamp, acceptance_ms: i64) {
        self.dedup.evict_before(common::window::eviction_horizon(now, acceptance_ms));
    }

    /// Dedup keys held (bounded by the window).
    pub fn dedup_keys(&self) -> usize {
        self.dedup.len()
    }
}

/// Usage for a closed month (HR-7, edge 34): refused, or booked as an `adjustment` on the next
/// open month, by the profile's policy. An unset policy refuses: nothing is assumed.
fn late_usage(
    mut rated: RatedRecord,
    closed_through: Option<Month>,
    policy: Option<LateUsage>,
) -> Result<RatedRecord, Rejection> {
    let Some(closed) = closed_through.filter(|c| rated.month() <= *c) else { return Ok(rated) };
    match policy {
        Some(LateUsage::CorrectionNextMonth) => {
            rated.booked_month = Some(closed.next());
            rated.charge_type = ChargeType::Adjustment;
            Ok(rated)
        }
        Some(LateUsage::Refuse) | None => Err(Rejection::new(
            RejectCode::TimestampOutOfBounds,
            format!("{} is in {}, a closed month; this marketplace refuses late usage", rated.hour, rated.month()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::usage::CustomerRef;
    use rust_decimal::Decimal;

    const BOOK: &str = include_str!("../../docs/examples/price-book.toml");

    fn rec(ts: &str, q: i64, customer: &str, dim: &str) -> UsageRecord {
        let t = Timestamp::parse_rfc3339(ts).unwrap();
        UsageRecord {
            seller: "acme".into(),
            product: "acme-analytics".into(),
            customer: customer.into(),
            customer_ref: CustomerRef::CustomerId,
            dimension: dim.into(),
            timestamp: t,
            quantity: Decimal::from(q),
            allocations: vec![],
            received_at: t,
        }
    }

    #[test]
    fn exact_resend_charges_once_conflict_keeps_the_first_quantity() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        let first = rec("2026-11-02T10:05:00Z", 100, "cust-a", "users");
        let Decision::Rated(rated) = rater.decide(&first, &book) else { panic!("first is rated") };
        rater.commit();
        assert_eq!(rated.amount, "1.400".parse().unwrap());
        assert_eq!(rater.decide(&first, &book), Decision::Identical { record_id: first.record_id() });
        // Same key at 10:55 with the same quantity: the same record (edge case 22).
        let later = rec("2026-11-02T10:55:00Z", 100, "cust-a", "users");
        assert_eq!(rater.decide(&later, &book), Decision::Identical { record_id: first.record_id() });
        let conflict = rec("2026-11-02T10:30:00Z", 90, "cust-a", "users");
        match rater.decide(&conflict, &book) {
            Decision::Refused { rejection, .. } => {
                assert_eq!(rejection.code, RejectCode::DuplicateRecord);
                assert!(rejection.message.contains(&first.record_id().to_string()));
            }
            other => panic!("expected DuplicateRecord, got {other:?}"),
        }
    }

    #[test]
    fn other_hour_dimension_or_customer_are_other_slots() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        for r in [
            rec("2026-11-02T10:59:59.999Z", 1, "cust-a", "users"),
            rec("2026-11-02T11:00:00.000Z", 1, "cust-a", "users"),
            rec("2026-11-02T11:00:00.000Z", 1, "cust-a", "gb_ingest"),
        ] {
            assert!(matches!(rater.decide(&r, &book), Decision::Rated(_)), "{r:?}");
        }
        rater.commit();
        assert_eq!(rater.dedup_keys(), 3);
    }

    #[test]
    fn an_unpriced_record_does_not_claim_its_key() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        // cust-b has no agreement for acme-analytics: refused, key left free.
        let r = rec("2026-11-02T10:00:00Z", 1, "cust-b", "users");
        assert!(
            matches!(rater.decide(&r, &book), Decision::Refused { rejection, .. } if rejection.code == RejectCode::NotPriced)
        );
        rater.commit();
        assert_eq!(rater.dedup_keys(), 0);
    }

    #[test]
    fn late_usage_for_a_closed_month_is_refused_or_booked_as_a_correction_edge_34() {
        let oct = Month::parse("2026-10").unwrap();
        let late = rec("2026-10-31T23:00:00Z", 100, "cust-a", "users");
        // The example book's AWS profile refuses.
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        rater.set_closed_through(Some(oct));
        assert!(
            matches!(rater.decide(&late, &book), Decision::Refused { rejection, .. } if rejection.message.contains("closed month"))
        );
        assert_eq!(rater.dedup_keys(), 0);
        // An own profile books it on November as an adjustment; November usage is unaffected.
        let own = BOOK.replace("late_usage = \"refuse\"", "late_usage = \"correction_next_month\"");
        let book = PriceBook::from_toml(&own).unwrap();
        let Decision::Rated(r) = rater.decide(&late, &book) else { panic!("booked") };
        assert_eq!(
            (r.charge_type, r.billing_month().to_string(), r.month().to_string()),
            (ChargeType::Adjustment, "2026-11".into(), "2026-10".into())
        );
        let Decision::Rated(n) = rater.decide(&rec("2026-11-02T10:00:00Z", 1, "cust-a", "users"), &book) else {
            panic!()
        };
        assert_eq!((n.charge_type, n.booked_month), (ChargeType::Usage, None));
    }

    /// Regression (fuzz target `rater_core`): a raw-topic record with a negative quantity was
    /// rated into a negative charge; records out of ingest's bounds are refused by name.
    #[test]
    fn out_of_bounds_quantities_from_the_topic_are_refused_not_rated() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        let mut negative = rec("2026-11-02T10:00:00Z", -5, "cust-a", "users");
        let mut huge = rec("2026-11-02T11:00:00Z", 0, "cust-a", "users");
        huge.quantity = Decimal::MAX;
        let mut too_fine = rec("2026-11-02T12:00:00Z", 0, "cust-a", "users");
        too_fine.quantity = Decimal::new(1, 10);
        for r in [&mut negative, &mut huge, &mut too_fine] {
            match rater.decide(r, &book) {
                Decision::Refused { rejection, .. } => {
                    assert_eq!(rejection.code, RejectCode::InvalidQuantity, "{rejection:?}")
                }
                other => panic!("expected InvalidQuantity, got {other:?}"),
            }
        }
        assert_eq!(rater.dedup_keys(), 0);
    }
}
