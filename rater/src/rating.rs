//! PURE. Prices one accepted usage record exactly.
//!
//! The price comes from the customer's agreement in force at the record's hour, its offer, and the
//! offer's price version in force for that agreement then ([`PriceBook::price_at`], which applies
//! the price-change notice rule). In order:
//! 1. coverage: annual subscriptions and container contract units net the quantity per hour,
//!    the Y−X rule (PRC-12): `billable = max(0, Y − X)`, never transferring to another instance
//!    type and counting only between their start and end; a SaaS free trial covers everything;
//! 2. the model's own rounding of the billable quantity (per-duration minimum and increment);
//! 3. the amount: exact for record-priced models; zero for month-priced ones (tiers, packages),
//!    whose price travels with the record for the monthly fold ([`common::pricing`]).
//!
//! No rounding to money here: amounts are exact and rounded once per invoice line.

use common::catalogue::PriceBook;
use common::id::{DedupKey, RecordId};
pub use common::pricing::exact_mul;
use common::pricing::PricedBy;
use common::rated::{ChargeType, RatedRecord};
use common::reject::{RejectCode, Rejection};
use common::usage::UsageRecord;
use rust_decimal::Decimal;

/// Rates `record` (whose ids the caller already computed).
pub fn rate(record: &UsageRecord, key: DedupKey, id: RecordId, book: &PriceBook) -> Result<RatedRecord, Rejection> {
    let hour = record.hour();
    let Some(p) = book.price_at(&record.customer, &record.product, &record.dimension, hour) else {
        return Err(Rejection::new(
            RejectCode::NotPriced,
            format!(
                "no price for `{}` of `{}` for customer `{}` at {hour}",
                record.dimension, record.product, record.customer
            ),
        ));
    };
    let covered = if book.in_saas_trial(p.agreement, p.offer, hour) {
        record.quantity
    } else {
        let units = Decimal::from(PriceBook::annual_units(p.agreement, &record.dimension, hour));
        record.quantity.min(units)
    };
    let inexact = || {
        Rejection::new(
            RejectCode::InvalidQuantity,
            format!("quantity {} at {} cannot be priced exactly", record.quantity, p.price.model()),
        )
    };
    let billable = p.price.charged_quantity(record.quantity - covered).ok_or_else(inexact)?;
    let amount = p.price.record_amount(billable).ok_or_else(inexact)?;
    let month_price = (p.price.priced_by() == PricedBy::Month).then(|| p.price.clone());
    Ok(RatedRecord {
        record_id: id,
        dedup_key: key,
        seller: record.seller.clone(),
        product: record.product.clone(),
        customer: record.customer.clone(),
        dimension: record.dimension.clone(),
        hour,
        quantity: record.quantity,
        covered_quantity: covered,
        billable_quantity: billable,
        unit_rate: p.price.display_rate(),
        currency: p.offer.currency,
        amount,
        month_price,
        pricing_model: p.price.model().to_owned(),
        booked_month: None,
        charge_type: ChargeType::Usage,
        agreement_id: p.agreement.id.clone(),
        offer_id: p.offer.id.clone(),
        price_book_version: book.version().to_owned(),
        allocations: record.allocations.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::money::round_to_minor;
    use common::time::{Month, Timestamp};
    use common::usage::CustomerRef;

    const BOOK: &str = include_str!("../../docs/examples/price-book.toml");

    fn usage(customer: &str, product: &str, dim: &str, ts: Timestamp, q: i64) -> UsageRecord {
        UsageRecord {
            seller: "acme".into(),
            product: product.into(),
            customer: customer.into(),
            customer_ref: CustomerRef::CustomerId,
            dimension: dim.into(),
            timestamp: ts,
            quantity: Decimal::from(q),
            allocations: vec![],
            received_at: ts,
        }
    }

    fn rate_one(book: &PriceBook, r: &UsageRecord) -> RatedRecord {
        rate(r, r.dedup_key(), r.record_id(), book).unwrap()
    }

    /// Sums a month of hourly records of quantity `q` (one per hour) for `dim`.
    fn month_total(book: &PriceBook, customer: &str, product: &str, dim: &str, q: i64, hours: i64) -> Decimal {
        let start = Month::parse("2026-11").unwrap().start();
        (0..hours)
            .map(|h| rate_one(book, &usage(customer, product, dim, start.plus_millis(h * 3_600_000), q)).amount)
            .sum()
    }

    #[test]
    fn worked_example_3_5_saas_usage_month_is_1011_70() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let users = month_total(&book, "cust-a", "acme-analytics", "users", 100, 720);
        assert_eq!(round_to_minor(users, 2).to_string(), "1008.00");
        let start = Month::parse("2026-11").unwrap().start();
        let gb = rate_one(&book, &usage("cust-a", "acme-analytics", "gb_ingest", start, 37)).amount;
        assert_eq!(round_to_minor(gb, 2).to_string(), "3.70");
        assert_eq!(round_to_minor(users, 2) + round_to_minor(gb, 2), "1011.70".parse().unwrap());
    }

    #[test]
    fn worked_example_3_4_annual_y_minus_x_is_1080() {
        // X = 2 annual m5.large, Y = 5 running for a 720-hour month at $0.50.
        let book = PriceBook::from_toml(BOOK).unwrap();
        let total = month_total(&book, "cust-a", "acme-vm", "m5_large", 5, 720);
        assert_eq!(round_to_minor(total, 2).to_string(), "1080.00");
    }

    #[test]
    fn y_below_or_equal_x_is_free_above_is_the_difference() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let t = Timestamp::parse_rfc3339("2026-11-03T04:00:00Z").unwrap();
        for (y, billable) in [(0, 0), (1, 0), (2, 0), (3, 1), (10, 8)] {
            let r = rate_one(&book, &usage("cust-a", "acme-vm", "m5_large", t, y));
            assert_eq!(r.billable_quantity, Decimal::from(billable), "Y={y}");
            assert_eq!(r.covered_quantity + r.billable_quantity, Decimal::from(y));
            assert!(!r.amount.is_sign_negative());
        }
    }

    #[test]
    fn coverage_does_not_transfer_to_another_instance_type() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let t = Timestamp::parse_rfc3339("2026-11-03T04:00:00Z").unwrap();
        let r = rate_one(&book, &usage("cust-a", "acme-vm", "c5_xlarge", t, 1));
        assert_eq!(r.covered_quantity, Decimal::ZERO);
        assert_eq!(r.amount, "0.34".parse().unwrap());
    }

    #[test]
    fn coverage_ends_at_its_end_hour() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let last = Timestamp::parse_rfc3339("2026-12-31T23:00:00Z").unwrap();
        let after = Timestamp::parse_rfc3339("2027-01-01T00:00:00Z").unwrap();
        assert_eq!(rate_one(&book, &usage("cust-a", "acme-vm", "m5_large", last, 3)).billable_quantity, Decimal::ONE);
        assert_eq!(
            rate_one(&book, &usage("cust-a", "acme-vm", "m5_large", after, 3)).billable_quantity,
            Decimal::from(3)
        );
    }

    #[test]
    fn tiny_rate_over_a_month_rounds_to_zero_cents() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let total = month_total(&book, "cust-b", "globex-db", "requests", 1, 720);
        assert_eq!(total.to_string(), "0.00000720");
        assert_eq!(round_to_minor(total, 2).to_string(), "0.00");
    }

    #[test]
    fn exact_mul_refuses_silent_rounding() {
        let big: Decimal = "123456789012345.123456789".parse().unwrap();
        let rate: Decimal = "1234.12345678".parse().unwrap();
        assert!(exact_mul(big, rate).is_none());
        assert_eq!(exact_mul(Decimal::from(3), "0.50".parse().unwrap()), Some("1.50".parse().unwrap()));
    }
}
