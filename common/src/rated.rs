//! What rating produces and what billing reads: rated hourly line items and monthly charge lines.
//!
//! A [`RatedRecord`] carries everything needed to trace its amount: the record and dedup ids,
//! the quantities before and after annual coverage, the rate, and which agreement, offer and
//! price-book version produced it. A [`ChargeLine`] is one invoice line; its amount is rounded
//! once, half-up, and the unrounded sum is kept beside it (domain-rules BIL-6).

use crate::id::{DedupKey, RecordId};
use crate::money::Currency;
use crate::pricing::UsagePrice;
use crate::time::{Hour, Month};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Kind of charge on an invoice line (RPT-6 `charge_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeType {
    /// Metered usage.
    Usage,
    /// A monthly fee, prorated by 1/30 per day (PRC-11).
    MonthlyFee,
    /// A contract's whole value, invoiced at acceptance (PRC-14).
    ContractUpfront,
    /// One date of a flexible payment schedule (PRC-19).
    Installment,
    /// A credit: the unused part of an upgraded contract, a free-trial instance (negative).
    Credit,
    /// Usage that arrived after its month was closed, booked on the next open month.
    Adjustment,
    /// An annual subscription invoiced in full at purchase or renewal (PRC-12).
    Annual,
    /// A refund (credit note) of an invoice line already billed: negative (BIL-9).
    Refund,
}

impl ChargeType {
    /// Every charge type, in invoice order.
    pub const ALL: [ChargeType; 8] = [
        ChargeType::Usage,
        ChargeType::MonthlyFee,
        ChargeType::ContractUpfront,
        ChargeType::Installment,
        ChargeType::Credit,
        ChargeType::Adjustment,
        ChargeType::Annual,
        ChargeType::Refund,
    ];
    /// The name stored in tables and exports (RPT-6).
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeType::Usage => "usage",
            ChargeType::MonthlyFee => "monthly_fee",
            ChargeType::ContractUpfront => "contract_upfront",
            ChargeType::Installment => "installment",
            ChargeType::Credit => "credit",
            ChargeType::Adjustment => "adjustment",
            ChargeType::Annual => "annual",
            ChargeType::Refund => "refund",
        }
    }
    /// Parses [`Self::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ChargeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One accepted usage record, rated. The unit the aggregator folds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatedRecord {
    /// The record's id (`MeteringRecordId`).
    pub record_id: RecordId,
    /// Its (product, customer, dimension, hour) slot.
    pub dedup_key: DedupKey,
    /// Seller of record.
    pub seller: String,
    /// Product code.
    pub product: String,
    /// Customer id.
    pub customer: String,
    /// Dimension key.
    pub dimension: String,
    /// Usage hour.
    pub hour: Hour,
    /// Quantity metered.
    pub quantity: Decimal,
    /// Part of the quantity covered by annual or contract units (X, capped at the quantity) or
    /// by a SaaS free trial.
    pub covered_quantity: Decimal,
    /// Quantity charged: `quantity − covered_quantity` after the model's own rounding (per-duration
    /// minimum and increment), never negative.
    pub billable_quantity: Decimal,
    /// Price per unit (for tiers: the first tier's rate; for packages: the block price).
    pub unit_rate: Decimal,
    /// Currency of the rate and amount.
    pub currency: Currency,
    /// The record's exact amount; zero for month-priced models (see `month_price`).
    pub amount: Decimal,
    /// For month-priced models (tiers, packages): the price the month's billable total is
    /// priced at, carried so that the fold needs no price book.
    pub month_price: Option<UsagePrice>,
    /// Pricing model of the dimension's price ([`UsagePrice::model`]).
    pub pricing_model: String,
    /// Set when the usage month was already closed and the profile books late usage as a
    /// correction: the (next open) month the `adjustment` line is booked on.
    pub booked_month: Option<Month>,
    /// Charge type.
    pub charge_type: ChargeType,
    /// Agreement in force.
    pub agreement_id: String,
    /// Offer whose prices applied.
    pub offer_id: String,
    /// Price-book version that produced the rate.
    pub price_book_version: String,
    /// The record's canonical `UsageAllocations` (empty when the seller sent none): carried to
    /// both stores for per-tag breakdowns. Last, so a record encoded before it existed decodes
    /// (see [`decode`]).
    pub allocations: Vec<crate::usage::Allocation>,
}

/// Decodes a rated record from a topic, also one encoded before `allocations` existed: that
/// encoding is the current one without the (empty) list's one-byte length, so it decodes once
/// the byte is appended. A payload that decodes neither way keeps the first error.
pub fn decode(payload: &[u8]) -> Result<RatedRecord, crate::codec::CodecError> {
    crate::codec::decode(payload).or_else(|first| {
        let mut with_empty_list = Vec::with_capacity(payload.len() + 1);
        with_empty_list.extend_from_slice(payload);
        with_empty_list.push(0);
        crate::codec::decode(&with_empty_list).map_err(|_| first)
    })
}

impl RatedRecord {
    /// The month of the usage.
    pub fn month(&self) -> Month {
        self.hour.month()
    }
    /// The month the record is billed on: its own, or the correction month.
    pub fn billing_month(&self) -> Month {
        self.booked_month.unwrap_or_else(|| self.month())
    }
    /// The invoice line this record folds into.
    pub fn line_key(&self) -> ChargeLineKey {
        ChargeLineKey {
            month: self.billing_month(),
            customer: self.customer.clone(),
            product: self.product.clone(),
            agreement_id: self.agreement_id.clone(),
            dimension: self.dimension.clone(),
            charge_type: self.charge_type,
            currency: self.currency,
        }
    }
}

/// The part of an `adjustment` line that corrects one closed month of a month-priced model
/// (graduated, volume, package): late units priced at the position the closed month had reached
/// (issue 17 item 2). The closed month's own line never changes; this is the delta.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Correction {
    /// The closed month corrected (the usage month of the late records).
    pub month: Month,
    /// Billable month-priced quantity the closed month's usage line had reached.
    #[serde(with = "crate::money::decimal_text")]
    pub closed_quantity: Decimal,
    /// Σ billable quantity of the late records of that month.
    #[serde(with = "crate::money::decimal_text")]
    pub late_quantity: Decimal,
    /// The price the closed month was priced at (its line's month price).
    pub price: UsagePrice,
}

