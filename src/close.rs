//! SHELL. `meterline close`: closes a month of the embedded store for the price book's
//! marketplace profile, writes the invoice lines (`invoice_lines`, `closed_months`) and exports
//! them as CSV and JSON, then says what each invoice asks and what each party nets.

use crate::report::money;
use crate::store::Store;
use aggregator::close::{ami_trial_agreements, close_month, close_totals, refund_months, to_csv, MonthClose};
use common::catalogue::PriceBook;
use common::time::{Month, Timestamp};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What a close wrote.
#[derive(Debug)]
pub struct Closed {
    /// The closed month.
    pub close: MonthClose,
    /// CSV export.
    pub csv: PathBuf,
    /// JSON export.
    pub json: PathBuf,
}

/// Closes `month` in the store at `db`, exporting to `out_dir`.
pub fn close(db: &Path, book: &PriceBook, month: Month, out_dir: &Path, now: Timestamp) -> anyhow::Result<Closed> {
    let mut store = Store::open(db)?;
    let close = compute_close(store.conn(), book, month)?;
    store.write_close(&close, now)?;
    std::fs::create_dir_all(out_dir)?;
    let csv = out_dir.join(format!("invoice-lines-{month}.csv"));
    let json = out_dir.join(format!("invoice-lines-{month}.json"));
    std::fs::write(&csv, to_csv(&close.lines))?;
    std::fs::write(&json, serde_json::to_string_pretty(&close)?)?;
    Ok(Closed { close, csv, json })
}

/// What closing `month` now would bill, computed by the close core from the store's current
/// lines and writing nothing: the close itself, a draft, and the invoice preview all call this.
pub fn compute_close(conn: &rusqlite::Connection, book: &PriceBook, month: Month) -> anyhow::Result<MonthClose> {
    let mut usage = Store::charge_lines(conn, Some(&month.to_string()))?;
    // Refunds of earlier months' usage lines recompute those lines from their usage.
    for earlier in refund_months(book, month) {
        usage.extend(Store::charge_lines(conn, Some(&earlier.to_string()))?);
    }
    let trial = Store::trial_hours(conn, month, &ami_trial_agreements(book, month))?;
    Ok(close_month(book, month, &usage, &trial)?)
}

/// The summary a billing person reads after a close.
pub fn summary(c: &Closed) -> String {
    let mut s = String::new();
    let totals = close_totals(&c.close.lines);
    outln!(
        s,
        "Closed {} for marketplace `{}` (price book {}): {} invoice lines; later usage for it is {}.",
        c.close.month,
        c.close.marketplace,
        c.close.price_book_version,
        c.close.lines.len(),
        match c.close.late_usage {
            common::catalogue::LateUsage::Refuse => "refused",
            common::catalogue::LateUsage::CorrectionNextMonth => "booked on the next month as a correction",
        }
    );
    outln!(s, "\nInvoices: {} (customer × currency)", totals.invoices.len());
    let mut by_currency: std::collections::BTreeMap<String, rust_decimal::Decimal> = Default::default();
    for (_, cur, amount) in &totals.invoices {
        *by_currency.entry(cur.to_string()).or_default() += amount;
    }
    for (cur, amount) in &by_currency {
        outln!(s, "  billed {:>18} {cur}", money(*amount));
    }
    outln!(s, "\nNet per party (seller of record or manufacturer):");
    for (party, cur, net) in &totals.party_net {
        outln!(s, "  {party:<24} {:>18} {cur}", money(*net));
    }
    outln!(s, "\nListing fees (the marketplace's share):");
    for (cur, fee) in &totals.listing_fees {
        outln!(s, "  {:>18} {cur}", money(*fee));
    }
    for w in &c.close.warnings {
        outln!(s, "warning: {w}");
    }
    outln!(s, "\nExported {} and {}", c.csv.display(), c.json.display());
    s
}
