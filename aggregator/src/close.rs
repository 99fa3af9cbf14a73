//! PURE. Month close: a month's usage lines plus the price book's terms in, invoice lines out.
//!
//! The fold ([`crate::rollup`]) gives one exact line per (agreement, dimension) of metered usage.
//! Closing a month adds everything that is not metered and prices who gets what:
//! - monthly fees, prorated by 1/30 per day at start and cancellation (PRC-11);
//! - contract value upfront at acceptance, or per installment on its date (an installment dated
//!   before acceptance is invoiced at acceptance); the unused part of an upgraded contract as a
//!   prorated credit (PRC-14, PRC-19);
//! - annual purchases (PRC-12): each annual coverage entry its offer prices, once at its start,
//!   in full or per installment, at the new-subscription or the auto-renewal price
//!   ([`common::catalogue::annual_purchase`]);
//! - the AMI free trial: in each trial hour one instance of the most expensive instance type
//!   running is free, as a credit on that type's line (PRC-17);
//! - refunds issued in the month (§4.5): a negative line naming the line it credits, every share
//!   reversed in proportion, never more than was billed ([`refund`]);
//! - for every line: seller of record and manufacturer, the listing fee by offer type and total
//!   contract value (+ the channel uplift for resale), the wholesale cost of goods a channel
//!   partner owes upstream (the manufacturer, or in the two-level DSOR channel model the DSOR
//!   partner, who owes the manufacturer in turn), and each party's net (PRC-20–22), each computed
//!   on that party's own share and rounded half-up once per line;
//! - a reporting amount through the effective-dated FX table (reporting only).
//!
//! Every amount is exact until it is rounded once per line; the unrounded amount stays beside it.

use common::catalogue::{
    annual_purchase, contract_value, Agreement, AnnualTerm, Channel, Delivery, LateUsage, ListingFees, Offer,
    PriceBook, ResaleAuthorization, TrialKind, Visibility,
};
use common::money::{round_to_minor, Currency};
use common::rated::{ChargeLine, ChargeType, Correction};
use common::time::{Hour, Month, Timestamp, DAY_MS};
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

mod refund;
pub mod timing;

/// Why a month cannot be closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseError {
    /// The marketplace profile lacks a parameter the close needs (nothing is assumed).
    #[error("marketplace `{marketplace}` sets no {what}: month close needs it (no AWS default is assumed)")]
    MissingProfile {
        /// Profile id.
        marketplace: String,
        /// Missing parameter.
        what: &'static str,
    },
    /// A line names an agreement or offer the price book does not have.
    #[error("charge line of agreement `{0}` has no agreement or offer in this price book")]
    UnknownAgreement(String),
    /// An annual purchase cannot be priced (the book's load-time checks make this unreachable
    /// for a validated book).
    #[error("annual purchase: {0}")]
    Annual(String),
    /// A refund names a line its month does not have.
    #[error("refund `{refund}`: {why}")]
    RefundedLineNotFound {
        /// Refund id.
        refund: String,
        /// Which line was looked for, and what was found.
        why: String,
    },
    /// The refunds of a line would credit more than it billed.
    #[error("refund `{refund}`: refunds of line {line} would total {refunded}, more than its billed {billed}; never more than was billed")]
    RefundExceedsBilled {
        /// Refund id.
        refund: String,
        /// The credited line ([`InvoiceLine::line_key`]).
        line: String,
        /// What the line billed.
        billed: Decimal,
        /// What its refunds up to this one credit (positive).
        refunded: Decimal,
    },
    /// Arithmetic left the exact range.
    #[error("amount of {0} overflows exact decimal arithmetic")]
    Overflow(String),
}

/// One hour of one instance type under a trial agreement (input to the AMI trial credit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialHourUsage {
    /// Agreement.
    pub agreement_id: String,
    /// Hour.
    pub hour: Hour,
    /// Instance-type dimension.
    pub dimension: String,
    /// Billable instances that hour.
    pub billable_quantity: Decimal,
    /// Hourly rate of that type.
    pub unit_rate: Decimal,
}

/// One invoice line as month close writes it (the RPT-6 columns).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvoiceLine {
    /// Billing month, `YYYY-MM`.
    pub billing_month: String,
    /// Usage period start (UTC).
    pub usage_period_start: String,
    /// Usage period end (UTC, exclusive).
    pub usage_period_end: String,
    /// Marketplace profile.
    pub marketplace: String,
    /// Billing entity.
    pub broker_id: String,
    /// Invoice the line belongs to: one per (month, customer, currency, invoice date).
    pub invoice_id: String,
    /// Invoice date.
    pub invoice_date: String,
    /// Seller of record (the partner for resale).
    pub seller_of_record: String,
    /// Manufacturer (ISV).
    pub manufacturer: String,
    /// direct | cppo | dsor.
    pub channel: String,
    /// Customer (payer).
    pub customer: String,
    /// Legacy `CustomerIdentifier`, if known.
    pub customer_identifier: String,
    /// AWS account id, if known.
    pub payer_account_id: String,
    /// Product code.
    pub product: String,
    /// Offer.
    pub offer_id: String,
    /// public | private.
    pub offer_visibility: String,
    /// Agreement.
    pub agreement_id: String,
    /// Dimension key (empty for agreement-level charges).
    pub dimension: String,
    /// Unit shown on the invoice.
    pub usage_unit: String,
    /// usage | monthly_fee | contract_upfront | installment | credit | adjustment.
    pub charge_type: ChargeType,
    /// What the line is, in words.
    pub description: String,
    /// Pricing model of usage lines.
    pub pricing_model: String,
    /// Quantity billed.
    pub quantity: Decimal,
    /// Rate, when one applied.
    pub unit_rate: Option<Decimal>,
    /// Currency of every amount on the line.
    pub currency: Currency,
    /// Exact amount.
    pub amount_unrounded: Decimal,
    /// What the customer is billed: rounded half-up once to the minor unit.
    pub customer_billed_amount: Decimal,
    /// Listing-fee rate applied to the seller of record's share.
    pub listing_fee_rate: Decimal,
    /// The seller of record's listing fee, rounded.
    pub listing_fee: Decimal,
    /// Wholesale a partner owes the manufacturer, rounded (0 for direct sales).
    pub cost_of_goods: Decimal,
    /// The manufacturer's listing fee on the wholesale, rounded (0 for direct sales).
    pub manufacturer_listing_fee: Decimal,
    /// Seller of record's net: billed − listing fee − cost of goods.
    pub seller_net: Decimal,
    /// Manufacturer's net on resale: cost of goods − its fee (0 for direct sales).
    pub manufacturer_net: Decimal,
    /// Reporting currency, if the profile sets one.
    pub reporting_currency: Option<Currency>,
    /// The billed amount converted for reporting (absent when no FX rate is known).
    pub reporting_amount: Option<Decimal>,
    /// Rated records folded into a usage line.
    pub metering_records: u64,
    /// For a correction (an `adjustment` line of a month-priced model): the closed months it
    /// corrects, `YYYY-MM`, space-separated; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub corrects: String,
    /// For a refund: the line it credits ([`InvoiceLine::line_key`]); empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credits_line: String,
    /// Two-level resale (DSOR channel model): the DSOR partner between the seller of record and
    /// the manufacturer, and its share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributor: Option<DistributorShare>,
}

