//! PURE. Invoice totals: per (month, customer, currency), the sum of that customer's rounded
//! lines (never a rounding of the exact total, and never across currencies).

use common::money::Currency;
use common::rated::ChargeLine;
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::BTreeMap;

/// One customer's invoice for a month in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvoiceTotal {
    /// Billing month.
    pub month: String,
    /// Customer id.
    pub customer: String,
    /// Currency.
    pub currency: Currency,
    /// Number of lines.
    pub lines: usize,
    /// Σ rounded line amounts: what the customer pays.
    pub amount: Decimal,
    /// Σ unrounded line amounts, for audit.
    pub amount_unrounded: Decimal,
}

/// Groups lines into invoices, sorted by month, customer, currency.
pub fn invoice_totals(lines: &[ChargeLine]) -> Vec<InvoiceTotal> {
    let mut by: BTreeMap<(String, String, Currency), InvoiceTotal> = BTreeMap::new();
    for l in lines {
        let t = by.entry((l.month.clone(), l.customer.clone(), l.currency)).or_insert_with(|| InvoiceTotal {
            month: l.month.clone(),
            customer: l.customer.clone(),
            currency: l.currency,
            lines: 0,
            amount: Decimal::ZERO,
            amount_unrounded: Decimal::ZERO,
        });
        t.lines += 1;
        t.amount += l.amount;
        t.amount_unrounded += l.amount_unrounded;
    }
    by.into_values().collect()
}

/// Totals by (month, product, currency): Σ rounded lines.
pub fn product_totals(lines: &[ChargeLine]) -> Vec<(String, String, Currency, Decimal)> {
    let mut by: BTreeMap<(String, String, Currency), Decimal> = BTreeMap::new();
    for l in lines {
        *by.entry((l.month.clone(), l.product.clone(), l.currency)).or_default() += l.amount;
    }
    by.into_iter().map(|((m, p, c), a)| (m, p, c, a)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::rated::ChargeType;

    fn line(customer: &str, currency: &str, amount: &str) -> ChargeLine {
        let a: Decimal = amount.parse().unwrap();
        ChargeLine {
            month: "2026-11".into(),
            customer: customer.into(),
            seller: "s".into(),
            product: "p".into(),
            agreement_id: "a".into(),
            offer_id: "o".into(),
            dimension: "d".into(),
            charge_type: ChargeType::Usage,
            pricing_model: "per_unit".into(),
            currency: Currency::new(currency).unwrap(),
            quantity: Decimal::ONE,
            covered_quantity: Decimal::ZERO,
            billable_quantity: Decimal::ONE,
            unit_rate: None,
            amount_unrounded: a,
            amount: a,
            records: 1,
            corrections: Vec::new(),
        }
    }

    #[test]
    fn mixed_currencies_make_separate_invoices() {
        let t = invoice_totals(&[line("c", "USD", "1.00"), line("c", "EUR", "2.00"), line("c", "USD", "3.00")]);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].currency.to_string(), t[0].amount.to_string()), ("EUR".into(), "2.00".into()));
        assert_eq!((t[1].currency.to_string(), t[1].amount.to_string()), ("USD".into(), "4.00".into()));
    }
}
