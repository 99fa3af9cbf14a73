//! PURE. The monthly fold: rated records in, invoice lines out.
//!
//! Each line keeps exact sums (quantity, covered and billable quantity, amount) and is rounded
//! only when read ([`MonthlyRollup::line`]): half-up to the currency's minor unit, with the
//! unrounded amount beside it (design guarantee 4). [`LineSums::amounts`] is the one rounding of a
//! line, used by the line read here and by ClickHouse's `monthly_charges` row. Folding is
//! order-independent, so replaying records in another order gives the same lines; idempotency
//! (never folding a record twice) is the caller's, by record id.
//!
//! Folds are staged like the rater's dedup claims: [`MonthlyRollup::stage`] folds a record into
//! a copy of its line (visible to later records of the batch and in [`MonthlyRollup::staged`],
//! what the shell writes), [`MonthlyRollup::commit`] keeps the copies once the write is durable,
//! and [`MonthlyRollup::rollback`] forgets them, so a failed write leaves no line changed.
//!
//! Late usage of a closed month (booked on the next open month as an `adjustment`) of a
//! month-priced model is not priced from the first tier again: the fold reads where the closed
//! month's usage line stood ([`ClosedPosition`]) and the adjustment line carries one
//! [`Correction`] per corrected month, whose amount is the delta
//! `month_amount(closed + late) − month_amount(closed)` (issue 17 item 2). Both shells (SQLite and
//! ClickHouse) fold through here, so the rule lives once.

use common::money::round_to_minor;
use common::pricing::UsagePrice;
use common::rated::{ChargeLine, ChargeLineKey, ChargeType, Correction, RatedRecord};
use common::time::{Hour, Month};
use rust_decimal::Decimal;
use std::collections::HashMap;

/// Why a record could not be folded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FoldError {
    /// The line's sum left `Decimal`'s range (never for realistic volumes; refused, not rounded).
    #[error("charge line {0:?} overflows exact decimal arithmetic")]
    Overflow(Box<ChargeLineKey>),
    /// The currency has no known minor unit, so the line cannot be rounded.
    #[error("currency {0} has no known minor unit")]
    UnknownCurrency(String),
}

/// Exact running sums of one invoice line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineSums {
    /// Seller of record.
    pub seller: String,
    /// Offer whose prices applied (one agreement has one offer).
    pub offer_id: String,
    /// Pricing model of the newest record.
    pub pricing_model: String,
    /// For month-priced models: the price of the record with the latest hour (the price in force
    /// at the end of the month, whatever order records arrive in) and that hour.
    pub month_price: Option<(Hour, UsagePrice)>,
    /// Σ billable quantity of month-priced records (priced at `month_price` when read).
    pub month_priced_quantity: Decimal,
    /// Σ quantity.
    pub quantity: Decimal,
    /// Σ covered quantity.
    pub covered_quantity: Decimal,
    /// Σ billable quantity.
    pub billable_quantity: Decimal,
    /// Σ amount, exact.
    pub amount: Decimal,
    /// The rate, while every record had the same one.
    pub unit_rate: Option<Decimal>,
    /// Whether two different rates were seen.
    pub mixed_rates: bool,
    /// Records folded.
    pub records: u64,
    /// Adjustment lines of month-priced models: one correction per closed month corrected, in
    /// month order (priced by [`Correction::amount`], not by `month_price`).
    pub corrections: Vec<Correction>,
}

/// Where a closed month's usage line stood when late usage for it arrived: its month-priced
/// billable quantity and the price it was priced at (absent when the month had no usage).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClosedPosition {
    /// Σ billable month-priced quantity of the closed line.
    pub quantity: Decimal,
    /// The closed line's month price.
    pub price: Option<UsagePrice>,
}

impl ClosedPosition {
    /// The position of `line` (a closed month's usage line).
    pub fn of(line: &LineSums) -> Self {
        ClosedPosition {
            quantity: line.month_priced_quantity,
            price: line.month_price.as_ref().map(|(_, p)| p.clone()),
        }
    }
}