impl Correction {
    /// The exact delta: [`UsagePrice::correction_amount`] of the late quantity at the closed one.
    pub fn amount(&self) -> Option<Decimal> {
        self.price.correction_amount(self.closed_quantity, self.late_quantity)
    }
}

/// The text both stores keep a line's corrections in (the `corrections` column): JSON, '' when
/// there are none.
pub fn corrections_text(c: &[Correction]) -> String {
    if c.is_empty() {
        return String::new();
    }
    // Months, prices and decimals as plain values: serialising cannot fail.
    serde_json::to_string(c).unwrap_or_default()
}

/// Parses [`corrections_text`].
pub fn parse_corrections(text: &str) -> Result<Vec<Correction>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text).map_err(|e| format!("corrections `{text}`: {e}"))
}

/// Identity of an invoice line: one per (month, customer, product, agreement, dimension, charge
/// type, currency) — per agreement, so a customer who moves from a public to a private offer
/// mid-month gets a line for each (BIL-6).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChargeLineKey {
    /// Billing month.
    pub month: Month,
    /// Customer id.
    pub customer: String,
    /// Product code.
    pub product: String,
    /// Agreement.
    pub agreement_id: String,
    /// Dimension key.
    pub dimension: String,
    /// Charge type.
    pub charge_type: ChargeType,
    /// Currency; lines in different currencies are never merged.
    pub currency: Currency,
}

/// One monthly invoice line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeLine {
    /// Billing month, `YYYY-MM`.
    pub month: String,
    /// Customer id.
    pub customer: String,
    /// Seller of record.
    pub seller: String,
    /// Product code.
    pub product: String,
    /// Agreement in force.
    pub agreement_id: String,
    /// Offer whose prices applied.
    pub offer_id: String,
    /// Dimension key.
    pub dimension: String,
    /// Charge type.
    pub charge_type: ChargeType,
    /// Pricing model (`per_unit`, `graduated`, `volume`, `package`, `per_duration`, `byol`).
    pub pricing_model: String,
    /// Currency.
    pub currency: Currency,
    /// Sum of metered quantities.
    pub quantity: Decimal,
    /// Sum of quantities covered by annual subscriptions.
    pub covered_quantity: Decimal,
    /// Sum of charged quantities.
    pub billable_quantity: Decimal,
    /// The unit rate when every record on the line had the same one (else absent: a price change
    /// within the month; the rated line items show each).
    pub unit_rate: Option<Decimal>,
    /// Exact sum of the records' amounts.
    pub amount_unrounded: Decimal,
    /// `amount_unrounded` rounded half-up to the currency's minor unit: the invoice figure.
    pub amount: Decimal,
    /// Number of rated records folded in.
    pub records: u64,
    /// For an `adjustment` line of a month-priced model: the closed months it corrects, each
    /// priced at the position its month had reached (the amount includes them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub corrections: Vec<Correction>,
}
