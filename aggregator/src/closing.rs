//! SHELL (distributed mode). `aggregator close`: month close over ClickHouse. Reads the month's
//! lines from `monthly_charges` (and the hourly items of AMI-trial agreements from
//! `rated_usage`), closes it with the pure [`crate::close`] core, appends the invoice lines to
//! `invoice_lines` under a close version, and exports CSV and JSON. When a month may be closed
//! for good is [`crate::close::timing`]'s rule, the same as `meterline close`'s.

use crate::close::timing::{check_final_close, CloseRefused, CutOff};
use crate::close::{ami_trial_agreements, close_month, refund_months, to_csv, MonthClose};
use crate::sink::{insert_rows, load_month_lines, load_trial_hours, InvoiceRow};
use clickhouse::Client;
use common::catalogue::PriceBook;
use common::time::{Month, Timestamp};
use std::path::Path;

/// Closes `month` for good as `aggregator close` does: checks the month's window has passed
/// (or `cut_off_late_usage`), records the close where the raters read it and waits `settle`
/// ([`crate::closed`]), then writes the invoice lines. Returns the close and, for an early
/// close, what it cut off. A refused close wrote nothing.
#[allow(clippy::too_many_arguments)] // each is one of the close's inputs, named at the one call site
pub async fn close_and_tell_raters(
    cfg: &common::config::PipelineConfig,
    client: &Client,
    book: &PriceBook,
    month: Month,
    out_dir: &Path,
    now: Timestamp,
    settle: std::time::Duration,
    cut_off_late_usage: bool,
) -> anyhow::Result<(MonthClose, Option<CutOff>)> {
    let cut = final_close_allowed(client, book, month, now, cut_off_late_usage).await??;
    crate::closed::mark_closed(cfg, client, month, &book.marketplace().id, book.version(), now).await?;
    tokio::time::sleep(settle).await;
    let close = compute_close(client, book, month).await?;
    let version = u64::try_from(now.millis()).unwrap_or_default();
    let rows = close.lines.iter().map(|l| InvoiceRow::new(l, month, version)).collect::<Result<Vec<_>, _>>()?;
    insert_rows(client, "invoice_lines", &rows).await?;
    export(&close, out_dir, "")?;
    Ok((close, cut))
}

/// What closing `month` now would bill, exported as `invoice-lines-M.draft.*`; nothing is
/// closed or written to ClickHouse. Returns the draft and whether the month may be closed for
/// good now (and if not, why).
pub async fn draft(
    client: &Client,
    book: &PriceBook,
    month: Month,
    out_dir: &Path,
    now: Timestamp,
) -> anyhow::Result<(MonthClose, Result<(), CloseRefused>)> {
    let closable = final_close_allowed(client, book, month, now, false).await?.map(drop);
    let close = compute_close(client, book, month).await?;
    export(&close, out_dir, ".draft")?;
    Ok((close, closable))
}

/// [`check_final_close`] against the month's invoice lines in ClickHouse: a month with invoice
/// lines was closed for good. (A close interrupted after telling the raters but before writing
/// its lines has none, so running it again completes it.)
async fn final_close_allowed(
    client: &Client,
    book: &PriceBook,
    month: Month,
    now: Timestamp,
    cut_off_late_usage: bool,
) -> anyhow::Result<Result<Option<CutOff>, CloseRefused>> {
    let profile = book.marketplace();
    let late_usage = profile
        .late_usage
        .ok_or_else(|| anyhow::anyhow!("marketplace `{}` sets no late_usage: month close needs it", profile.id))?;
    let (lines, first): (u64, u64) = client
        .query("SELECT count(), min(close_version) FROM invoice_lines WHERE billing_month = toDate(?)")
        .bind(format!("{month}-01"))
        .fetch_one()
        .await?;
    let closed_at = (lines > 0).then(|| Timestamp::from_millis(i64::try_from(first).unwrap_or(i64::MAX)));
    Ok(check_final_close(month, book.windows(), late_usage, now, closed_at, cut_off_late_usage))
}

/// What closing `month` now would bill, computed by the close core from ClickHouse's current
/// lines; writes nothing.
pub async fn compute_close(client: &Client, book: &PriceBook, month: Month) -> anyhow::Result<MonthClose> {
    let mut usage = load_month_lines(client, month).await?;
    // Refunds of earlier months' usage lines recompute those lines from their usage.
    for earlier in refund_months(book, month) {
        usage.extend(load_month_lines(client, earlier).await?);
    }
    let trial = load_trial_hours(client, month, &ami_trial_agreements(book, month)).await?;
    Ok(close_month(book, month, &usage, &trial)?)
}

fn export(close: &MonthClose, out_dir: &Path, kind: &str) -> anyhow::Result<()> {
    let month = &close.month;
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join(format!("invoice-lines-{month}{kind}.csv")), to_csv(&close.lines))?;
    std::fs::write(out_dir.join(format!("invoice-lines-{month}{kind}.json")), serde_json::to_string_pretty(&close)?)?;
    Ok(())
}
