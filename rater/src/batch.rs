//! PURE. One batch of records through the rater core, with every effect a shell persists or
//! counts, so that no shell (the embedded writer, the distributed rater, `meterline rate`)
//! re-implements a decision, a count, a rendering or an amount sum.
//!
//! Records (and the price book) go in; out come, for every record in order, its [`Decision`]
//! (rated, identical resend, or refused with a `Rejection`), the refused records as [`Refusal`]s
//! with one rendering of the record as sent ([`render_as_sent`], the `raw` column of both stores'
//! rejected tables), the count per status ([`StatusCounts`]), the metric outcomes per product
//! ([`Tally`]) and the rated amounts per currency, exact ([`Amounts`]).
//!
//! Durability is the shell's, and the protocol is the rater's: [`BatchEffects::decide`] stages
//! each new record's dedup claim in the given [`Rater`] (later records of the same batch see it);
//! once the shell has made the batch durable it calls [`Rater::commit`], and if it could not,
//! [`Rater::rollback`], which forgets every claim of the batch. The closed months and the clock's
//! `now` reach the core through the rater ([`Rater::set_closed_through`], [`Rater::evict`]).
//!
//! Records already refused before the rater (ingest validation) pass through
//! [`BatchEffects::pass_refused`], so they are counted and rendered by the same code.

use crate::decision::{Decision, Rater};
use common::catalogue::PriceBook;
use common::id::RecordId;
use common::metrics::{Outcome, RecordLabels, Tally};
use common::money::Currency;
use common::rated::RatedRecord;
use common::reject::{RecordStatus, Rejection};
use common::time::Timestamp;
use common::topic::RejectedEvent;
use common::usage::UsageRecord;
use rust_decimal::Decimal;
use std::collections::BTreeMap;

/// Status name of a new, rated record (the API's `Success`), as the store counts it.
pub const STATUS_ACCEPTED: &str = "Success";
/// Status name of an identical resend, answered `Success` with nothing charged.
pub const STATUS_IDENTICAL: &str = "Success (identical resend)";

/// The status a decision is counted under.
pub fn status(decision: &Decision) -> RecordStatus {
    match decision {
        Decision::Rated(_) => RecordStatus::Success,
        Decision::Identical { .. } => RecordStatus::IdenticalResend,
        Decision::Refused { rejection, .. } => RecordStatus::Refused(rejection.code),
    }
}

/// The metric outcome of a decision (stage `rater`).
pub fn outcome(decision: &Decision) -> Outcome {
    match decision {
        Decision::Rated(_) => Outcome::Accepted,
        Decision::Identical { .. } => Outcome::Duplicate,
        Decision::Refused { rejection, .. } => Outcome::refused(rejection.code),
    }
}

/// The one rendering of a validated record for the rejected tables: its canonical JSON, every
/// field including the allocations in full, so a row says exactly what was refused (a lossy
/// summary cannot be re-submitted or audited).
pub fn render_as_sent(record: &UsageRecord) -> String {
    // Plain strings, decimals and integers: serialising cannot fail.
    serde_json::to_string(record).unwrap_or_default()
}

/// A refused record, as both stores' rejected tables keep it (SQLite `rejected_records` and the
/// Kafka rejected topic's [`RejectedEvent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// When it arrived.
    pub received_at: Timestamp,
    /// The seller.
    pub seller: String,
    /// The product, as named.
    pub product: String,
    /// The customer, when resolved (empty for a record refused before that).
    pub customer: String,
    /// The record's id, when it parsed far enough to have one.
    pub record_id: Option<RecordId>,
    /// Why.
    pub rejection: Rejection,
    /// The record as sent: [`render_as_sent`] for a decided record, the (clipped) JSON the
    /// caller sent for a record refused by validation.
    pub raw: String,
}

impl Refusal {
    /// A decided record that was refused.
    pub fn of_record(record: &UsageRecord, record_id: RecordId, rejection: Rejection) -> Self {
        Refusal {
            received_at: record.received_at,
            seller: record.seller.clone(),
            product: record.product.clone(),
            customer: record.customer.clone(),
            record_id: Some(record_id),
            rejection,
            raw: render_as_sent(record),
        }
    }

