//! SHELL (distributed mode). `aggregator close`: month close over ClickHouse. Reads the month's
//! lines from `monthly_charges` (and the hourly items of AMI-trial agreements from
//! `rated_usage`), closes it with the pure [`crate::close`] core, appends the invoice lines to
//! `invoice_lines` under a new close version, and exports CSV and JSON.

use crate::close::{ami_trial_agreements, close_month, refund_months, to_csv, MonthClose};
use crate::sink::{insert_rows, load_month_lines, load_trial_hours, InvoiceRow};
use clickhouse::Client;
use common::catalogue::PriceBook;
use common::time::{Month, Timestamp};
use std::path::Path;

/// Closes `month` as `aggregator close` does: first records the close where the raters read it
/// and waits `settle` ([`crate::closed`]), then [`close`]s it.
pub async fn close_and_tell_raters(
    cfg: &common::config::PipelineConfig,
    client: &Client,
    book: &PriceBook,
    month: Month,
    out_dir: &Path,
    now: Timestamp,
    settle: std::time::Duration,
) -> anyhow::Result<MonthClose> {
    crate::closed::mark_closed(cfg, client, month, &book.marketplace().id, book.version(), now).await?;
    tokio::time::sleep(settle).await;
    close(client, book, month, out_dir, now).await
}

/// Closes `month`; `client` is bound to the Meterline database.
pub async fn close(
    client: &Client,
    book: &PriceBook,
    month: Month,
    out_dir: &Path,
    now: Timestamp,
) -> anyhow::Result<MonthClose> {
    let mut usage = load_month_lines(client, month).await?;
    // Refunds of earlier months' usage lines recompute those lines from their usage.
    for earlier in refund_months(book, month) {
        usage.extend(load_month_lines(client, earlier).await?);
    }
    let trial = load_trial_hours(client, month, &ami_trial_agreements(book, month)).await?;
    let close = close_month(book, month, &usage, &trial)?;
    let version = u64::try_from(now.millis()).unwrap_or_default();
    let rows = close.lines.iter().map(|l| InvoiceRow::new(l, month, version)).collect::<Result<Vec<_>, _>>()?;
    insert_rows(client, "invoice_lines", &rows).await?;
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join(format!("invoice-lines-{month}.csv")), to_csv(&close.lines))?;
    std::fs::write(out_dir.join(format!("invoice-lines-{month}.json")), serde_json::to_string_pretty(&close)?)?;
    Ok(close)
}