/// The middle party's share of a two-level resale line: it receives the seller of record's cost
/// of goods and owes the manufacturer its own wholesale (all rounded once, like the line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DistributorShare {
    /// The DSOR partner (seller id).
    pub party: String,
    /// Wholesale it owes the manufacturer.
    pub cost_of_goods: Decimal,
    /// Its listing fee, on its margin (received − owed).
    pub listing_fee: Decimal,
    /// Its net: received − owed − fee.
    pub net: Decimal,
}

impl InvoiceLine {
    /// A line's identity across closes: invoice, agreement, charge type and dimension (an
    /// invoice id names the month, customer, currency and invoice date).
    pub fn line_key(&self) -> String {
        format!("{}/{}/{}/{}", self.invoice_id, self.agreement_id, self.charge_type, self.dimension)
    }
}

/// Who sells under an offer (PRC-20/21): the seller of record (the partner for resale), the
/// manufacturer, and the channel. One reading for the close's invoice lines and the fold's
/// ClickHouse `monthly_charges` rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parties {
    /// Seller of record.
    pub seller_of_record: String,
    /// Manufacturer (ISV).
    pub manufacturer: String,
    /// direct, cppo or dsor.
    pub channel: Channel,
}

/// The [`Parties`] of offer `o`: its resale authorisation's partner and manufacturer, else the
/// product's seller selling directly.
pub fn parties(book: &PriceBook, o: &Offer) -> Parties {
    match o.resale.as_deref().and_then(|id| book.resale(id)) {
        Some(r) => {
            Parties { seller_of_record: r.partner.clone(), manufacturer: r.manufacturer.clone(), channel: r.channel }
        }
        None => {
            let seller = book.product(&o.product).map(|p| p.seller.clone()).unwrap_or_default();
            Parties { seller_of_record: seller.clone(), manufacturer: seller, channel: Channel::Direct }
        }
    }
}

/// The [`Parties`] of a usage line of offer `offer_id` metered by `seller`: an offer the book
/// does not have is read as `seller`'s direct sale.
pub fn line_parties(book: &PriceBook, offer_id: &str, seller: &str) -> Parties {
    match book.offer(offer_id) {
        Some(o) => parties(book, o),
        None => {
            Parties { seller_of_record: seller.to_owned(), manufacturer: seller.to_owned(), channel: Channel::Direct }
        }
    }
}

/// The invoice a line goes on: one per (month, customer, currency, invoice date).
pub(crate) fn invoice_id(month: Month, customer: &str, currency: Currency, invoice_date: &str) -> String {
    format!("INV-{month}-{customer}-{currency}-{}", invoice_date.replace('-', ""))
}

/// A closed month.
#[derive(Debug, Clone, Serialize)]
pub struct MonthClose {
    /// Month.
    pub month: String,
    /// Marketplace profile.
    pub marketplace: String,
    /// Price-book version used.
    pub price_book_version: String,
    /// The profile's policy for usage arriving after the close.
    pub late_usage: LateUsage,
    /// Invoice lines, sorted by customer, currency, product, agreement, charge type, dimension.
    pub lines: Vec<InvoiceLine>,
    /// Notes the operator should read (e.g. a missing FX rate).
    pub warnings: Vec<String>,
}

/// Closes `month`: `usage` are the month's usage lines from the fold; `trial_hours` the hourly
/// items of agreements with an AMI one-instance trial ([`ami_trial_agreements`]).
///
/// Refunds issued in `month` credit lines of this or earlier months. A credited line of an
/// earlier month is recomputed by the same close from that month's usage, so `usage` must also
/// hold the usage lines of the months [`refund_months`] names (lines of other months are
/// ignored); lines that need no usage (fees, contracts, annual purchases) need nothing more.
pub fn close_month(
    book: &PriceBook,
    month: Month,
    usage: &[ChargeLine],
    trial_hours: &[TrialHourUsage],
) -> Result<MonthClose, CloseError> {
    let mut close = close_charges(book, month, usage, trial_hours)?;
    let mut refunds = refund::Refunds::new(book, usage);
    let lines = refunds.lines_issued_in(month, &close.lines)?;
    close.warnings.extend(refunds.warnings);
    close.lines.extend(lines);
    sort_lines(&mut close.lines);
    Ok(close)
}

/// The earlier months whose usage lines [`close_month`] of `month` needs for its refunds.
pub fn refund_months(book: &PriceBook, month: Month) -> Vec<Month> {
    let mut months: Vec<Month> = book
        .doc()
        .refunds
        .iter()
        .filter(|r| r.issued.month() == month && r.credited_month() != month)
        .map(|r| r.credited_month())
        .collect();
    months.sort();
    months.dedup();
    months
}