/// The usage line a late record's correction is priced against: same customer, product,
/// agreement, dimension and currency, in the record's own (closed) month. `None` unless `r` is a
/// late record of a month-priced model.
pub fn corrected_line_key(r: &RatedRecord) -> Option<ChargeLineKey> {
    is_month_priced_correction(r).then(|| ChargeLineKey {
        month: r.month(),
        charge_type: ChargeType::Usage,
        ..r.line_key()
    })
}

/// Whether `r` is late usage of a closed month (booked on a later one) of a month-priced model.
fn is_month_priced_correction(r: &RatedRecord) -> bool {
    r.booked_month.is_some() && r.month_price.is_some()
}

impl LineSums {
    /// Zero sums for a new line of `seller`.
    pub fn empty(seller: &str, offer_id: &str, pricing_model: &str) -> Self {
        LineSums {
            seller: seller.to_owned(),
            offer_id: offer_id.to_owned(),
            pricing_model: pricing_model.to_owned(),
            month_price: None,
            month_priced_quantity: Decimal::ZERO,
            quantity: Decimal::ZERO,
            covered_quantity: Decimal::ZERO,
            billable_quantity: Decimal::ZERO,
            amount: Decimal::ZERO,
            unit_rate: None,
            mixed_rates: false,
            records: 0,
            corrections: Vec::new(),
        }
    }

    /// Adds one rated record; on overflow (`None`) the sums are left as they were. A late record
    /// of a month-priced model ([`corrected_line_key`]) joins the correction of its month, which
    /// its first record opens at `closed` (where that month's line stood; zero if it had none).
    pub fn add(&mut self, r: &RatedRecord, closed: Option<&ClosedPosition>) -> Option<()> {
        // Every sum that can overflow first, so a refused record changes nothing.
        let quantity = self.quantity.checked_add(r.quantity)?;
        let covered_quantity = self.covered_quantity.checked_add(r.covered_quantity)?;
        let billable_quantity = self.billable_quantity.checked_add(r.billable_quantity)?;
        let amount = self.amount.checked_add(r.amount)?;
        let late = is_month_priced_correction(r);
        let month_priced_quantity = match r.month_price {
            Some(_) if !late => self.month_priced_quantity.checked_add(r.billable_quantity)?,
            _ => self.month_priced_quantity,
        };
        let correction = match (&r.month_price, late) {
            (Some(price), true) => Some(self.corrected(r.month(), price, closed, r.billable_quantity)?),
            _ => None,
        };
        (self.quantity, self.covered_quantity, self.billable_quantity, self.amount) =
            (quantity, covered_quantity, billable_quantity, amount);
        self.month_priced_quantity = month_priced_quantity;
        if let Some(c) = correction {
            match self.corrections.binary_search_by_key(&c.month, |x| x.month) {
                Ok(i) => self.corrections[i] = c,
                Err(i) => self.corrections.insert(i, c),
            }
            self.pricing_model = r.pricing_model.clone();
        } else if let Some(price) = &r.month_price {
            if self.month_price.as_ref().is_none_or(|(h, _)| r.hour > *h) {
                self.month_price = Some((r.hour, price.clone()));
                self.pricing_model = r.pricing_model.clone();
            }
        } else if self.month_price.is_none() {
            self.pricing_model = r.pricing_model.clone();
        }
        match self.unit_rate {
            None if !self.mixed_rates => self.unit_rate = Some(r.unit_rate),
            Some(rate) if rate != r.unit_rate => {
                self.unit_rate = None;
                self.mixed_rates = true;
            }
            _ => {}
        }
        self.records += 1;
        Some(())
    }

    /// The correction of `month` with `late` more units: the existing one grown, or a new one
    /// opened at `closed` (priced at the closed line's price, else the record's).
    fn corrected(
        &self,
        month: Month,
        price: &UsagePrice,
        closed: Option<&ClosedPosition>,
        late: Decimal,
    ) -> Option<Correction> {
        match self.corrections.iter().find(|c| c.month == month) {
            Some(c) => Some(Correction { late_quantity: c.late_quantity.checked_add(late)?, ..c.clone() }),
            None => Some(Correction {
                month,
                closed_quantity: closed.map_or(Decimal::ZERO, |c| c.quantity),
                late_quantity: late,
                price: closed.and_then(|c| c.price.clone()).unwrap_or_else(|| price.clone()),
            }),
        }
    }

