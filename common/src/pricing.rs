//! PURE. The usage pricing models as data, and the arithmetic each one does (domain-rules §3).
//!
//! A dimension's price is one [`UsagePrice`] variant. Some models price each record on its own
//! (per unit, per duration, BYOL); the others price the month's total (graduated and volume
//! tiers, packages), because a tier depends on the month-to-date quantity and an order-free sum
//! is the only reading that gives the same invoice whatever order records arrive in. Rating
//! asks [`UsagePrice::record_amount`]; the monthly fold asks [`UsagePrice::month_amount`] for
//! the month-priced ones.

use crate::money::{decimal_places, decimal_text, opt_decimal_text};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

/// Scale at which the one inexact model ([`UsagePrice::PerDuration`], a rate per hour applied to
/// seconds) rounds a record's amount: far below any currency's minor unit.
pub const DURATION_AMOUNT_SCALE: u32 = 12;

/// One tier of a graduated or volume price: units up to `up_to` (inclusive, month to date) cost
/// `rate` each; the last tier has no bound. Optionally a flat fee for entering the tier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Upper bound of the tier in units; absent on the last tier. (Never skipped when
    /// serialising: the topic codec is not self-describing.)
    #[serde(default, with = "opt_decimal_text")]
    pub up_to: Option<Decimal>,
    /// Price per unit within the tier.
    #[serde(with = "decimal_text")]
    pub rate: Decimal,
}

/// Blocks of units sold whole: every started block of `size` units costs `price` (PRC-2 "Tiers",
/// Stripe/Orb "package"). 250 units at 100 per block → 3 blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Package {
    /// Units per block.
    #[serde(with = "decimal_text")]
    pub size: Decimal,
    /// Price of one block.
    #[serde(with = "decimal_text")]
    pub price: Decimal,
}

/// A rate per `per` units of a time quantity (e.g. per hour for a quantity in seconds), each
/// record's quantity first raised to `minimum` and rounded up to a multiple of `increment`
/// (container per-second billing with a one-minute minimum; AMI partial hours rounded up).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerDuration {
    /// Price per `per` units.
    #[serde(with = "decimal_text")]
    pub rate: Decimal,
    /// Units the rate is for, e.g. 3600 (seconds in the priced hour).
    #[serde(with = "decimal_text")]
    pub per: Decimal,
    /// Each record's quantity is rounded up to a multiple of this (1 = per second, 3600 = whole hours).
    #[serde(with = "decimal_text")]
    pub increment: Decimal,
    /// Minimum charged quantity of a non-zero record (e.g. 60 seconds).
    #[serde(default, with = "decimal_text")]
    pub minimum: Decimal,
}

/// The price of one usage dimension: a tagged variant per pricing model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum UsagePrice {
    /// A rate per unit (PRC-13, PRC-10). Annual and contract coverage net the quantity first.
    PerUnit(#[serde(with = "decimal_text")] Decimal),
    /// Graduated tiers over the month-to-date quantity: each unit at the rate of the tier it falls in.
    Graduated(Vec<Tier>),
    /// Volume tiers: every unit of the month at the rate of the tier the month's total reaches.
    Volume(Vec<Tier>),
    /// Whole blocks of units over the month.
    Package(Package),
    /// A rate per time unit applied to a finer-grained quantity (per-second container billing).
    PerDuration(PerDuration),
    /// Bring your own licence (PRC-16): metered for reporting, never charged.
    Byol,
}

/// When a model's amount is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PricedBy {
    /// Each record's amount is final when it is rated.
    Record,
    /// The amount is a function of the month's total billable quantity.
    Month,
}

impl UsagePrice {
    /// Whether records or months are priced.
    pub fn priced_by(&self) -> PricedBy {
        match self {
            UsagePrice::Graduated(_) | UsagePrice::Volume(_) | UsagePrice::Package(_) => PricedBy::Month,
            UsagePrice::PerUnit(_) | UsagePrice::PerDuration(_) | UsagePrice::Byol => PricedBy::Record,
        }
    }