    /// The event for the Kafka rejected topic.
    pub fn to_event(&self) -> RejectedEvent {
        RejectedEvent::new(
            self.received_at,
            &self.seller,
            &self.product,
            &self.customer,
            self.record_id,
            self.rejection.code,
            self.rejection.message.clone(),
            self.raw.clone(),
        )
    }
}

/// Records per status, for the embedded store's `ingest_counts` and `meterline rate`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusCounts(BTreeMap<RecordStatus, u64>);

impl StatusCounts {
    /// Counts one record under `status`.
    pub fn add(&mut self, status: RecordStatus) {
        *self.0.entry(status).or_default() += 1;
    }

    /// The count of `status` (0 if none).
    pub fn get(&self, status: RecordStatus) -> u64 {
        self.0.get(&status).copied().unwrap_or(0)
    }

    /// Every (status name, count), by status name.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        let mut named: Vec<(&'static str, u64)> = self.0.iter().map(|(s, n)| (s.as_str(), *n)).collect();
        named.sort_unstable();
        named.into_iter()
    }
}

/// Rated amounts per currency, exact (never summed across currencies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amounts(Vec<(Currency, Decimal)>);

impl Amounts {
    /// Adds `amount` to `currency`'s sum.
    pub fn add(&mut self, currency: Currency, amount: Decimal) {
        // A batch holds one or two currencies: a linear scan wins.
        match self.0.iter_mut().find(|(c, _)| *c == currency) {
            Some((_, sum)) => *sum += amount,
            None => self.0.push((currency, amount)),
        }
    }

    /// The sum for `currency` (zero if none).
    pub fn get(&self, currency: Currency) -> Decimal {
        self.0.iter().find(|(c, _)| *c == currency).map_or(Decimal::ZERO, |(_, a)| *a)
    }

    /// Every (currency, sum), in first-seen order.
    pub fn iter(&self) -> impl Iterator<Item = (Currency, Decimal)> + '_ {
        self.0.iter().copied()
    }

    /// Whether nothing was rated.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Everything one batch produced, in input order. Counted into metrics or persisted by the
/// shell only once the batch is durable.
#[derive(Debug, Default)]
pub struct BatchEffects<'b> {
    /// One decision per decided record, in order.
    pub decisions: Vec<Decision>,
    /// Refused records (decided and passed through), in order.
    pub refusals: Vec<Refusal>,
    /// Records per status, decided and passed through.
    pub counts: StatusCounts,
    /// Metric outcomes of the decided records per product and seller (records refused by
    /// validation were counted by ingest, under its own stage).
    pub tally: Tally<'b>,
    /// Rated amounts per currency.
    pub amounts: Amounts,
}

impl<'b> BatchEffects<'b> {
    /// No effects yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides `record` with `rater` (a new record stages its claim there) and records every
    /// effect of the decision; returns it.
    pub fn decide(&mut self, rater: &mut Rater, record: &UsageRecord, book: &'b PriceBook) -> &Decision {
        let decision = rater.decide(record, book);
        self.counts.add(status(&decision));
        self.tally.add(RecordLabels::new(book, &record.product, &record.seller), outcome(&decision));
        match &decision {
            Decision::Rated(r) => self.amounts.add(r.currency, r.amount),
            Decision::Identical { .. } => {}
            Decision::Refused { record_id, rejection } => {
                self.refusals.push(Refusal::of_record(record, *record_id, rejection.clone()))
            }
        }
        self.decisions.push(decision);
        self.decisions.last().expect("pushed above")
    }

    /// A record refused before the rater (ingest validation): counted and kept like a decided
    /// refusal.
    pub fn pass_refused(&mut self, refusal: Refusal) {
        self.counts.add(RecordStatus::Refused(refusal.rejection.code));
        self.refusals.push(refusal);
    }

    /// The rated records, in order.
    pub fn rated(&self) -> impl Iterator<Item = &RatedRecord> + '_ {
        self.decisions.iter().filter_map(|d| match d {
            Decision::Rated(r) => Some(r),
            _ => None,
        })
    }
}

