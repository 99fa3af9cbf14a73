//! Annual purchases (domain-rules §3.4, PRC-12): the price of 12 months of one instance of one
//! instance type, invoiced at purchase (upfront, or by a private offer's payment schedule), and
//! the annual price-change rules:
//! - a change applies to **new** subscriptions from its `effective_from`;
//! - it applies to an **auto-renewal** only if made at least the profile's notice days (AWS: 90)
//!   before the renewal date; otherwise the renewal keeps the older price;
//! - every covered instance type must also have an hourly price (no annual-only type), so the
//!   hours beyond the coverage (Y − X) can be charged.
//!
//! The book validates every purchase with [`annual_purchase`] at load, and month close prices
//! it with the same function: the rule exists once.

use super::{invalid, AnnualCoverage, CatalogueError, Installment, Offer, UsagePrice, Visibility};
use crate::money::{decimal_places, decimal_text, round_to_minor};
use crate::time::{Timestamp, DAY_MS};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Most installments of one annual purchase (the flexible payment schedule's limit, PRC-19).
const MAX_INSTALLMENTS: usize = 60;

/// One effective-dated annual price of an instance type: 12 months of one instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnualPrice {
    /// Instance-type dimension (it must also have an hourly usage price in the offer).
    pub dimension: String,
    /// Price of one instance for 12 months (≤ the profile's contract-rate decimals).
    #[serde(with = "decimal_text")]
    pub rate: Decimal,
    /// When the price was set: new subscriptions from then on pay it; an auto-renewal pays it
    /// only if this is at least the notice days before the renewal date.
    #[serde(with = "crate::time::rfc3339")]
    pub effective_from: Timestamp,
}

/// Whether an annual term is a first purchase or an auto-renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnnualTerm {
    /// A new subscription (or an amendment adding units or changing type): the price in force
    /// at its start.
    New,
    /// An auto-renewal: the latest price set at least the notice days before the renewal date.
    Renewal,
}

/// What an annual coverage entry costs, as month close invoices it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnualPurchase<'a> {
    /// The price applied.
    pub price: &'a AnnualPrice,
    /// New subscription or renewal.
    pub term: AnnualTerm,
    /// Days in the entry's `[start, end)`.
    pub term_days: i64,
    /// Days in the 12 months from its start (365 or 366): a shorter entry is prorated by day.
    pub year_days: i64,
    /// Exact amount: rate × units × term_days / year_days.
    pub amount: Decimal,
}

/// The annual purchase `c` makes under `offer`, or `None` when the offer sets no annual price
/// for its dimension (coverage bought outside this price book: netted, never invoiced here).
///
/// `notice_days` is the profile's `price_change_notice_days` (needed by renewals only).
pub fn annual_purchase<'a>(
    agreement: &str,
    offer: &'a Offer,
    c: &AnnualCoverage,
    notice_days: Option<u32>,
) -> Result<Option<AnnualPurchase<'a>>, CatalogueError> {
    let prices = || offer.annual_prices.iter().filter(|p| p.dimension == c.dimension);
    if prices().next().is_none() {
        return Ok(None);
    }
    let (term, price) = if c.renewal {
        let Some(days) = notice_days else {
            return Err(invalid(format!(
                "agreement `{agreement}`: the annual renewal of `{}` on {} needs the marketplace's price_change_notice_days (the renewal price rule)",
                c.dimension, c.start
            )));
        };
        // Changed at least `days` before the renewal date: a change on exactly R − 90 d applies.
        let latest_set = c.start.plus_millis(-i64::from(days) * DAY_MS);
        let price = prices().filter(|p| p.effective_from <= latest_set).max_by_key(|p| p.effective_from);
        (AnnualTerm::Renewal, price.ok_or_else(|| {
            invalid(format!(
                "agreement `{agreement}`: offer `{}` has no annual price for `{}` set {days} days before the renewal on {}",
                offer.id, c.dimension, c.start
            ))
        })?)
    } else {
        let price = prices().filter(|p| p.effective_from <= c.start).max_by_key(|p| p.effective_from);
        (
            AnnualTerm::New,
            price.ok_or_else(|| {
                invalid(format!(
                    "agreement `{agreement}`: offer `{}` has no annual price for `{}` in force at the purchase on {}",
                    offer.id, c.dimension, c.start
                ))
            })?,
        )
    };
    let year_end = c.start.plus_months(12);
    if c.end > year_end {
        return Err(invalid(format!(
            "agreement `{agreement}`: annual coverage of `{}` from {} runs past 12 months ({year_end}); a longer term is a renewal entry",
            c.dimension, c.start
        )));
    }
    let term_days = (c.end.millis() - c.start.millis() + DAY_MS - 1) / DAY_MS;
    let year_days = (year_end.millis() - c.start.millis()) / DAY_MS;
    let full = price.rate * Decimal::from(c.units);
    let amount = if c.end == year_end { full } else { full * Decimal::from(term_days) / Decimal::from(year_days) };
    Ok(Some(AnnualPurchase { price, term, term_days, year_days, amount }))
}