    /// The model's name as stored beside charge lines.
    pub fn model(&self) -> &'static str {
        match self {
            UsagePrice::PerUnit(_) => "per_unit",
            UsagePrice::Graduated(_) => "graduated",
            UsagePrice::Volume(_) => "volume",
            UsagePrice::Package(_) => "package",
            UsagePrice::PerDuration(_) => "per_duration",
            UsagePrice::Byol => "byol",
        }
    }

    /// The rate shown on a line item: the per-unit rate, the per-duration rate, the first tier's
    /// rate, the block price, or zero for BYOL.
    pub fn display_rate(&self) -> Decimal {
        match self {
            UsagePrice::PerUnit(r) => *r,
            UsagePrice::PerDuration(d) => d.rate,
            UsagePrice::Graduated(t) | UsagePrice::Volume(t) => t.first().map_or(Decimal::ZERO, |t| t.rate),
            UsagePrice::Package(p) => p.price,
            UsagePrice::Byol => Decimal::ZERO,
        }
    }

    /// A record-priced record's billable quantity after the model's own rounding (per-duration
    /// minimum and increment); other models leave it as is.
    pub fn charged_quantity(&self, billable: Decimal) -> Option<Decimal> {
        match self {
            UsagePrice::PerDuration(d) if !billable.is_zero() => {
                let q = billable.max(d.minimum);
                let blocks = (q.checked_div(d.increment)?).ceil();
                blocks.checked_mul(d.increment)
            }
            _ => Some(billable),
        }
    }

    /// The exact amount of one record-priced record of `charged` units (after
    /// [`Self::charged_quantity`]); zero for month-priced models, whose amount the fold computes.
    pub fn record_amount(&self, charged: Decimal) -> Option<Decimal> {
        match self {
            UsagePrice::PerUnit(rate) => exact_mul(charged, *rate),
            UsagePrice::PerDuration(d) => {
                let product = exact_mul(charged, d.rate)?;
                let amount = product.checked_div(d.per)?;
                Some(amount.round_dp_with_strategy(DURATION_AMOUNT_SCALE, RoundingStrategy::MidpointAwayFromZero))
            }
            UsagePrice::Byol | UsagePrice::Graduated(_) | UsagePrice::Volume(_) | UsagePrice::Package(_) => {
                Some(Decimal::ZERO)
            }
        }
    }

    /// The exact amount of a month's `quantity` billable units of a month-priced model (for a
    /// record-priced model: the same as pricing one record of that quantity).
    pub fn month_amount(&self, quantity: Decimal) -> Option<Decimal> {
        match self {
            UsagePrice::Graduated(tiers) => {
                let mut amount = Decimal::ZERO;
                let mut below = Decimal::ZERO;
                for t in tiers {
                    if quantity <= below {
                        break;
                    }
                    let top = t.up_to.map_or(quantity, |u| u.min(quantity));
                    amount = amount.checked_add(exact_mul(top - below, t.rate)?)?;
                    below = top;
                }
                Some(amount)
            }
            UsagePrice::Volume(tiers) => {
                let tier = tiers.iter().find(|t| t.up_to.is_none_or(|u| quantity <= u))?;
                exact_mul(quantity, tier.rate)
            }
            UsagePrice::Package(p) => {
                let blocks = quantity.checked_div(p.size)?.ceil();
                exact_mul(blocks, p.price)
            }
            other => other.record_amount(other.charged_quantity(quantity)?),
        }
    }

    /// The exact correction for `late` units of a month already closed at `closed` units
    /// (domain-rules HR-7, issue 17 item 2): `month_amount(closed + late) − month_amount(closed)`,
    /// so late units are priced at the marginal position the closed month had reached (a
    /// graduated tier, a volume tier re-pricing every unit, the packages started) and the closed
    /// month's own amount is never touched. Negative when volume tiers lower every unit's rate.
    pub fn correction_amount(&self, closed: Decimal, late: Decimal) -> Option<Decimal> {
        let after = self.month_amount(closed.checked_add(late)?)?;
        after.checked_sub(self.month_amount(closed)?)
    }

    /// Checks the price's own rules; `max_dp` is the marketplace's usage-rate precision.
    pub fn validate(&self, max_dp: u32) -> Result<(), String> {
        let rate_ok = |r: Decimal, what: &str| -> Result<(), String> {
            if r.is_sign_negative() {
                return Err(format!("{what} {r} is negative"));
            }
            if decimal_places(r) > max_dp {
                return Err(format!(
                    "{what} {r} has {} decimal places; usage rates allow at most {max_dp}",
                    decimal_places(r)
                ));
            }
            Ok(())
        };
        match self {
            UsagePrice::PerUnit(r) => rate_ok(*r, "rate"),
            UsagePrice::Graduated(tiers) | UsagePrice::Volume(tiers) => {
                if tiers.is_empty() {
                    return Err("tiers: at least one tier is needed".into());
                }
                let mut last = Decimal::ZERO;
                for (i, t) in tiers.iter().enumerate() {
                    rate_ok(t.rate, &format!("tier {} rate", i + 1))?;
                    match t.up_to {
                        Some(u) if u <= last => {
                            return Err(format!("tier {}: up_to {u} must be above the previous tier's {last}", i + 1))
                        }
                        Some(u) => last = u,
                        None if i + 1 != tiers.len() => {
                            return Err(format!("tier {}: only the last tier may be unbounded", i + 1))
                        }
                        None => {}
                    }
                }
                if tiers.last().is_some_and(|t| t.up_to.is_some()) {
                    return Err("tiers: the last tier must be unbounded (no up_to)".into());
                }
                Ok(())
            }
            UsagePrice::Package(p) => {
                if p.size <= Decimal::ZERO {
                    return Err(format!("package size {} must be positive", p.size));
                }
                rate_ok(p.price, "package price")
            }
            UsagePrice::PerDuration(d) => {
                rate_ok(d.rate, "rate")?;
                if d.per <= Decimal::ZERO || d.increment <= Decimal::ZERO || d.minimum.is_sign_negative() {
                    return Err("per_duration: per and increment must be positive, minimum not negative".into());
                }
                Ok(())
            }
            UsagePrice::Byol => Ok(()),
        }
    }
}

