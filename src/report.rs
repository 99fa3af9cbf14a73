//! What a billing person reads: outcome counts, totals per product and currency, invoices.

use crate::pipeline::{STATUS_ACCEPTED, STATUS_IDENTICAL};
use crate::store::{Store, StoreError};
use aggregator::invoice::{invoice_totals, product_totals, InvoiceTotal};
use common::rated::ChargeLine;
use rusqlite::Connection;
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// `1234567.8` → `1,234,567.8` (the decimal part untouched).
pub fn group_thousands(s: &str) -> String {
    let (sign, rest) = s.strip_prefix('-').map(|r| ("-", r)).unwrap_or(("", s));
    let (int, frac) = rest.split_once('.').map(|(i, f)| (i, Some(f))).unwrap_or((rest, None));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

/// A count with thousands separators.
pub fn n(v: u64) -> String {
    group_thousands(&v.to_string())
}

/// An amount with thousands separators.
pub fn money(d: Decimal) -> String {
    group_thousands(&d.to_string())
}

/// Records by outcome, in the order a reader wants them.
pub fn outcome_table(counts: &[(String, u64)]) -> String {
    let get = |k: &str| counts.iter().find(|(s, _)| s == k).map(|(_, v)| *v).unwrap_or(0);
    let mut out = String::new();
    let total: u64 = counts.iter().map(|(_, v)| v).sum();
    outln!(out, "  {:<44} {:>12}", "records answered", n(total));
    outln!(out, "  {:<44} {:>12}", "accepted and charged (Success)", n(get(STATUS_ACCEPTED)));
    outln!(out, "  {:<44} {:>12}", "identical resends (Success, charged once)", n(get(STATUS_IDENTICAL)));
    outln!(out, "  {:<44} {:>12}", "conflicting resends (DuplicateRecord)", n(get("DuplicateRecord")));
    let mut rejected: Vec<&(String, u64)> = counts
        .iter()
        .filter(|(s, _)| s != STATUS_ACCEPTED && s != STATUS_IDENTICAL && s != "DuplicateRecord")
        .collect();
    rejected.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (s, v) in rejected {
        outln!(out, "  {:<44} {:>12}", format!("rejected: {s}"), n(*v));
    }
    out
}

/// Totals per product and currency, and grand totals per currency.
pub fn product_table(lines: &[ChargeLine]) -> String {
    let mut out = String::new();
    let mut per_currency: BTreeMap<String, Decimal> = BTreeMap::new();
    for (month, product, currency, amount) in product_totals(lines) {
        outln!(out, "  {month}  {product:<20} {currency}  {:>16}", money(amount));
        *per_currency.entry(currency.to_string()).or_default() += amount;
    }
    for (c, a) in per_currency {
        outln!(out, "  {:<7}  {:<20} {c}  {:>16}", "total", "", money(a));
    }
    out
}

/// The `top` largest invoices, and how many there are.
pub fn invoice_table(invoices: &[InvoiceTotal], top: usize) -> String {
    let mut sorted: Vec<&InvoiceTotal> = invoices.iter().collect();
    sorted.sort_by(|a, b| b.amount.cmp(&a.amount).then(a.customer.cmp(&b.customer)));
    let mut out = String::new();
    outln!(out, "  {:<8} {:<10} {:<4} {:>5} {:>16}", "month", "customer", "cur", "lines", "amount");
    for i in sorted.iter().take(top) {
        outln!(out, "  {:<8} {:<10} {:<4} {:>5} {:>16}", i.month, i.customer, i.currency, i.lines, money(i.amount));
    }
    if sorted.len() > top {
        outln!(out, "  … and {} more invoices", sorted.len() - top);
    }
    out
}

/// Everything printed after a run, read back from the store.
pub fn store_summary(conn: &Connection, month: Option<&str>) -> Result<String, StoreError> {
    let counts = Store::status_counts(conn)?;
    let lines = Store::charge_lines(conn, month)?;
    let invoices = invoice_totals(&lines);
    let mut out = String::new();
    outln!(out, "Records by outcome");
    out.push_str(&outcome_table(&counts));
    outln!(out, "\nCharges by product and currency (sums of rounded invoice lines)");
    out.push_str(&product_table(&lines));
    let customers: std::collections::BTreeSet<&str> = invoices.iter().map(|i| i.customer.as_str()).collect();
    outln!(
        out,
        "\nInvoices: {} for {} customers, {} lines; the largest:",
        invoices.len(),
        customers.len(),
        lines.len()
    );
    out.push_str(&invoice_table(&invoices, 12));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped_and_decimals_kept() {
        assert_eq!(group_thousands("1234567.891"), "1,234,567.891");
        assert_eq!(group_thousands("999"), "999");
        assert_eq!(group_thousands("-1000.00"), "-1,000.00");
        assert_eq!(group_thousands("0.00"), "0.00");
    }
}