    /// The exact amount: Σ record amounts, plus the month-priced quantity at the month's price,
    /// plus each correction's delta.
    pub fn exact_amount(&self) -> Option<Decimal> {
        let mut exact = match &self.month_price {
            None => self.amount,
            Some((_, price)) => self.amount.checked_add(price.month_amount(self.month_priced_quantity)?)?,
        };
        for c in &self.corrections {
            exact = exact.checked_add(c.amount()?)?;
        }
        Some(exact)
    }

    /// The line's amount, exact and rounded half-up once to `key`'s currency's minor unit: the
    /// one rounding of a line (the invoice line and the ClickHouse row both take it from here).
    pub fn amounts(&self, key: &ChargeLineKey) -> Result<LineAmount, FoldError> {
        let minor = key.currency.minor_units().ok_or_else(|| FoldError::UnknownCurrency(key.currency.to_string()))?;
        let exact = self.exact_amount().ok_or_else(|| FoldError::Overflow(Box::new(key.clone())))?;
        Ok(LineAmount { exact, rounded: round_to_minor(exact, minor) })
    }

    /// The invoice line: sums plus the amount rounded half-up once.
    pub fn to_line(&self, key: &ChargeLineKey) -> Result<ChargeLine, FoldError> {
        let LineAmount { exact, rounded } = self.amounts(key)?;
        Ok(ChargeLine {
            month: key.month.to_string(),
            customer: key.customer.clone(),
            seller: self.seller.clone(),
            product: key.product.clone(),
            agreement_id: key.agreement_id.clone(),
            offer_id: self.offer_id.clone(),
            dimension: key.dimension.clone(),
            charge_type: key.charge_type,
            pricing_model: self.pricing_model.clone(),
            currency: key.currency,
            quantity: self.quantity.normalize(),
            covered_quantity: self.covered_quantity.normalize(),
            billable_quantity: self.billable_quantity.normalize(),
            unit_rate: self.unit_rate,
            amount_unrounded: exact,
            amount: rounded,
            records: self.records,
            corrections: self.corrections.clone(),
        })
    }
}

/// A line's amount: exact, and rounded once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineAmount {
    /// Σ of the exact amounts (the month-priced part at the month's price).
    pub exact: Decimal,
    /// `exact` rounded half-up to the currency's minor unit.
    pub rounded: Decimal,
}

/// Exact monthly sums for any number of months and customers.
#[derive(Debug, Default)]
pub struct MonthlyRollup {
    /// Durable lines.
    lines: HashMap<ChargeLineKey, LineSums>,
    /// New sums of the lines the open batch touched, not yet durable.
    staged: HashMap<ChargeLineKey, LineSums>,
}

impl MonthlyRollup {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds one record and keeps it at once (callers without a durable write: the `rate`
    /// command, the demo, tests); returns the key of the line it changed. Keeps any staged
    /// folds with it.
    pub fn fold(&mut self, r: &RatedRecord) -> Result<ChargeLineKey, FoldError> {
        if !self.staged.is_empty() {
            let key = self.stage(r)?;
            self.commit();
            return Ok(key);
        }
        let key = r.line_key();
        let closed = self.closed_position(r);
        // A new line takes its first record without overflow; `add` leaves a line it refuses as it was.
        let sums =
            self.lines.entry(key.clone()).or_insert_with(|| LineSums::empty(&r.seller, &r.offer_id, &r.pricing_model));
        sums.add(r, closed.as_ref()).ok_or_else(|| FoldError::Overflow(Box::new(key.clone())))?;
        Ok(key)
    }

    /// Folds one record into a staged copy of its line; returns the line's key. On overflow the
    /// line is left as it was.
    pub fn stage(&mut self, r: &RatedRecord) -> Result<ChargeLineKey, FoldError> {
        let key = r.line_key();
        let overflow = || FoldError::Overflow(Box::new(r.line_key()));
        let closed = self.closed_position(r);
        if let Some(staged) = self.staged.get_mut(&key) {
            staged.add(r, closed.as_ref()).ok_or_else(overflow)?;
            return Ok(key);
        }
        // First touch in this batch: a copy of the durable line (or a new one).
        let mut next = match self.lines.get(&key) {
            Some(sums) => sums.clone(),
            None => LineSums::empty(&r.seller, &r.offer_id, &r.pricing_model),
        };
        next.add(r, closed.as_ref()).ok_or_else(overflow)?;
        self.staged.insert(key.clone(), next);
        Ok(key)
    }

    /// For a late record of a month-priced model: where its closed month's usage line stood
    /// (staged or durable); a month without usage stood at zero.
    fn closed_position(&self, r: &RatedRecord) -> Option<ClosedPosition> {
        let key = corrected_line_key(r)?;
        let line = self.staged.get(&key).or_else(|| self.lines.get(&key));
        Some(line.map(ClosedPosition::of).unwrap_or_default())
    }

    /// The lines the open batch changed, with their new sums (what the shell writes).
    pub fn staged(&self) -> impl Iterator<Item = (&ChargeLineKey, &LineSums)> + '_ {
        self.staged.iter()
    }