/// Every charge of `month` except refunds (which credit what this produces).
pub(crate) fn close_charges(
    book: &PriceBook,
    month: Month,
    usage: &[ChargeLine],
    trial_hours: &[TrialHourUsage],
) -> Result<MonthClose, CloseError> {
    let profile = book.marketplace();
    let missing = |what| CloseError::MissingProfile { marketplace: profile.id.clone(), what };
    let fees = profile.listing_fees.as_ref().ok_or_else(|| missing("listing_fees"))?;
    let late_usage = profile.late_usage.ok_or_else(|| missing("late_usage"))?;
    let mut cx = Closer { book, month, fees, lines: Vec::new(), warnings: Vec::new() };

    for u in usage.iter().filter(|u| u.month == month.to_string()) {
        let (a, o) = cx.agreement_offer(&u.agreement_id)?;
        let unit = book.dimension(&u.product, &u.dimension).map(|d| d.unit.clone()).unwrap_or_default();
        let draft = Draft {
            charge_type: u.charge_type,
            dimension: u.dimension.clone(),
            unit,
            description: if u.charge_type == ChargeType::Adjustment {
                correction_description(u)
            } else {
                format!("{} usage of {}", u.pricing_model, u.dimension)
            },
            pricing_model: u.pricing_model.clone(),
            quantity: u.billable_quantity,
            unit_rate: u.unit_rate,
            amount: u.amount_unrounded,
            invoice_date: month.end(),
            records: u.records,
            wholesale: if u.corrections.is_empty() {
                Wholesale::Usage { dimension: &u.dimension, quantity: u.billable_quantity }
            } else {
                Wholesale::Correction { dimension: &u.dimension, corrections: &u.corrections }
            },
        };
        cx.push(a, o, draft)?;
        if !u.corrections.is_empty() {
            let line = cx.lines.last_mut().expect("pushed above");
            line.corrects = u.corrections.iter().map(|c| c.month.to_string()).collect::<Vec<_>>().join(" ");
        }
    }
    for a in &book.doc().agreements {
        let Some(o) = book.offer(&a.offer) else { return Err(CloseError::UnknownAgreement(a.id.clone())) };
        cx.monthly_fee(a, o)?;
        cx.contract_charges(a, o)?;
        cx.annual_charges(a, o)?;
    }
    cx.ami_trial_credits(trial_hours)?;

    let mut lines = cx.lines;
    sort_lines(&mut lines);
    Ok(MonthClose {
        month: month.to_string(),
        marketplace: profile.id.clone(),
        price_book_version: book.version().to_owned(),
        late_usage,
        lines,
        warnings: cx.warnings,
    })
}

/// What an `adjustment` line is: late usage of closed months, with the position each corrected
/// month had reached when it is month-priced (issue 17 item 2).
fn correction_description(u: &ChargeLine) -> String {
    if u.corrections.is_empty() {
        return format!("correction: late {} usage of {} for a month already closed", u.pricing_model, u.dimension);
    }
    let each: Vec<String> = u
        .corrections
        .iter()
        .map(|c| {
            format!(
                "{}: {} late units priced from {} to {} (the position {} had reached; its lines unchanged)",
                c.month,
                c.late_quantity.normalize(),
                c.closed_quantity.normalize(),
                (c.closed_quantity + c.late_quantity).normalize(),
                c.month
            )
        })
        .collect();
    format!("correction of {} usage of {}: {}", u.pricing_model, u.dimension, each.join("; "))
}

fn sort_lines(lines: &mut [InvoiceLine]) {
    lines.sort_by(|x, y| {
        (&x.customer, x.currency, &x.product, &x.agreement_id, x.charge_type, &x.dimension, &x.invoice_date).cmp(&(
            &y.customer,
            y.currency,
            &y.product,
            &y.agreement_id,
            y.charge_type,
            &y.dimension,
            &y.invoice_date,
        ))
    });
}

/// Agreements whose offer has an AMI one-instance free trial overlapping `month`: the shell
/// reads their hourly items for [`close_month`].
pub fn ami_trial_agreements(book: &PriceBook, month: Month) -> Vec<String> {
    book.doc()
        .agreements
        .iter()
        .filter(|a| {
            book.offer(&a.offer).and_then(|o| o.free_trial.as_ref()).is_some_and(|t| {
                t.kind == TrialKind::AmiOneInstance && a.start < month.end() && trial_end(a, t.days) > month.start()
            })
        })
        .map(|a| a.id.clone())
        .collect()
}

fn trial_end(a: &Agreement, days: u32) -> Timestamp {
    a.start.plus_millis(i64::from(days) * DAY_MS)
}

/// What a line's wholesale (cost of goods) is computed from.
enum Wholesale<'a> {
    /// Usage of a dimension.
    Usage { dimension: &'a str, quantity: Decimal },
    /// Late usage of closed months of a month-priced dimension: the wholesale delta of each
    /// correction, at the position its month had reached ([`common::pricing::UsagePrice::correction_amount`]).
    Correction { dimension: &'a str, corrections: &'a [Correction] },
    /// A share of the contract value (upfront, installment, credit): wholesale is the same share
    /// of the wholesale contract value.
    Contract { fraction: Decimal },
    /// Monthly fees and trial credits: the list discount applies to the amount itself.
    Amount,
}

struct Draft<'a> {
    charge_type: ChargeType,
    dimension: String,
    unit: String,
    description: String,
    pricing_model: String,
    quantity: Decimal,
    unit_rate: Option<Decimal>,
    amount: Decimal,
    invoice_date: Timestamp,
    records: u64,
    wholesale: Wholesale<'a>,
}

struct Closer<'b> {
    book: &'b PriceBook,
    month: Month,
    fees: &'b ListingFees,
    lines: Vec<InvoiceLine>,
    warnings: Vec<String>,
}

impl<'b> Closer<'b> {
    fn agreement_offer(&self, id: &str) -> Result<(&'b Agreement, &'b Offer), CloseError> {
        let a = self.book.agreement(id).ok_or_else(|| CloseError::UnknownAgreement(id.to_owned()))?;
        let o = self.book.offer(&a.offer).ok_or_else(|| CloseError::UnknownAgreement(id.to_owned()))?;
        Ok((a, o))
    }

    fn in_month(&self, t: Timestamp) -> bool {
        self.month.start() <= t && t < self.month.end()
    }

