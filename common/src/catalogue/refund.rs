//! Refunds and credit notes (domain-rules §4.5, BIL-8/BIL-9, edge cases 54–55): a refund credits
//! one invoice line already billed, in full or in part. Month close books it in the month it is
//! issued as a negative `refund` line that names the line it credits, with the listing fee, the
//! cost of goods and each party's net reversed in the same proportion. Billing events are
//! immutable: the credited line never changes.
//!
//! Checked here (the book alone): the agreement exists, exactly one of `fraction` (0 < f ≤ 1)
//! or `amount` (> 0, in the offer's minor units), fractions of one line sum to at most 1, a
//! private-offer refund carries the seller's authorisation, the refund is issued no earlier than
//! the credited month. Checked by month close (it knows what was billed): the line exists, and
//! the refunds of a line never exceed what it billed.

use super::{invalid, CatalogueError, PriceBookDoc, Visibility};
use crate::money::{decimal_places, opt_decimal_text};
use crate::rated::ChargeType;
use crate::time::{Month, Timestamp};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A refund of (part of) one invoice line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refund {
    /// Refund (credit note) id, unique in the book.
    pub id: String,
    /// Agreement of the credited line.
    pub agreement: String,
    /// Billing month of the credited line, `YYYY-MM`.
    pub month: String,
    /// Charge type of the credited line.
    pub charge_type: ChargeType,
    /// Dimension of the credited line (empty for agreement-level charges).
    #[serde(default)]
    pub dimension: String,
    /// Invoice date of the credited line, `YYYY-MM-DD`, when several lines match otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoice_date: Option<String>,
    /// Share of the line refunded, 0 < f ≤ 1 (1 = full refund).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_decimal_text")]
    pub fraction: Option<Decimal>,
    /// Amount refunded, in the line's currency (instead of a fraction).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_decimal_text")]
    pub amount: Option<Decimal>,
    /// When the credit note is issued: the refund line goes on that month's close.
    #[serde(with = "crate::time::rfc3339")]
    pub issued: Timestamp,
    /// Why (cancellation within 48 h, metering error …), printed on the line.
    pub reason: String,
    /// The seller authorised it: required for private-offer refunds (BIL-8).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seller_authorised: bool,
}

impl Refund {
    /// The credited line's billing month (validated at load).
    pub fn credited_month(&self) -> Month {
        Month::parse(&self.month).unwrap_or_else(|_| self.issued.month())
    }
}

/// Load-time checks of `doc.refunds` (see the module header).
pub(super) fn check_refunds(doc: &PriceBookDoc) -> Result<(), CatalogueError> {
    let mut ids = std::collections::HashSet::new();
    let mut fractions: HashMap<(&str, &str, ChargeType, &str, Option<&str>), Decimal> = HashMap::new();
    for r in &doc.refunds {
        let err = |what: String| invalid(format!("refund `{}`: {what}", r.id));
        if r.id.is_empty() || !ids.insert(r.id.as_str()) {
            return Err(err("refund ids must be non-empty and unique".into()));
        }
        let Some(a) = doc.agreements.iter().find(|a| a.id == r.agreement) else {
            return Err(err(format!("agreement `{}` is not defined", r.agreement)));
        };
        let Some(o) = doc.offers.iter().find(|o| o.id == a.offer) else {
            return Err(err(format!("agreement `{}` has no offer", r.agreement)));
        };
        let month = Month::parse(&r.month).map_err(|e| err(format!("month `{}`: {e}", r.month)))?;
        if r.issued < month.start() {
            return Err(err(format!(
                "issued {} before the credited month {} began; a refund credits a line already billed",
                r.issued, r.month
            )));
        }
        if r.reason.trim().is_empty() {
            return Err(err("a refund needs a reason (printed on the credit note)".into()));
        }
        if matches!(r.charge_type, ChargeType::Refund | ChargeType::Credit) {
            return Err(err(format!("a {} line is already a credit; only charges are refunded", r.charge_type)));
        }
        if o.visibility == Visibility::Private && !r.seller_authorised {
            return Err(err(format!(
                "agreement `{}` is on private offer `{}`: its refunds need the seller's authorisation (seller_authorised = true, BIL-8)",
                r.agreement, o.id
            )));
        }
        match (r.fraction, r.amount) {
            (Some(f), None) => {
                if f <= Decimal::ZERO || f > Decimal::ONE {
                    return Err(err(format!("fraction {f} must be in (0, 1]")));
                }
                let key = (
                    r.agreement.as_str(),
                    r.month.as_str(),
                    r.charge_type,
                    r.dimension.as_str(),
                    r.invoice_date.as_deref(),
                );
                let total = fractions.entry(key).or_default();
                *total += f;
                if *total > Decimal::ONE {
                    return Err(err(format!(
                        "refunds of the {} line of `{}` in {} add up to {} of it; never more than was billed",
                        r.charge_type, r.agreement, r.month, total
                    )));
                }
            }
            (None, Some(amount)) => {
                let minor = o.currency.minor_units().unwrap_or(2);
                if amount <= Decimal::ZERO || decimal_places(amount) > minor {
                    return Err(err(format!("amount {amount} is not a positive amount in {}", o.currency)));
                }
            }
            _ => return Err(err("give either fraction (0 < f ≤ 1) or amount, not both".into())),
        }
    }
    Ok(())
}