    /// The staged lines are durable: keep them.
    pub fn commit(&mut self) {
        self.lines.extend(self.staged.drain());
    }

    /// The staged lines were not written: forget them.
    pub fn rollback(&mut self) {
        self.staged.clear();
    }

    /// Restores a line's sums (the embedded store reloads them on start).
    pub fn restore(&mut self, key: ChargeLineKey, sums: LineSums) {
        self.lines.insert(key, sums);
    }

    /// The sums of one line.
    pub fn sums(&self, key: &ChargeLineKey) -> Option<&LineSums> {
        self.lines.get(key)
    }

    /// One line, rounded.
    pub fn line(&self, key: &ChargeLineKey) -> Option<Result<ChargeLine, FoldError>> {
        self.lines.get(key).map(|s| s.to_line(key))
    }

    /// Every line, sorted by (month, customer, product, dimension, charge type, currency).
    pub fn lines(&self) -> Result<Vec<ChargeLine>, FoldError> {
        let mut keys: Vec<&ChargeLineKey> = self.lines.keys().collect();
        keys.sort();
        keys.into_iter().map(|k| self.lines[k].to_line(k)).collect()
    }

    /// Number of lines.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether there are no lines.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::id::{DedupKey, RecordId};
    use common::money::Currency;
    use common::pricing::Tier;

    fn rated(hour: i64, dim: &str, q: &str, rate: &str, currency: &str) -> RatedRecord {
        let q: Decimal = q.parse().unwrap();
        let rate: Decimal = rate.parse().unwrap();
        RatedRecord {
            record_id: RecordId(hour as u128),
            dedup_key: DedupKey(hour as u128),
            seller: "acme".into(),
            product: "p".into(),
            customer: "c".into(),
            dimension: dim.into(),
            hour: Hour(hour),
            quantity: q,
            covered_quantity: Decimal::ZERO,
            billable_quantity: q,
            unit_rate: rate,
            currency: Currency::new(currency).unwrap(),
            amount: q * rate,
            month_price: None,
            pricing_model: "per_unit".into(),
            booked_month: None,
            charge_type: ChargeType::Usage,
            agreement_id: "a".into(),
            offer_id: "o".into(),
            price_book_version: "v".into(),
            allocations: vec![],
        }
    }

    const NOV_2026: i64 = 498_192; // 2026-11-01T00:00Z in hours since the epoch