    /// PRC-11: the fee times active days / 30, or the whole fee for a whole month.
    fn monthly_fee(&mut self, a: &'b Agreement, o: &'b Offer) -> Result<(), CloseError> {
        let Some(fee) = o.monthly_fee else { return Ok(()) };
        let from = a.start.max(self.month.start());
        let to = a.end.unwrap_or(Timestamp(i64::MAX)).min(self.month.end());
        if from >= to {
            return Ok(());
        }
        let whole = from == self.month.start() && to == self.month.end();
        let days = (to.millis() - from.millis() + DAY_MS - 1) / DAY_MS;
        let amount = if whole { fee } else { fee * Decimal::from(days.min(30)) / Decimal::from(30) };
        let description = if whole {
            "monthly fee".to_owned()
        } else {
            format!("monthly fee, {days}/30 of the month ({} to {})", date(from), date(to))
        };
        self.push(
            a,
            o,
            Draft {
                charge_type: ChargeType::MonthlyFee,
                dimension: String::new(),
                unit: "month".into(),
                description,
                pricing_model: "monthly_fee".into(),
                quantity: if whole { Decimal::ONE } else { Decimal::from(days.min(30)) },
                unit_rate: Some(if whole { fee } else { fee / Decimal::from(30) }),
                amount,
                invoice_date: self.month.end(),
                records: 0,
                wholesale: Wholesale::Amount,
            },
        )
    }

    /// PRC-14/19: upfront at acceptance, or installments on their dates; upgrade credits.
    fn contract_charges(&mut self, a: &'b Agreement, o: &'b Offer) -> Result<(), CloseError> {
        let Some(c) = &a.contract else { return Ok(()) };
        let tcv = contract_value(o, c).ok_or_else(|| CloseError::Overflow(a.id.clone()))?;
        let signed = a.signed_at();
        let describe =
            || c.quantities.iter().map(|q| format!("{} × {}", q.quantity, q.dimension)).collect::<Vec<_>>().join(", ");
        if c.installments.is_empty() {
            if self.in_month(signed) {
                self.push(
                    a,
                    o,
                    Draft {
                        charge_type: ChargeType::ContractUpfront,
                        dimension: String::new(),
                        unit: "contract".into(),
                        description: format!("{}-month contract, {}, invoiced at acceptance", c.months, describe()),
                        pricing_model: "contract".into(),
                        quantity: Decimal::ONE,
                        unit_rate: Some(tcv),
                        amount: tcv,
                        invoice_date: signed,
                        records: 0,
                        wholesale: Wholesale::Contract { fraction: Decimal::ONE },
                    },
                )?;
            }
        } else {
            // An upgrade cancels the replaced contract's installments from its start on.
            let cancelled_from = self.upgraded_at(a);
            for (n, i) in c.installments.iter().enumerate() {
                let date = i.date.max(signed);
                if !self.in_month(date) || cancelled_from.is_some_and(|u| i.date >= u) {
                    continue;
                }
                self.push(
                    a,
                    o,
                    Draft {
                        charge_type: ChargeType::Installment,
                        dimension: String::new(),
                        unit: "installment".into(),
                        description: format!(
                            "installment {} of {} of the {}-month contract ({})",
                            n + 1,
                            c.installments.len(),
                            c.months,
                            describe()
                        ),
                        pricing_model: "contract".into(),
                        quantity: Decimal::ONE,
                        unit_rate: Some(i.amount),
                        amount: i.amount,
                        invoice_date: date,
                        records: 0,
                        wholesale: Wholesale::Contract { fraction: i.amount / tcv },
                    },
                )?;
            }
        }
        if let Some(old_id) = &c.replaces {
            if self.in_month(a.start) {
                self.upgrade_credit(a, old_id)?;
            }
        }
        Ok(())
    }

    /// PRC-12: each annual coverage entry the offer prices is invoiced at its start (purchase or
    /// auto-renewal), in full or per installment; the price follows [`annual_purchase`].
    fn annual_charges(&mut self, a: &'b Agreement, o: &'b Offer) -> Result<(), CloseError> {
        let notice_days = self.book.marketplace().price_change_notice_days;
        for c in &a.annual {
            let purchase = annual_purchase(&a.id, o, c, notice_days).map_err(|e| CloseError::Annual(e.to_string()))?;
            let Some(p) = purchase else {
                if self.in_month(c.start) {
                    self.warnings.push(format!(
                        "agreement `{}`: annual coverage of {} × {} from {} has no annual price in offer `{}`; netted against usage but not invoiced here",
                        a.id, c.units, c.dimension, date(c.start), o.id
                    ));
                }
                continue;
            };
            let what = format!(
                "annual subscription{}, {} × {} from {} to {}{}",
                if p.term == AnnualTerm::Renewal { " renewal" } else { "" },
                c.units,
                c.dimension,
                date(c.start),
                date(c.end),
                if p.term_days == p.year_days {
                    String::new()
                } else {
                    format!(", {}/{} days of a year", p.term_days, p.year_days)
                },
            );
            let price_note = match p.term {
                AnnualTerm::New => format!("price {} set {}", p.price.rate, date(p.price.effective_from)),
                AnnualTerm::Renewal => format!(
                    "price {} set {}, the latest set at least {} days before the renewal",
                    p.price.rate,
                    date(p.price.effective_from),
                    notice_days.unwrap_or_default()
                ),
            };
            let line = |charge_type, description: String, amount: Decimal, invoice_date| Draft {
                charge_type,
                dimension: c.dimension.clone(),
                unit: "instance-year".into(),
                description,
                pricing_model: "annual".into(),
                quantity: Decimal::from(c.units),
                unit_rate: Some(p.price.rate),
                amount,
                invoice_date,
                records: 0,
                wholesale: Wholesale::Amount,
            };
            if c.installments.is_empty() {
                if self.in_month(c.start) {
                    let d = line(
                        ChargeType::Annual,
                        format!("{what}, invoiced at purchase ({price_note})"),
                        p.amount,
                        c.start,
                    );
                    self.push(a, o, d)?;
                }
                continue;
            }
            for (n, i) in c.installments.iter().enumerate() {
                // An installment dated before the purchase is invoiced at the purchase.
                let on = i.date.max(c.start);
                if self.in_month(on) {
                    let description =
                        format!("installment {} of {} of the {what} ({price_note})", n + 1, c.installments.len());
                    self.push(a, o, line(ChargeType::Installment, description, i.amount, on))?;
                }
            }
        }
        Ok(())
    }