/// Load-time checks of an offer's annual prices: known dimension with an hourly price in every
/// version (no annual-only type); ≤ contract-rate decimals; $0 only beside a $0 hourly price and
/// another, non-zero annual type (PRC-12).
pub(super) fn check_offer_annual_prices(offer: &Offer, contract_dp: u32) -> Result<(), CatalogueError> {
    for p in &offer.annual_prices {
        let hourly: Vec<Option<&UsagePrice>> = offer.prices.iter().map(|v| v.usage.get(&p.dimension)).collect();
        if hourly.iter().any(Option::is_none) {
            return Err(invalid(format!(
                "offer `{}`: annual price for `{}`, which has no hourly price in every price version; every annual instance type needs an hourly price too (PRC-12)",
                offer.id, p.dimension
            )));
        }
        if p.rate.is_sign_negative() || decimal_places(p.rate) > contract_dp {
            return Err(invalid(format!(
                "offer `{}`: annual price {} for `{}` must be ≥ 0 with at most {contract_dp} decimal places",
                offer.id, p.rate, p.dimension
            )));
        }
        if p.rate.is_zero() {
            let hourly_free = hourly.iter().all(|h| matches!(h, Some(UsagePrice::PerUnit(r)) if r.is_zero()));
            let other_paid = offer.annual_prices.iter().any(|o| o.dimension != p.dimension && !o.rate.is_zero());
            if !hourly_free || !other_paid {
                return Err(invalid(format!(
                    "offer `{}`: a $0 annual price for `{}` is allowed only when its hourly price is $0 and another annual type is paid (PRC-12)",
                    offer.id, p.dimension
                )));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for p in &offer.annual_prices {
        if !seen.insert((p.dimension.as_str(), p.effective_from)) {
            return Err(invalid(format!(
                "offer `{}`: two annual prices for `{}` take effect at {}",
                offer.id, p.dimension, p.effective_from
            )));
        }
    }
    Ok(())
}

/// Load-time checks of one coverage entry: an hourly price for its instance type (else every
/// record for it would later be refused as not priced), the renewal chain, and the purchase's
/// price and payment schedule.
pub(super) fn check_coverage(
    agreement: &str,
    all: &[AnnualCoverage],
    c: &AnnualCoverage,
    offer: &Offer,
    notice_days: Option<u32>,
) -> Result<(), CatalogueError> {
    if offer.prices.iter().any(|v| v.effective_from < c.end && !v.usage.contains_key(&c.dimension)) {
        return Err(invalid(format!(
            "agreement `{agreement}`: annual coverage of `{}`, which has no hourly price in offer `{}`; every covered instance type needs an hourly price (PRC-12)",
            c.dimension, offer.id
        )));
    }
    if !offer.annual_prices.is_empty() && !offer.annual_prices.iter().any(|p| p.dimension == c.dimension) {
        return Err(invalid(format!(
            "agreement `{agreement}`: annual coverage of `{}`, for which offer `{}` sets no annual price (it prices other annual types)",
            c.dimension, offer.id
        )));
    }
    if c.renewal && !all.iter().any(|p| p.dimension == c.dimension && p.end == c.start && !std::ptr::eq(p, c)) {
        return Err(invalid(format!(
            "agreement `{agreement}`: annual renewal of `{}` on {} renews no coverage of that type ending then",
            c.dimension, c.start
        )));
    }
    let purchase = annual_purchase(agreement, offer, c, notice_days)?;
    if c.installments.is_empty() {
        return Ok(());
    }
    let Some(purchase) = purchase else {
        return Err(invalid(format!(
            "agreement `{agreement}`: installments for annual coverage of `{}`, which offer `{}` gives no annual price",
            c.dimension, offer.id
        )));
    };
    if offer.visibility != Visibility::Private {
        return Err(invalid(format!(
            "agreement `{agreement}`: installments for annual `{}`: flexible payment schedules are for private offers",
            c.dimension
        )));
    }
    if c.installments.len() > MAX_INSTALLMENTS {
        return Err(invalid(format!(
            "agreement `{agreement}`: annual `{}` has {} installments; a payment schedule has at most {MAX_INSTALLMENTS}",
            c.dimension,
            c.installments.len()
        )));
    }
    let minor = offer.currency.minor_units().unwrap_or(2);
    let mut sum = Decimal::ZERO;
    for Installment { date, amount } in &c.installments {
        if *date >= c.end {
            return Err(invalid(format!(
                "agreement `{agreement}`: annual `{}` installment of {amount} on {date} is after the coverage ends at {}",
                c.dimension, c.end
            )));
        }
        if *amount <= Decimal::ZERO || decimal_places(*amount) > minor {
            return Err(invalid(format!(
                "agreement `{agreement}`: annual `{}` installment amount {amount} is not a positive amount in {}",
                c.dimension, offer.currency
            )));
        }
        sum += amount;
    }
    let value = round_to_minor(purchase.amount, minor);
    if sum != value {
        return Err(invalid(format!(
            "agreement `{agreement}`: annual `{}` installments sum to {sum} but the purchase is worth {value} {}",
            c.dimension, offer.currency
        )));
    }
    Ok(())
}