    #[test]
    fn a_month_of_hours_is_one_line_rounded_once() {
        let mut r = MonthlyRollup::new();
        for h in 0..720 {
            r.fold(&rated(NOV_2026 + h, "users", "1", "0.00000001", "USD")).unwrap();
        }
        let lines = r.lines().unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].month, "2026-11");
        assert_eq!(lines[0].amount_unrounded.to_string(), "0.00000720");
        assert_eq!(lines[0].amount.to_string(), "0.00");
        assert_eq!(lines[0].records, 720);
    }

    #[test]
    fn half_cent_lines_round_up_and_totals_are_sums_of_rounded_lines() {
        let mut r = MonthlyRollup::new();
        r.fold(&rated(NOV_2026, "a", "1", "0.005", "USD")).unwrap();
        r.fold(&rated(NOV_2026, "b", "1", "0.005", "USD")).unwrap();
        let lines = r.lines().unwrap();
        assert!(lines.iter().all(|l| l.amount.to_string() == "0.01"));
        // Total of rounded lines 0.02, whereas rounding the exact total (0.010) would give 0.01:
        // the documented rule is the sum of rounded lines, within ±0.005 per line of the exact total.
        let total: Decimal = lines.iter().map(|l| l.amount).sum();
        assert_eq!(total.to_string(), "0.02");
    }

    #[test]
    fn currencies_are_never_merged_and_months_split_at_midnight_utc() {
        let mut r = MonthlyRollup::new();
        r.fold(&rated(NOV_2026 - 1, "users", "1", "1", "USD")).unwrap(); // 31 Oct 23:00
        r.fold(&rated(NOV_2026, "users", "1", "1", "USD")).unwrap();
        r.fold(&rated(NOV_2026, "users", "1", "1", "EUR")).unwrap();
        let lines = r.lines().unwrap();
        let shape: Vec<(String, String)> = lines.iter().map(|l| (l.month.clone(), l.currency.to_string())).collect();
        assert_eq!(
            shape,
            [("2026-10".into(), "USD".into()), ("2026-11".into(), "EUR".into()), ("2026-11".into(), "USD".into())]
        );
    }

    #[test]
    fn a_price_change_within_the_month_leaves_no_single_rate() {
        let mut r = MonthlyRollup::new();
        r.fold(&rated(NOV_2026, "users", "1", "1", "USD")).unwrap();
        r.fold(&rated(NOV_2026 + 1, "users", "1", "2", "USD")).unwrap();
        r.fold(&rated(NOV_2026 + 2, "users", "1", "1", "USD")).unwrap();
        let line = &r.lines().unwrap()[0];
        assert_eq!(line.unit_rate, None);
        assert_eq!(line.amount.to_string(), "4.00");
    }

    #[test]
    fn folding_in_any_order_gives_the_same_lines() {
        let recs: Vec<RatedRecord> =
            (0..50).map(|h| rated(NOV_2026 + h, "users", &format!("{h}"), "0.014", "USD")).collect();
        let mut a = MonthlyRollup::new();
        let mut b = MonthlyRollup::new();
        recs.iter().for_each(|r| drop(a.fold(r)));
        recs.iter().rev().for_each(|r| drop(b.fold(r)));
        assert_eq!(a.lines().unwrap(), b.lines().unwrap());
    }

    #[test]
    fn a_rolled_back_batch_changes_no_line_and_a_committed_one_keeps_its_sums() {
        let mut r = MonthlyRollup::new();
        r.fold(&rated(NOV_2026, "users", "100", "0.014", "USD")).unwrap(); // 1.400
        let before = r.lines().unwrap();
        // A batch of two records on the same line and one on a new line, then a failed write.
        r.stage(&rated(NOV_2026 + 1, "users", "50", "0.014", "USD")).unwrap();
        r.stage(&rated(NOV_2026 + 2, "users", "50", "0.014", "USD")).unwrap();
        r.stage(&rated(NOV_2026, "gb_ingest", "3", "0.10", "USD")).unwrap();
        let staged: Decimal = r.staged().filter(|(k, _)| k.dimension == "users").map(|(_, s)| s.amount).sum();
        assert_eq!(staged.to_string(), "2.800", "later records of the batch see the staged line");
        assert_eq!(r.lines().unwrap(), before, "staged folds are not read as lines");
        r.rollback();
        assert_eq!((r.lines().unwrap(), r.staged().count()), (before, 0));
        // The same batch, written: 1.400 + 0.700 + 0.700 = 2.80 and a new 0.30 line.
        r.stage(&rated(NOV_2026 + 1, "users", "50", "0.014", "USD")).unwrap();
        r.stage(&rated(NOV_2026 + 2, "users", "50", "0.014", "USD")).unwrap();
        r.stage(&rated(NOV_2026, "gb_ingest", "3", "0.10", "USD")).unwrap();
        r.commit();
        let amounts: Vec<String> = r.lines().unwrap().iter().map(|l| l.amount.to_string()).collect();
        assert_eq!(amounts, ["0.30", "2.80"]);
        assert_eq!(r.staged().count(), 0);
    }

    #[test]
    fn an_overflowing_stage_leaves_the_line_as_it_was() {
        let mut r = MonthlyRollup::new();
        r.fold(&rated(NOV_2026, "users", "1", "1", "USD")).unwrap();
        let huge = RatedRecord { amount: Decimal::MAX, ..rated(NOV_2026 + 1, "users", "1", "1", "USD") };
        assert!(matches!(r.stage(&huge), Err(FoldError::Overflow(_))));
        // Also once the line is staged: 1 + 1, then the refused record changes no sum.
        r.stage(&rated(NOV_2026 + 2, "users", "1", "1", "USD")).unwrap();
        assert!(matches!(r.stage(&huge), Err(FoldError::Overflow(_))));
        assert!(matches!(r.fold(&huge), Err(FoldError::Overflow(_))));
        r.commit();
        let line = &r.lines().unwrap()[0];
        assert_eq!((line.amount.to_string(), line.quantity.to_string(), line.records), ("2.00".into(), "2".into(), 2));
    }

    #[test]
    fn a_line_is_rounded_once_half_up_and_keeps_its_exact_amount() {
        let mut r = MonthlyRollup::new();
        // 1011.695 USD exact → 1011.70 billed, the exact amount beside it.
        r.fold(&rated(NOV_2026, "users", "1", "1011.695", "USD")).unwrap();
        let key = r.lines.keys().next().unwrap().clone();
        let amount = r.sums(&key).unwrap().amounts(&key).unwrap();
        assert_eq!((amount.exact.to_string(), amount.rounded.to_string()), ("1011.695".into(), "1011.70".into()));
        let line = r.line(&key).unwrap().unwrap();
        assert_eq!((line.amount_unrounded, line.amount), (amount.exact, amount.rounded));
    }

    #[test]
    fn graduated_tiers_price_the_month_total_in_any_order() {
        let tiers = UsagePrice::Graduated(vec![
            Tier { up_to: Some("1000".parse().unwrap()), rate: "0.10".parse().unwrap() },
            Tier { up_to: None, rate: "0.05".parse().unwrap() },
        ]);
        let recs: Vec<RatedRecord> = (0..30)
            .map(|h| RatedRecord {
                amount: Decimal::ZERO,
                month_price: Some(tiers.clone()),
                pricing_model: "graduated".into(),
                ..rated(NOV_2026 + h, "api_calls", "100", "0.10", "USD")
            })
            .collect();
        let mut a = MonthlyRollup::new();
        let mut b = MonthlyRollup::new();
        recs.iter().for_each(|r| drop(a.fold(r)));
        recs.iter().rev().for_each(|r| drop(b.fold(r)));
        let line = &a.lines().unwrap()[0];
        // 3,000 units: 1,000 × 0.10 + 2,000 × 0.05 = 200.
        assert_eq!(line.amount.to_string(), "200.00");
        assert_eq!(line.pricing_model, "graduated");
        assert_eq!(a.lines().unwrap(), b.lines().unwrap());
    }

    const OCT_2026: i64 = NOV_2026 - 744; // 2026-10-01T00:00Z

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    /// A month-priced record of `q` units at `hour`; `late` books it on November as a correction.
    fn month_priced(hour: i64, q: &str, price: &UsagePrice, late: bool) -> RatedRecord {
        RatedRecord {
            amount: Decimal::ZERO,
            month_price: Some(price.clone()),
            pricing_model: price.model().into(),
            booked_month: late.then(|| Hour(NOV_2026).month()),
            charge_type: if late { ChargeType::Adjustment } else { ChargeType::Usage },
            ..rated(hour, "api_calls", q, "0.08", "EUR")
        }
    }

    /// October closed with `closed` units (10 records), then `late` October records in
    /// November: (October's line, November's adjustment line), in both fold orders of the late
    /// records.
    fn closed_then_late(price: &UsagePrice, closed: &str, late: &[&str]) -> (ChargeLine, ChargeLine) {
        let per_hour = d(closed) / Decimal::from(10);
        let mut results = Vec::new();
        for reversed in [false, true] {
            let mut r = MonthlyRollup::new();
            for h in 0..10 {
                r.fold(&month_priced(OCT_2026 + h, &per_hour.to_string(), price, false)).unwrap();
            }
            let mut lates: Vec<RatedRecord> =
                late.iter().enumerate().map(|(i, q)| month_priced(OCT_2026 + 700 + i as i64, q, price, true)).collect();
            if reversed {
                lates.reverse();
            }
            // Staged in one batch, like the shells, then committed.
            for l in &lates {
                r.stage(l).unwrap();
            }
            r.commit();
            let lines = r.lines().unwrap();
            assert_eq!(lines.len(), 2, "{lines:#?}");
            results.push((lines[0].clone(), lines[1].clone()));
        }
        assert_eq!(results[0], results[1], "the late records' order changes nothing");
        results.remove(0)
    }

    #[test]
    fn graduated_correction_of_100_late_after_1200_closed_is_5_00_at_the_0_05_tier_not_8_00() {
        // Issue 17: 0–1,000 at €0.08, above at €0.05. October closed at 1,200 units (€90.00);
        // 100 late units (two records of 40 and 60) are priced where October stood: €5.00.
        let price = UsagePrice::Graduated(vec![
            Tier { up_to: Some(d("1000")), rate: d("0.08") },
            Tier { up_to: None, rate: d("0.05") },
        ]);
        let (october, correction) = closed_then_late(&price, "1200", &["40", "60"]);
        assert_eq!((october.month.as_str(), october.amount.to_string()), ("2026-10", "90.00".into()));
        assert_eq!(correction.month, "2026-11");
        assert_eq!(correction.charge_type, ChargeType::Adjustment);
        assert_eq!(correction.amount.to_string(), "5.00");
        assert_eq!(correction.billable_quantity, d("100"));
        let c = &correction.corrections[..];
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].month.to_string(), c[0].closed_quantity, c[0].late_quantity),
            ("2026-10".into(), d("1200"), d("100"))
        );
    }

    #[test]
    fn volume_correction_of_100_late_after_950_closed_reprices_all_units_minus_42_50() {
        // ≤1,000 at 0.10, ≤10,000 at 0.05: October closed at 950 (95.00); with 100 late units it
        // reaches 1,050, every unit at 0.05 (52.50): the correction is −42.50.
        let price = UsagePrice::Volume(vec![
            Tier { up_to: Some(d("1000")), rate: d("0.10") },
            Tier { up_to: Some(d("10000")), rate: d("0.05") },
            Tier { up_to: None, rate: d("0.01") },
        ]);
        let (october, correction) = closed_then_late(&price, "950", &["100"]);
        assert_eq!(october.amount.to_string(), "95.00");
        assert_eq!(correction.amount.to_string(), "-42.50");
    }

    #[test]
    fn package_correction_after_2500_closed_is_0_00_for_400_late_and_2_00_for_600() {
        // Blocks of 1,000 at 2.00: 2,500 closed = 3 blocks (6.00). 400 late → 2,900, no new block;
        // 600 late → 3,100, a fourth block.
        let price = UsagePrice::Package(common::pricing::Package { size: d("1000"), price: d("2.00") });
        let (october, correction) = closed_then_late(&price, "2500", &["400"]);
        assert_eq!((october.amount.to_string(), correction.amount.to_string()), ("6.00".into(), "0.00".into()));
        let (_, correction) = closed_then_late(&price, "2500", &["250", "350"]);
        assert_eq!(correction.amount.to_string(), "2.00");
    }

    #[test]
    fn late_usage_of_a_month_without_usage_is_priced_from_the_first_tier() {
        let price = UsagePrice::Graduated(vec![
            Tier { up_to: Some(d("1000")), rate: d("0.08") },
            Tier { up_to: None, rate: d("0.05") },
        ]);
        let mut r = MonthlyRollup::new();
        r.fold(&month_priced(OCT_2026 + 5, "100", &price, true)).unwrap();
        let line = &r.lines().unwrap()[0];
        assert_eq!((line.amount.to_string(), line.corrections[0].closed_quantity), ("8.00".into(), Decimal::ZERO));
    }
}