    /// When an agreement's contract was replaced by an upgrade, the upgrade's start.
    fn upgraded_at(&self, a: &Agreement) -> Option<Timestamp> {
        self.book
            .doc()
            .agreements
            .iter()
            .find(|n| n.contract.as_ref().and_then(|c| c.replaces.as_deref()) == Some(a.id.as_str()))
            .map(|n| n.start)
    }

    /// The unused part of the replaced contract, pro rata by day: what was invoiced for it minus
    /// the value of the days used.
    fn upgrade_credit(&mut self, new: &'b Agreement, old_id: &str) -> Result<(), CloseError> {
        let (old, oo) = self.agreement_offer(old_id)?;
        let Some(oc) = &old.contract else { return Ok(()) };
        let tcv = contract_value(oo, oc).ok_or_else(|| CloseError::Overflow(old.id.clone()))?;
        let end = old.start.plus_months(oc.months);
        let term_days = Decimal::from((end.millis() - old.start.millis()) / DAY_MS);
        let used_days = Decimal::from((new.start.millis() - old.start.millis()) / DAY_MS);
        let invoiced: Decimal = if oc.installments.is_empty() {
            tcv
        } else {
            oc.installments.iter().filter(|i| i.date < new.start).map(|i| i.amount).sum()
        };
        let credit = invoiced - tcv * used_days / term_days;
        if credit <= Decimal::ZERO {
            return Ok(());
        }
        self.push(
            old,
            oo,
            Draft {
                charge_type: ChargeType::Credit,
                dimension: String::new(),
                unit: "contract".into(),
                description: format!(
                    "prorated credit for the unused {} of {} days of `{}`, upgraded by `{}`",
                    term_days - used_days,
                    term_days,
                    old.id,
                    new.id
                ),
                pricing_model: "contract".into(),
                quantity: Decimal::ONE,
                unit_rate: None,
                amount: -credit,
                invoice_date: new.start,
                records: 0,
                wholesale: Wholesale::Contract { fraction: -credit / tcv },
            },
        )
    }

    /// PRC-17: one instance of the most expensive type running in each trial hour is free.
    fn ami_trial_credits(&mut self, hours: &[TrialHourUsage]) -> Result<(), CloseError> {
        let mut by_hour: BTreeMap<(&str, Hour), &TrialHourUsage> = BTreeMap::new();
        for h in hours.iter().filter(|h| h.billable_quantity >= Decimal::ONE && h.hour.month() == self.month) {
            let best = by_hour.entry((h.agreement_id.as_str(), h.hour)).or_insert(h);
            // Most expensive wins; ties go to the first dimension by name, so the credit is stable.
            if (h.unit_rate, std::cmp::Reverse(&h.dimension)) > (best.unit_rate, std::cmp::Reverse(&best.dimension)) {
                *best = h;
            }
        }
        let mut credits: BTreeMap<(&str, &str), (Decimal, Decimal, Decimal)> = BTreeMap::new();
        for ((agreement, hour), h) in by_hour {
            let Ok((a, o)) = self.agreement_offer(agreement) else { continue };
            let Some(t) = o.free_trial.as_ref().filter(|t| t.kind == TrialKind::AmiOneInstance) else { continue };
            if hour.start() < a.start || hour.start() >= trial_end(a, t.days) {
                continue;
            }
            let c = credits.entry((agreement, h.dimension.as_str())).or_default();
            c.0 += Decimal::ONE;
            c.1 += h.unit_rate;
            c.2 = h.unit_rate;
        }
        for ((agreement, dimension), (hours, amount, rate)) in credits {
            let (a, o) = self.agreement_offer(agreement)?;
            let unit = self.book.dimension(&a.product, dimension).map(|d| d.unit.clone()).unwrap_or_default();
            self.push(
                a,
                o,
                Draft {
                    charge_type: ChargeType::Credit,
                    dimension: dimension.to_owned(),
                    unit,
                    description: format!("free trial: one {dimension} instance free in {hours} trial hours (the most expensive type running)"),
                    pricing_model: "free_trial".into(),
                    quantity: hours,
                    unit_rate: Some(rate),
                    amount: -amount,
                    invoice_date: self.month.end(),
                    records: 0,
                    wholesale: Wholesale::Amount,
                },
            )?;
        }
        Ok(())
    }

    /// The listing-fee rate of an agreement (PRC-22).
    fn fee_rate(&self, a: &Agreement, o: &Offer, channel: Channel) -> Decimal {
        let delivery = self.book.product(&o.product).map_or(Delivery::Saas, |p| p.delivery);
        let tcv = a.contract.as_ref().and_then(|c| contract_value(o, c)).unwrap_or_default();
        listing_fee_rate(self.fees, o.visibility, delivery, a.renewal, tcv, channel)
    }