/// Decides a batch of records with one rater: [`BatchEffects::decide`] for each, in order. The
/// claims stay staged in `rater` until the shell commits or rolls back.
pub fn decide_batch<'b, 'r>(
    rater: &mut Rater,
    records: impl IntoIterator<Item = &'r UsageRecord>,
    book: &'b PriceBook,
) -> BatchEffects<'b> {
    let mut effects = BatchEffects::new();
    for record in records {
        effects.decide(rater, record, book);
    }
    effects
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::reject::RejectCode;
    use common::usage::CustomerRef;

    const BOOK: &str = include_str!("../../docs/examples/price-book.toml");

    fn rec(product: &str, customer: &str, dim: &str, ts: &str, q: i64) -> UsageRecord {
        let t = Timestamp::parse_rfc3339(ts).unwrap();
        UsageRecord {
            seller: if product == "globex-db" { "globex" } else { "acme" }.into(),
            product: product.into(),
            customer: customer.into(),
            customer_ref: CustomerRef::CustomerId,
            dimension: dim.into(),
            timestamp: t,
            quantity: Decimal::from(q),
            allocations: vec![],
            received_at: t,
        }
    }

    fn users(ts: &str, q: i64) -> UsageRecord {
        rec("acme-analytics", "cust-a", "users", ts, q)
    }

    #[test]
    fn an_identical_resend_within_one_batch_is_identical_and_charged_once() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        let first = users("2026-11-02T10:05:00Z", 100);
        let effects = decide_batch(&mut rater, [&first, &first], &book);
        assert!(matches!(effects.decisions[0], Decision::Rated(_)));
        assert_eq!(effects.decisions[1], Decision::Identical { record_id: first.record_id() });
        assert_eq!(
            (effects.counts.get(RecordStatus::Success), effects.counts.get(RecordStatus::IdenticalResend)),
            (1, 1)
        );
        // 100 user-hours × 0.014 = 1.400 USD, once.
        assert_eq!(effects.amounts.get(Currency::new("USD").unwrap()), "1.400".parse::<Decimal>().unwrap());
        assert_eq!(effects.rated().count(), 1);
    }

    #[test]
    fn a_conflicting_resend_in_the_same_batch_is_a_duplicate_record_and_the_first_stands() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        let first = users("2026-11-02T10:05:00Z", 100);
        let conflict = users("2026-11-02T10:30:00Z", 90);
        let effects = decide_batch(&mut rater, [&first, &conflict], &book);
        let Decision::Refused { rejection, record_id } = &effects.decisions[1] else { panic!("refused") };
        assert_eq!(rejection.code, RejectCode::DuplicateRecord);
        assert!(rejection.message.contains(&first.record_id().to_string()), "names the standing record");
        assert_eq!(*record_id, conflict.record_id());
        assert_eq!(effects.counts.get(RecordStatus::Refused(RejectCode::DuplicateRecord)), 1);
        assert_eq!(effects.refusals.len(), 1);
        assert_eq!(effects.refusals[0].record_id, Some(conflict.record_id()));
        // Only the first is charged: 100 × 0.014.
        assert_eq!(effects.amounts.get(Currency::new("USD").unwrap()), "1.400".parse::<Decimal>().unwrap());
    }

    #[test]
    fn a_rolled_back_batch_leaves_no_claim_and_a_committed_one_keeps_them() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        let a = users("2026-11-02T10:00:00Z", 100);
        let b = users("2026-11-02T11:00:00Z", 5);
        decide_batch(&mut rater, [&a, &b], &book);
        rater.rollback();
        assert_eq!(rater.dedup_keys(), 0);
        // Decided again after the rollback: new, rated again (not an identical resend).
        let again = decide_batch(&mut rater, [&a, &b], &book);
        assert_eq!(again.counts.get(RecordStatus::Success), 2);
        rater.commit();
        assert_eq!(rater.dedup_keys(), 2);
        assert_eq!(decide_batch(&mut rater, [&a], &book).counts.get(RecordStatus::IdenticalResend), 1);
    }

    #[test]
    fn outcomes_follow_the_input_order_one_per_record() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        let rated = users("2026-11-02T10:00:00Z", 1);
        let unpriced = rec("acme-analytics", "cust-b", "users", "2026-11-02T10:00:00Z", 1);
        let effects = decide_batch(&mut rater, [&rated, &unpriced, &rated], &book);
        let statuses: Vec<&str> = effects.decisions.iter().map(|d| status(d).as_str()).collect();
        assert_eq!(statuses, [STATUS_ACCEPTED, "NotPriced", STATUS_IDENTICAL]);
        let shown: Vec<(&str, u64)> = effects.counts.iter().collect();
        assert_eq!(shown, [("NotPriced", 1), (STATUS_ACCEPTED, 1), (STATUS_IDENTICAL, 1)]);
    }

    #[test]
    fn amounts_per_currency_are_exact_sums_never_merged_across_currencies() {
        // The Globex offer priced in EUR: 3 × 0.00000001 EUR beside 7 × 0.014 + 2 × 0.10 USD.
        let eur_globex = BOOK.replace(
            "currency = \"USD\"\nprices = [{ effective_from = \"2026-01-01T00:00:00Z\", usage = { requests",
            "currency = \"EUR\"\nprices = [{ effective_from = \"2026-01-01T00:00:00Z\", usage = { requests",
        );
        let book = PriceBook::from_toml(&eur_globex).unwrap();
        let mut rater = Rater::new();
        let records = [
            users("2026-11-02T10:00:00Z", 7),
            rec("acme-analytics", "cust-a", "gb_ingest", "2026-11-02T10:00:00Z", 2),
            rec("globex-db", "cust-b", "requests", "2026-11-02T10:00:00Z", 3),
        ];
        let effects = decide_batch(&mut rater, &records, &book);
        assert_eq!(effects.counts.get(RecordStatus::Success), 3, "{:?}", effects.decisions);
        let (usd, eur) = (Currency::new("USD").unwrap(), Currency::new("EUR").unwrap());
        assert_eq!(effects.amounts.get(usd), "0.298".parse::<Decimal>().unwrap());
        assert_eq!(effects.amounts.get(eur), "0.00000003".parse::<Decimal>().unwrap());
        assert_eq!(effects.amounts.iter().count(), 2);
    }

    #[test]
    fn the_refused_rendering_is_the_record_in_full_and_the_same_on_the_kafka_topic() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        let unpriced = rec("acme-analytics", "cust-b", "users", "2026-11-02T10:00:00Z", 4);
        let effects = decide_batch(&mut rater, [&unpriced], &book);
        let refusal = &effects.refusals[0];
        assert_eq!(refusal.raw, render_as_sent(&unpriced));
        let back: UsageRecord = serde_json::from_str(&refusal.raw).expect("the rendering is the record's JSON");
        assert_eq!(back, unpriced, "nothing of the record is lost");
        let event = refusal.to_event();
        assert_eq!(
            (event.raw.as_str(), event.code, event.record_id, event.customer.as_str()),
            (refusal.raw.as_str(), RejectCode::NotPriced, Some(unpriced.record_id()), "cust-b")
        );
    }

    #[test]
    fn records_refused_by_validation_are_counted_and_kept_but_not_decided() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let mut rater = Rater::new();
        let mut effects = decide_batch(&mut rater, [&users("2026-11-02T10:00:00Z", 1)], &book);
        effects.pass_refused(Refusal {
            received_at: Timestamp(0),
            seller: "acme".into(),
            product: "acme-analytics".into(),
            customer: String::new(),
            record_id: None,
            rejection: Rejection::new(RejectCode::InvalidQuantity, "Quantity -3 is negative"),
            raw: r#"{"Quantity":-3}"#.into(),
        });
        assert_eq!((effects.decisions.len(), effects.refusals.len()), (1, 1));
        assert_eq!(effects.counts.get(RecordStatus::Refused(RejectCode::InvalidQuantity)), 1);
        assert_eq!(effects.refusals[0].raw, r#"{"Quantity":-3}"#, "kept as sent");
    }
}
