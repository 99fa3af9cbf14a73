//! PURE. Refund lines of a month close (domain-rules §4.5, BIL-9; edge cases 54–55).
//!
//! A refund issued in the month credits one line already billed (this month's, or an earlier
//! month's, recomputed by the same close from that month's usage). Its line is negative and
//! names the credited line (`credits_line`); with f the refunded share (the `fraction`, or
//! `amount` / billed), every money column is the credited line's × −f, each rounded half-up once:
//! billed, listing fee, cost of goods and the manufacturer's fee, so each party's net is reversed
//! in proportion and a full refund cancels the line to the cent. The refunds of a line, taken in
//! issue order, never credit more than it billed; the credited line itself never changes.

use super::{close_charges, date, invoice_id, reporting_amount, CloseError, DistributorShare, InvoiceLine, MonthClose};
use common::catalogue::{PriceBook, Refund};
use common::money::round_to_minor;
use common::rated::{ChargeLine, ChargeType};
use common::time::Month;
use rust_decimal::Decimal;
use std::collections::HashMap;

/// The refunds of one month close, with the credited months' lines.
pub(super) struct Refunds<'a> {
    book: &'a PriceBook,
    usage: &'a [ChargeLine],
    /// Lines of earlier months, recomputed once per month.
    closed: HashMap<Month, MonthClose>,
    /// Notes for the operator.
    pub warnings: Vec<String>,
}

/// `d`, with a zero printed as `0.00`, never `-0.00` (negating a zero keeps its sign bit).
fn unsigned_zero(mut d: Decimal) -> Decimal {
    if d.is_zero() {
        d.set_sign_positive(true);
    }
    d
}

/// Whether two refunds credit the same line.
fn same_target(a: &Refund, b: &Refund) -> bool {
    (&a.agreement, &a.month, a.charge_type, &a.dimension, &a.invoice_date)
        == (&b.agreement, &b.month, b.charge_type, &b.dimension, &b.invoice_date)
}

/// What `r` credits of `orig`: (share f, exact amount, amount rounded half-up once), positive.
fn credited_amount(r: &Refund, orig: &InvoiceLine) -> Option<(Decimal, Decimal, Decimal)> {
    let (share, exact) = match (r.fraction, r.amount) {
        (Some(f), _) => (f, orig.amount_unrounded.checked_mul(f)?),
        (None, Some(a)) => (a.checked_div(orig.customer_billed_amount)?, a),
        (None, None) => return None,
    };
    Some((share, exact, round_to_minor(exact, orig.currency.minor_units().unwrap_or(2))))
}

impl<'a> Refunds<'a> {
    pub(super) fn new(book: &'a PriceBook, usage: &'a [ChargeLine]) -> Self {
        Refunds { book, usage, closed: HashMap::new(), warnings: Vec::new() }
    }

    /// The refund lines issued in `month`, whose own charges are `current`. The cap counts the
    /// refunds of the same line issued before each one (in this or an earlier month).
    pub(super) fn lines_issued_in(
        &mut self,
        month: Month,
        current: &[InvoiceLine],
    ) -> Result<Vec<InvoiceLine>, CloseError> {
        let all = &self.book.doc().refunds;
        let mut out = Vec::new();
        for r in all.iter().filter(|r| r.issued.month() == month) {
            let credited = r.credited_month();
            let original = if credited == month { self.find(r, current)? } else { self.find_closed(r, credited)? };
            let earlier: Decimal = all
                .iter()
                .filter(|p| same_target(p, r) && (p.issued, &p.id) < (r.issued, &r.id))
                .map(|p| credited_amount(p, &original).map(|(_, _, c)| c))
                .sum::<Option<Decimal>>()
                .ok_or_else(|| CloseError::Overflow(format!("refund `{}`", r.id)))?;
            out.push(self.refund_line(r, &original, month, earlier)?);
        }
        Ok(out)
    }

    fn find_closed(&mut self, r: &Refund, month: Month) -> Result<InvoiceLine, CloseError> {
        if !self.closed.contains_key(&month) {
            let close = close_charges(self.book, month, self.usage, &[])?;
            self.closed.insert(month, close);
        }
        let lines = &self.closed[&month].lines;
        self.find(r, lines)
    }