    /// The exact wholesale owed upstream for a line under authorisation `r`.
    fn wholesale(
        &self,
        r: &ResaleAuthorization,
        a: &Agreement,
        o: &Offer,
        amount: Decimal,
        w: &Wholesale<'_>,
    ) -> Option<Decimal> {
        if let Some(discount) = r.discount {
            let keep = Decimal::ONE - discount;
            let list = self.book.offer(r.list_offer.as_deref()?)?;
            return match w {
                Wholesale::Usage { dimension, quantity } => {
                    let version = list.prices.iter().rev().find(|v| v.effective_from < self.month.end())?;
                    version.usage.get(*dimension)?.month_amount(*quantity).map(|l| l * keep)
                }
                Wholesale::Correction { dimension, corrections } => {
                    corrections.iter().try_fold(Decimal::ZERO, |sum, c| {
                        // The list price in force in the corrected month.
                        let version = list.prices.iter().rev().find(|v| v.effective_from < c.month.end())?;
                        let delta =
                            version.usage.get(*dimension)?.correction_amount(c.closed_quantity, c.late_quantity)?;
                        sum.checked_add(delta * keep)
                    })
                }
                Wholesale::Contract { fraction } => {
                    let c = a.contract.as_ref()?;
                    contract_value(list, c).map(|l| l * keep * fraction)
                }
                Wholesale::Amount => Some(amount * keep),
            };
        }
        match w {
            Wholesale::Usage { dimension, quantity } => r.wholesale_usage.get(*dimension)?.month_amount(*quantity),
            Wholesale::Correction { dimension, corrections } => {
                let price = r.wholesale_usage.get(*dimension)?;
                corrections.iter().try_fold(Decimal::ZERO, |sum, c| {
                    sum.checked_add(price.correction_amount(c.closed_quantity, c.late_quantity)?)
                })
            }
            Wholesale::Contract { fraction } => {
                let c = a.contract.as_ref()?;
                let card = Offer { contract_prices: r.wholesale_contract.clone(), ..o.clone() };
                contract_value(&card, c).map(|v| v * fraction)
            }
            Wholesale::Amount => Some(amount),
        }
    }

    fn push(&mut self, a: &Agreement, o: &Offer, d: Draft<'_>) -> Result<(), CloseError> {
        let book = self.book;
        let profile = book.marketplace();
        let minor = o.currency.minor_units().unwrap_or(2);
        let resale = o.resale.as_deref().and_then(|id| book.resale(id));
        let Parties { seller_of_record: sor, manufacturer, channel } = parties(book, o);
        let rate = self.fee_rate(a, o, channel);
        let billed = round_to_minor(d.amount, minor);
        let mut warnings = Vec::new();
        let mut owed = |r: &ResaleAuthorization| {
            let w = self.wholesale(r, a, o, d.amount, &d.wholesale);
            if w.is_none() {
                warnings.push(format!(
                    "agreement `{}`: no wholesale price for `{}` under resale `{}`; cost of goods recorded as 0",
                    a.id, d.dimension, r.id
                ));
            }
            round_to_minor(w.unwrap_or_default(), minor)
        };
        let cost_of_goods = resale.map_or_else(|| round_to_minor(Decimal::ZERO, minor), &mut owed);
        // Two-level resale (DSOR channel model): the seller of record owes the DSOR partner its
        // wholesale, and the DSOR partner owes the manufacturer the wholesale of its own
        // authorisation.
        let upstream = resale.and_then(|r| r.parent.as_deref()).and_then(|p| book.resale(p));
        let distributor_cost = upstream.map(&mut owed);
        self.warnings.append(&mut warnings);
        // Each party's fee on its own share [DEC, Q9]: the seller of record on its margin, a
        // DSOR partner on its margin, the manufacturer on the wholesale it receives.
        let listing_fee = round_to_minor((billed - cost_of_goods) * rate, minor);
        let manufacturer_receives = distributor_cost.unwrap_or(cost_of_goods);
        let manufacturer_listing_fee = round_to_minor(manufacturer_receives * rate, minor);
        let distributor = upstream.zip(distributor_cost).map(|(p, cog)| {
            let fee = round_to_minor((cost_of_goods - cog) * rate, minor);
            DistributorShare {
                party: p.partner.clone(),
                cost_of_goods: cog,
                listing_fee: fee,
                net: cost_of_goods - cog - fee,
            }
        });
        let customer = book.customer(&a.customer);
        let reporting_currency = profile.reporting_currency;
        let reporting_amount =
            reporting_amount(book, o.currency, billed, d.invoice_date, self.month, &mut self.warnings);
        let invoice_date = date(d.invoice_date);
        self.lines.push(InvoiceLine {
            billing_month: self.month.to_string(),
            usage_period_start: self.month.start().to_string(),
            usage_period_end: self.month.end().to_string(),
            marketplace: profile.id.clone(),
            broker_id: profile.broker_id.clone().unwrap_or_default(),
            invoice_id: invoice_id(self.month, &a.customer, o.currency, &invoice_date),
            invoice_date,
            seller_of_record: sor,
            manufacturer,
            channel: channel.as_str().to_owned(),
            customer: a.customer.clone(),
            customer_identifier: customer.and_then(|c| c.customer_identifier.clone()).unwrap_or_default(),
            payer_account_id: customer.and_then(|c| c.aws_account_id.clone()).unwrap_or_default(),
            product: o.product.clone(),
            offer_id: o.id.clone(),
            offer_visibility: match o.visibility {
                Visibility::Public => "public".into(),
                Visibility::Private => "private".into(),
            },
            agreement_id: a.id.clone(),
            dimension: d.dimension,
            usage_unit: d.unit,
            charge_type: d.charge_type,
            description: d.description,
            pricing_model: d.pricing_model,
            quantity: d.quantity.normalize(),
            unit_rate: d.unit_rate,
            currency: o.currency,
            amount_unrounded: d.amount,
            customer_billed_amount: billed,
            listing_fee_rate: rate,
            listing_fee,
            cost_of_goods,
            manufacturer_listing_fee,
            seller_net: billed - listing_fee - cost_of_goods,
            manufacturer_net: manufacturer_receives - manufacturer_listing_fee,
            reporting_currency,
            reporting_amount,
            metering_records: d.records,
            corrects: String::new(),
            credits_line: String::new(),
            distributor,
        });
        Ok(())
    }
}

/// PRC-22: public offers by delivery type; private offers by total contract value (usage-only
/// private offers count as below the first threshold); renewals at the renewal rate; resale adds
/// the channel uplift.
pub fn listing_fee_rate(
    f: &ListingFees,
    visibility: Visibility,
    delivery: Delivery,
    renewal: bool,
    tcv: Decimal,
    channel: Channel,
) -> Decimal {
    let base = if renewal {
        f.renewal
    } else if visibility == Visibility::Public {
        match delivery {
            Delivery::Saas => f.public_saas,
            Delivery::Ami | Delivery::Container | Delivery::Ml => f.public_server,
        }
    } else if tcv >= f.tier_2_from {
        f.private_tier_2
    } else if tcv >= f.tier_1_from {
        f.private_tier_1
    } else {
        f.private
    };
    if channel == Channel::Direct {
        base
    } else {
        base + f.channel_uplift
    }
}