/// `a × b` if it is representable without rounding (rust_decimal would otherwise round
/// silently when the 96-bit mantissa overflows).
pub fn exact_mul(a: Decimal, b: Decimal) -> Option<Decimal> {
    let product = a.checked_mul(b)?;
    (product.scale() == a.scale() + b.scale() || product.is_zero()).then_some(product)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }
    fn tiers(spec: &[(Option<&str>, &str)]) -> Vec<Tier> {
        spec.iter().map(|(u, r)| Tier { up_to: u.map(d), rate: d(r) }).collect()
    }

    #[test]
    fn graduated_prices_each_unit_in_its_tier() {
        // 0–1,000 at $0.10, 1,000–10,000 at $0.05, above at $0.01.
        let p = UsagePrice::Graduated(tiers(&[(Some("1000"), "0.10"), (Some("10000"), "0.05"), (None, "0.01")]));
        assert_eq!(p.month_amount(d("0")), Some(d("0")));
        assert_eq!(p.month_amount(d("1000")).unwrap(), d("100"));
        assert_eq!(p.month_amount(d("2500")).unwrap(), d("175")); // 100 + 1,500 × 0.05
        assert_eq!(p.month_amount(d("12000")).unwrap(), d("570")); // 100 + 450 + 20
    }

    #[test]
    fn volume_prices_every_unit_at_the_reached_tier() {
        let p = UsagePrice::Volume(tiers(&[(Some("1000"), "0.10"), (Some("10000"), "0.05"), (None, "0.01")]));
        assert_eq!(p.month_amount(d("1000")).unwrap(), d("100"));
        assert_eq!(p.month_amount(d("1001")).unwrap(), d("50.05"));
        assert_eq!(p.month_amount(d("12000")).unwrap(), d("120"));
    }

    #[test]
    fn package_charges_every_started_block() {
        let p = UsagePrice::Package(Package { size: d("100"), price: d("5.00") });
        assert_eq!(p.month_amount(d("0")).unwrap(), d("0"));
        assert_eq!(p.month_amount(d("100")).unwrap(), d("5"));
        assert_eq!(p.month_amount(d("250")).unwrap(), d("15"));
    }

    #[test]
    fn graduated_correction_of_100_late_units_after_1200_closed_is_5_00_at_the_0_05_tier_not_8_00() {
        // Issue 17: 0–1,000 at €0.08, above at €0.05; the closed month reached 1,200 units
        // (80 + 10 = €90.00). 100 late units: 1,300 → €95.00, so the correction is €5.00 (100 × 0.05),
        // not €8.00 priced from the first tier again.
        let p = UsagePrice::Graduated(tiers(&[(Some("1000"), "0.08"), (None, "0.05")]));
        assert_eq!(p.month_amount(d("1200")).unwrap(), d("90"));
        assert_eq!(p.correction_amount(d("1200"), d("100")).unwrap(), d("5"));
        // Straddling the boundary: closed at 950, 100 late = 50 × 0.08 + 50 × 0.05 = 6.50.
        assert_eq!(p.correction_amount(d("950"), d("100")).unwrap(), d("6.5"));
        // Nothing closed: the late units are the month's first.
        assert_eq!(p.correction_amount(d("0"), d("100")).unwrap(), d("8"));
    }

    #[test]
    fn volume_correction_of_100_late_units_after_950_closed_reprices_the_month_minus_42_50() {
        // 950 closed at 0.10 = 95.00; with 100 late the month reaches 1,050, every unit at 0.05:
        // 52.50. The correction is 52.50 − 95.00 = −42.50 (the volume tier re-prices all units).
        let p = UsagePrice::Volume(tiers(&[(Some("1000"), "0.10"), (Some("10000"), "0.05"), (None, "0.01")]));
        assert_eq!(p.correction_amount(d("950"), d("100")).unwrap(), d("-42.5"));
        // Within the reached tier: 2,000 closed, 100 late → 100 × 0.05 = 5.00.
        assert_eq!(p.correction_amount(d("2000"), d("100")).unwrap(), d("5"));
    }

    #[test]
    fn package_correction_after_250_closed_is_0_for_30_late_units_and_5_00_for_60() {
        // Blocks of 100 at 5.00: 250 closed = 3 blocks (15.00). 30 late → 280, still 3 blocks:
        // 0.00; 60 late → 310, a fourth block: 5.00.
        let p = UsagePrice::Package(Package { size: d("100"), price: d("5.00") });
        assert_eq!(p.correction_amount(d("250"), d("30")).unwrap(), d("0"));
        assert_eq!(p.correction_amount(d("250"), d("60")).unwrap(), d("5"));
    }

    #[test]
    fn per_second_with_one_minute_minimum_edge_37() {
        // $6/h: 20 m 30 s → $2.05; a 30 s task → 1 minute → $0.10.
        let p =
            UsagePrice::PerDuration(PerDuration { rate: d("6"), per: d("3600"), increment: d("1"), minimum: d("60") });
        let amount = |s: &str| p.record_amount(p.charged_quantity(d(s)).unwrap()).unwrap();
        assert_eq!(amount("1230"), d("2.05"));
        assert_eq!(amount("30"), d("0.1"));
        assert_eq!(amount("0"), d("0"));
    }

    #[test]
    fn partial_hours_round_up_edge_36() {
        // m5.large $0.12/h metered in seconds, whole hours: 10 full hours + 5 minutes → 11 h → $1.32.
        let p = UsagePrice::PerDuration(PerDuration {
            rate: d("0.12"),
            per: d("3600"),
            increment: d("3600"),
            minimum: d("0"),
        });
        let hours: Decimal = std::iter::repeat_n("3600", 10)
            .chain(["300"])
            .map(|s| p.record_amount(p.charged_quantity(d(s)).unwrap()).unwrap())
            .sum();
        assert_eq!(hours, d("1.32"));
        // Stopped and started twice within one hour: 20 + 15 minutes of one instance → one hour.
        assert_eq!(p.charged_quantity(d("2100")).unwrap(), d("3600"));
    }

    #[test]
    fn byol_is_never_charged() {
        assert_eq!(UsagePrice::Byol.record_amount(d("1000")), Some(Decimal::ZERO));
        assert_eq!(UsagePrice::Byol.priced_by(), PricedBy::Record);
    }

    #[test]
    fn tier_rules_are_checked() {
        let bad = UsagePrice::Graduated(tiers(&[(Some("1000"), "0.10"), (Some("500"), "0.05"), (None, "0.01")]));
        assert!(bad.validate(8).unwrap_err().contains("above the previous"));
        let bounded = UsagePrice::Volume(tiers(&[(Some("1000"), "0.10")]));
        assert!(bounded.validate(8).unwrap_err().contains("unbounded"));
        let precise = UsagePrice::Graduated(tiers(&[(None, "0.000000001")]));
        assert!(precise.validate(8).unwrap_err().contains("9 decimal places"));
    }
}