    fn find(&self, r: &Refund, lines: &[InvoiceLine]) -> Result<InvoiceLine, CloseError> {
        let matches: Vec<&InvoiceLine> = lines
            .iter()
            .filter(|l| {
                l.agreement_id == r.agreement
                    && l.charge_type == r.charge_type
                    && l.dimension == r.dimension
                    && r.invoice_date.as_ref().is_none_or(|d| &l.invoice_date == d)
            })
            .collect();
        let what = || {
            format!(
                "the {} line of agreement `{}`{} in {}{}",
                r.charge_type,
                r.agreement,
                if r.dimension.is_empty() { String::new() } else { format!(", dimension `{}`", r.dimension) },
                r.month,
                r.invoice_date.as_ref().map(|d| format!(" dated {d}")).unwrap_or_default()
            )
        };
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(CloseError::RefundedLineNotFound {
                refund: r.id.clone(),
                why: format!(
                    "credits {}, which that month's close does not have{}",
                    what(),
                    if r.charge_type == ChargeType::Usage {
                        " (a usage line needs that month's usage lines in the close's input)"
                    } else {
                        ""
                    }
                ),
            }),
            many => Err(CloseError::RefundedLineNotFound {
                refund: r.id.clone(),
                why: format!("{} matches {} lines; name one by invoice_date", what(), many.len()),
            }),
        }
    }

    fn refund_line(
        &mut self,
        r: &Refund,
        orig: &InvoiceLine,
        month: Month,
        earlier: Decimal,
    ) -> Result<InvoiceLine, CloseError> {
        let key = orig.line_key();
        let billed = orig.customer_billed_amount;
        let exceeds =
            |refunded| CloseError::RefundExceedsBilled { refund: r.id.clone(), line: key.clone(), billed, refunded };
        if billed <= Decimal::ZERO {
            return Err(exceeds(r.amount.unwrap_or(billed)));
        }
        let (share, exact, credited) =
            credited_amount(r, orig).ok_or_else(|| CloseError::Overflow(format!("refund `{}`", r.id)))?;
        if earlier + credited > billed {
            return Err(exceeds(earlier + credited));
        }
        let minor = orig.currency.minor_units().unwrap_or(2);
        let back = |d: Decimal| unsigned_zero(-round_to_minor(d * share, minor));
        let (listing_fee, cost_of_goods, manufacturer_listing_fee) =
            (back(orig.listing_fee), back(orig.cost_of_goods), back(orig.manufacturer_listing_fee));
        let billed_back = unsigned_zero(-credited);
        // A DSOR partner's share reverses in the same proportion.
        let distributor = orig.distributor.as_ref().map(|d| {
            let (cog, fee) = (back(d.cost_of_goods), back(d.listing_fee));
            DistributorShare {
                party: d.party.clone(),
                cost_of_goods: cog,
                listing_fee: fee,
                net: unsigned_zero(cost_of_goods - cog - fee),
            }
        });
        let invoice_date = date(r.issued);
        let reporting = reporting_amount(self.book, orig.currency, billed_back, r.issued, month, &mut self.warnings);
        Ok(InvoiceLine {
            billing_month: month.to_string(),
            usage_period_start: month.start().to_string(),
            usage_period_end: month.end().to_string(),
            invoice_id: invoice_id(month, &orig.customer, orig.currency, &invoice_date),
            invoice_date,
            charge_type: ChargeType::Refund,
            description: format!(
                "refund of {key}: {} ({} of {} billed{})",
                r.reason,
                if r.fraction == Some(Decimal::ONE) { "in full".to_owned() } else { format!("{credited}") },
                billed,
                if r.seller_authorised { ", authorised by the seller" } else { "" }
            ),
            quantity: unsigned_zero(-(orig.quantity * share).round_dp(9).normalize()),
            amount_unrounded: unsigned_zero(-exact),
            customer_billed_amount: billed_back,
            listing_fee,
            cost_of_goods,
            manufacturer_listing_fee,
            seller_net: unsigned_zero(billed_back - listing_fee - cost_of_goods),
            manufacturer_net: unsigned_zero(
                distributor.as_ref().map_or(cost_of_goods, |d| d.cost_of_goods) - manufacturer_listing_fee,
            ),
            distributor,
            reporting_amount: reporting,
            metering_records: 0,
            credits_line: key,
            ..orig.clone()
        })
    }
}