/// The billed amount in the profile's reporting currency at the invoice date (reporting only).
fn reporting_amount(
    book: &PriceBook,
    from: Currency,
    billed: Decimal,
    invoice_date: Timestamp,
    month: Month,
    warnings: &mut Vec<String>,
) -> Option<Decimal> {
    let to = book.marketplace().reporting_currency?;
    match book.fx_rate(from, to, invoice_date.min(month.end())) {
        Some(fx) => Some(round_to_minor(billed * fx, to.minor_units().unwrap_or(2))),
        None => {
            warnings.push(format!("no FX rate {from} → {to} for {month}; reporting amount left empty"));
            None
        }
    }
}

fn date(t: Timestamp) -> String {
    t.to_datetime().format("%Y-%m-%d").to_string()
}

/// Totals of a closed month per (customer, currency): what each invoice asks, and per party.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CloseTotals {
    /// Σ billed per (customer, currency).
    pub invoices: Vec<(String, Currency, Decimal)>,
    /// Σ net per (party, currency), both as seller of record and as manufacturer.
    pub party_net: Vec<(String, Currency, Decimal)>,
    /// Σ listing fees per currency (the marketplace's revenue).
    pub listing_fees: Vec<(Currency, Decimal)>,
}

/// Sums of rounded line amounts; never across currencies.
pub fn close_totals(lines: &[InvoiceLine]) -> CloseTotals {
    let mut invoices: BTreeMap<(String, Currency), Decimal> = BTreeMap::new();
    let mut party: BTreeMap<(String, Currency), Decimal> = BTreeMap::new();
    let mut fees: HashMap<Currency, Decimal> = HashMap::new();
    for l in lines {
        *invoices.entry((l.customer.clone(), l.currency)).or_default() += l.customer_billed_amount;
        *party.entry((l.seller_of_record.clone(), l.currency)).or_default() += l.seller_net;
        if l.channel != "direct" {
            *party.entry((l.manufacturer.clone(), l.currency)).or_default() += l.manufacturer_net;
        }
        *fees.entry(l.currency).or_default() += l.listing_fee + l.manufacturer_listing_fee;
        if let Some(d) = &l.distributor {
            *party.entry((d.party.clone(), l.currency)).or_default() += d.net;
            *fees.entry(l.currency).or_default() += d.listing_fee;
        }
    }
    let mut listing_fees: Vec<(Currency, Decimal)> = fees.into_iter().collect();
    listing_fees.sort();
    CloseTotals {
        invoices: invoices.into_iter().map(|((c, k), v)| (c, k, v)).collect(),
        party_net: party.into_iter().map(|((c, k), v)| (c, k, v)).collect(),
        listing_fees,
    }
}

/// Number of columns of an invoice line.
pub const FIELD_COUNT: usize = 42;

/// The CSV header of [`to_csv`] (and the column names of the `invoice_lines` tables).
pub const CSV_HEADER: &str = "billing_month,usage_period_start,usage_period_end,marketplace,broker_id,invoice_id,invoice_date,seller_of_record,manufacturer,channel,customer,customer_identifier,payer_account_id,product,offer_id,offer_visibility,agreement_id,dimension,usage_unit,charge_type,description,corrects,pricing_model,quantity,unit_rate,currency,amount_unrounded,customer_billed_amount,listing_fee_rate,listing_fee,cost_of_goods,manufacturer_listing_fee,seller_net,manufacturer_net,reporting_currency,reporting_amount,metering_records,credits_line,distributor,distributor_cost_of_goods,distributor_listing_fee,distributor_net";

impl InvoiceLine {
    /// The line's values as text, in [`CSV_HEADER`] order (CSV export and SQL tables).
    pub fn fields(&self) -> Vec<String> {
        let opt = |d: Option<Decimal>| d.map(|d| d.to_string()).unwrap_or_default();
        vec![
            self.billing_month.clone(),
            self.usage_period_start.clone(),
            self.usage_period_end.clone(),
            self.marketplace.clone(),
            self.broker_id.clone(),
            self.invoice_id.clone(),
            self.invoice_date.clone(),
            self.seller_of_record.clone(),
            self.manufacturer.clone(),
            self.channel.clone(),
            self.customer.clone(),
            self.customer_identifier.clone(),
            self.payer_account_id.clone(),
            self.product.clone(),
            self.offer_id.clone(),
            self.offer_visibility.clone(),
            self.agreement_id.clone(),
            self.dimension.clone(),
            self.usage_unit.clone(),
            self.charge_type.as_str().to_owned(),
            self.description.clone(),
            self.corrects.clone(),
            self.pricing_model.clone(),
            self.quantity.to_string(),
            opt(self.unit_rate),
            self.currency.to_string(),
            self.amount_unrounded.to_string(),
            self.customer_billed_amount.to_string(),
            self.listing_fee_rate.to_string(),
            self.listing_fee.to_string(),
            self.cost_of_goods.to_string(),
            self.manufacturer_listing_fee.to_string(),
            self.seller_net.to_string(),
            self.manufacturer_net.to_string(),
            self.reporting_currency.map(|c| c.to_string()).unwrap_or_default(),
            opt(self.reporting_amount),
            self.metering_records.to_string(),
            self.credits_line.clone(),
            self.distributor.as_ref().map(|d| d.party.clone()).unwrap_or_default(),
            opt(self.distributor.as_ref().map(|d| d.cost_of_goods)),
            opt(self.distributor.as_ref().map(|d| d.listing_fee)),
            opt(self.distributor.as_ref().map(|d| d.net)),
        ]
    }
}

