//! SHELL. `meterline close`: closes a month of the embedded store for the price book's
//! marketplace profile, writes the invoice lines (`invoice_lines`, `closed_months`) and exports
//! them as CSV and JSON, then says what each invoice asks and what each party nets.

use crate::report::money;
use crate::store::Store;
use aggregator::close::timing::{check_final_close, CloseRefused, CutOff};
use aggregator::close::{ami_trial_agreements, close_month, close_totals, refund_months, to_csv, MonthClose};
use common::catalogue::PriceBook;
use common::time::{Month, Timestamp};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// How `meterline close` runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloseOptions {
    /// Compute and export the invoice lines without closing: re-runnable at any time.
    pub draft: bool,
    /// Close for good before the month's window ended, cutting off usage still due.
    pub cut_off_late_usage: bool,
}

/// What a close (or a draft) wrote.
#[derive(Debug)]
pub struct Closed {
    /// The closed month.
    pub close: MonthClose,
    /// A draft: nothing was closed.
    pub draft: bool,
    /// When the month may be closed for good (for a draft) or what the early close cut off.
    pub timing: Timing,
    /// CSV export.
    pub csv: PathBuf,
    /// JSON export.
    pub json: PathBuf,
}

/// The close's place in the month's window.
#[derive(Debug)]
pub enum Timing {
    /// After the window: nothing was cut off.
    Regular,
    /// A draft: the month may be closed for good from this instant (or could not be, it was closed already).
    Draft(Result<(), CloseRefused>),
    /// Closed early on the operator's word.
    Early(CutOff),
}

/// Closes `month` in the store at `db` (or drafts it), exporting to `out_dir`.
///
/// A final close is refused before the month's window ends ([`check_final_close`]) unless
/// `opts.cut_off_late_usage`, and happens once: its invoice lines are final.
pub fn close(
    db: &Path,
    book: &PriceBook,
    month: Month,
    out_dir: &Path,
    now: Timestamp,
    opts: CloseOptions,
) -> anyhow::Result<Closed> {
    let mut store = Store::open(db)?;
    let profile = book.marketplace();
    let late_usage = profile
        .late_usage
        .ok_or_else(|| anyhow::anyhow!("marketplace `{}` sets no late_usage: month close needs it", profile.id))?;
    let closed_at = Store::closed_at(store.conn(), month)?;
    let check = check_final_close(month, book.windows(), late_usage, now, closed_at, opts.cut_off_late_usage);
    let timing = if opts.draft {
        Timing::Draft(check.map(drop))
    } else {
        match check? {
            None => Timing::Regular,
            Some(cut) => Timing::Early(cut),
        }
    };
    let close = compute_close(store.conn(), book, month)?;
    if !opts.draft {
        store.write_close(&close, now)?;
    }
    std::fs::create_dir_all(out_dir)?;
    let kind = if opts.draft { ".draft" } else { "" };
    let csv = out_dir.join(format!("invoice-lines-{month}{kind}.csv"));
    let json = out_dir.join(format!("invoice-lines-{month}{kind}.json"));
    std::fs::write(&csv, to_csv(&close.lines))?;
    std::fs::write(&json, serde_json::to_string_pretty(&close)?)?;
    Ok(Closed { close, draft: opts.draft, timing, csv, json })
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
    let later = match c.close.late_usage {
        common::catalogue::LateUsage::Refuse => "refused",
        common::catalogue::LateUsage::CorrectionNextMonth => "booked on the next month as a correction",
    };
    if c.draft {
        outln!(
            s,
            "Draft of {} for marketplace `{}` (price book {}): {} invoice lines. Nothing is closed; run it again any time.",
            c.close.month,
            c.close.marketplace,
            c.close.price_book_version,
            c.close.lines.len(),
        );
    } else {
        outln!(
            s,
            "Closed {} for good for marketplace `{}` (price book {}): {} invoice lines; later usage for it is {later}.",
            c.close.month,
            c.close.marketplace,
            c.close.price_book_version,
            c.close.lines.len(),
        );
    }
    match &c.timing {
        Timing::Regular => {}
        Timing::Early(cut) => outln!(s, "warning: {cut}"),
        Timing::Draft(Ok(())) => {
            outln!(s, "It can be closed for good now: `meterline close --month {}`.", c.close.month)
        }
        Timing::Draft(Err(why)) => outln!(s, "Not closable for good now: {why}"),
    }
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