/// The lines as CSV (RFC 4180 quoting), header first.
pub fn to_csv(lines: &[InvoiceLine]) -> String {
    let q = |s: String| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s
        }
    };
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for l in lines {
        out.push_str(&l.fields().into_iter().map(q).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn aws() -> ListingFees {
        ListingFees::aws_2024()
    }

    #[test]
    fn a_dsor_correction_of_500_late_calls_bills_2_00_owes_the_wholesale_delta_1_00_and_names_october() {
        // govco buys `suite` through DSOR Co (wholesale api_calls 0.0020 per unit). Its November
        // adjustment line corrects October (closed at 3,000) with 500 late calls at the graduated
        // price the line carries: the customer pays 500 × 0.0040 (the tier above 3,000) = 2.00;
        // DSOR Co owes acme the wholesale delta, 500 × 0.0020 = 1.00, the same rule on its price.
        let book = PriceBook::from_toml(include_str!("../../docs/examples/price-models.toml")).unwrap();
        let price = common::pricing::UsagePrice::Graduated(vec![
            common::pricing::Tier { up_to: Some(d("3000")), rate: d("0.0050") },
            common::pricing::Tier { up_to: None, rate: d("0.0040") },
        ]);
        let correction = Correction {
            month: Month::parse("2026-10").unwrap(),
            closed_quantity: d("3000"),
            late_quantity: d("500"),
            price,
        };
        let exact = correction.amount().unwrap();
        assert_eq!(exact, d("2"));
        let line = ChargeLine {
            month: "2026-11".into(),
            customer: "govco".into(),
            seller: "acme".into(),
            product: "suite".into(),
            agreement_id: "agmnt-gov".into(),
            offer_id: "suite-dsor".into(),
            dimension: "api_calls".into(),
            charge_type: ChargeType::Adjustment,
            pricing_model: "graduated".into(),
            currency: Currency::new("USD").unwrap(),
            quantity: d("500"),
            covered_quantity: Decimal::ZERO,
            billable_quantity: d("500"),
            unit_rate: Some(d("0.0050")),
            amount_unrounded: exact,
            amount: d("2.00"),
            records: 1,
            corrections: vec![correction],
        };
        let close = close_month(&book, Month::parse("2026-11").unwrap(), &[line], &[]).unwrap();
        let adj = close.lines.iter().find(|l| l.charge_type == ChargeType::Adjustment).unwrap();
        assert_eq!((adj.corrects.as_str(), adj.channel.as_str()), ("2026-10", "dsor"));
        assert_eq!((adj.customer_billed_amount, adj.cost_of_goods), (d("2.00"), d("1.00")));
        assert!(adj.description.contains("500 late units priced from 3000 to 3500"), "{}", adj.description);
    }

    #[test]
    fn an_entitlement_update_mid_term_credits_the_old_contract_and_invoices_the_new_one() {
        // AWS's entitlement-updated event as an operator change: standardco's 12-month standard
        // tier (from 2026-11-16) goes premium on 2026-12-02 at 10:00.
        let book = PriceBook::from_toml(include_str!("../../docs/examples/price-models.toml")).unwrap();
        let change: Vec<common::catalogue::change::Change> = serde_json::from_value(serde_json::json!([
            { "op": "update_entitlement", "agreement": "agmnt-standard", "updated": {
              "id": "agmnt-premium", "customer": "standardco", "product": "saas-contract", "offer": "contract-public",
              "start": "2026-12-02T10:20:00Z",
              "contract": { "months": 12, "quantities": [{ "dimension": "tier_premium", "quantity": 1 }] } } }
        ]))
        .unwrap();
        let now = common::time::Timestamp::parse_rfc3339("2026-12-02T10:20:00Z").unwrap();
        let book = common::catalogue::change::apply(&book, &change, now, None).unwrap();
        let close = close_month(&book, Month::parse("2026-12").unwrap(), &[], &[]).unwrap();
        let of = |agreement: &str, kind: ChargeType| {
            close.lines.iter().filter(|l| l.agreement_id == agreement && l.charge_type == kind).collect::<Vec<_>>()
        };
        let credit = of("agmnt-standard", ChargeType::Credit);
        assert_eq!(credit.len(), 1, "{:?}", close.lines);
        // $2,000 × the unused 349 of 365 days (2026-12-02 to 2027-11-16), credited.
        assert_eq!(credit[0].customer_billed_amount, d("-1912.33"), "{}", credit[0].description);
        let upfront = of("agmnt-premium", ChargeType::ContractUpfront);
        assert_eq!(upfront.len(), 1, "{:?}", close.lines);
        assert_eq!(upfront[0].customer_billed_amount, d("5000.00"));
    }

    #[test]
    fn line_parties_are_direct_cppo_or_dsor_as_the_offer_resells() {
        let book = PriceBook::from_toml(include_str!("../../docs/examples/price-models.toml")).unwrap();
        let shown = |offer: &str| {
            let p = line_parties(&book, offer, "acme");
            (p.channel.as_str(), p.seller_of_record, p.manufacturer)
        };
        assert_eq!(shown("suite-public"), ("direct", "acme".into(), "acme".into()));
        assert_eq!(shown("suite-cppo"), ("cppo", "channelco".into(), "acme".into()));
        assert_eq!(shown("suite-dsor"), ("dsor", "dsorco".into(), "acme".into()));
        assert_eq!(shown("no-such-offer"), ("direct", "acme".into(), "acme".into()));
    }

    #[test]
    fn csv_header_names_every_field() {
        assert_eq!(CSV_HEADER.split(',').count(), FIELD_COUNT);
    }

    #[test]
    fn listing_fee_tiers_edge_56() {
        let f = aws();
        let private = |tcv: &str, renewal, channel| {
            listing_fee_rate(&f, Visibility::Private, Delivery::Saas, renewal, d(tcv), channel).to_string()
        };
        assert_eq!(private("999999.99", false, Channel::Direct), "0.03");
        assert_eq!(private("1000000.00", false, Channel::Direct), "0.02");
        assert_eq!(private("10000000.00", false, Channel::Direct), "0.015");
        assert_eq!(private("5000", true, Channel::Direct), "0.015");
        assert_eq!(private("999999.99", false, Channel::Cppo), "0.035");
        let public =
            |delivery| listing_fee_rate(&f, Visibility::Public, delivery, false, d("0"), Channel::Direct).to_string();
        assert_eq!(public(Delivery::Saas), "0.03");
        assert_eq!(public(Delivery::Ami), "0.20");
        assert_eq!(public(Delivery::Container), "0.20");
    }
}
