//! The `rate` command: a price book and a file of usage records in, the charge lines out.
//!
//! The same pure cores as the running pipeline (ingest validation, the rater's batch core
//! [`rater::batch`], aggregator fold), with no HTTP and no store, so scripted checks and golden
//! tests exercise the path users' records take. Input: JSON lines in the API's record format, each with its
//! `ProductCode` (the native bulk format). Output: deterministic, sorted JSON.

use aggregator::close::{ami_trial_agreements, close_month, close_totals, CloseTotals, MonthClose, TrialHourUsage};
use aggregator::invoice::{invoice_totals, InvoiceTotal};
use aggregator::rollup::MonthlyRollup;
use common::catalogue::PriceBook;
use common::rated::ChargeLine;
use common::reject::{RejectCode, Rejection};
use common::time::{Month, Timestamp};
use ingest::sink::RefusedRecord;
use ingest::validate::{validate, Caller, Context};
use ingest::wire::WireRecord;
use rater::batch::{BatchEffects, Refusal};
use rater::decision::Rater;
use serde::Serialize;
use std::collections::BTreeMap;

/// A refused input line.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RefusedLine {
    /// 1-based line number.
    pub line: usize,
    /// Reason code.
    pub status: &'static str,
    /// Why.
    pub reason: String,
}

/// What the command prints.
#[derive(Debug, Clone, Serialize)]
pub struct RateOutput {
    /// Price-book version used.
    pub price_book_version: String,
    /// Invoice lines, sorted by month, customer, product, dimension, charge type, currency.
    pub charge_lines: Vec<ChargeLine>,
    /// Per customer, month and currency: sums of the rounded lines.
    pub invoice_totals: Vec<InvoiceTotal>,
    /// Records by outcome.
    pub counts: BTreeMap<String, u64>,
    /// Refused lines, in input order.
    pub refused: Vec<RefusedLine>,
    /// With `--close`: the closed month (invoice lines with fees, contracts, credits and nets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub month_close: Option<MonthClose>,
    /// With `--close`: invoice totals, party nets and listing fees of the closed month.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_totals: Option<CloseTotals>,
}

/// How `rate` runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RateOptions<'a> {
    /// Apply acceptance windows as if the records arrived at this instant (else history is
    /// rated as is).
    pub now: Option<Timestamp>,
    /// Only report this month (YYYY-MM).
    pub month: Option<&'a str>,
    /// Also close `month`.
    pub close: bool,
    /// Months up to this one are already closed: late usage follows the profile's policy.
    pub closed_through: Option<Month>,
    /// Usage (JSON lines) the closed months held when they were closed: rated and folded first,
    /// before `closed_through` applies, so late usage is corrected at the position each closed
    /// month had reached (issue 17 item 2). Its lines are in the output like any other.
    pub closed_usage: Option<&'a str>,
}

/// Rates `usage` (JSON lines) against `book`.
pub fn rate_lines(book: &PriceBook, usage: &str, opts: &RateOptions<'_>) -> anyhow::Result<RateOutput> {
    let RateOptions { now, month, close, closed_through, closed_usage } = *opts;
    let close_month_of = match (close, month) {
        (true, Some(m)) => Some(Month::parse(m).map_err(anyhow::Error::msg)?),
        (true, None) => anyhow::bail!("--close needs --month"),
        _ => None,
    };
    let trial_agreements: Vec<String> = close_month_of.map(|m| ami_trial_agreements(book, m)).unwrap_or_default();
    let mut trial_hours = Vec::new();
    let received_at = now.unwrap_or(Timestamp(0));
    let cx = Context { book, caller: Caller::Trusted, now, received_at };
    let mut rater = Rater::new();
    // The batch core decides and counts every line; lines refused by validation pass through it.
    let mut effects = BatchEffects::new();
    // The input line of each refusal, in the core's order.
    let mut refused_at = Vec::new();
    // The closed months' own usage first (while they were open), then the usage to rate.
    let closed_lines = closed_usage.unwrap_or("").lines().count();
    for (i, line) in closed_usage.unwrap_or("").lines().chain(usage.lines()).enumerate() {
        if i == closed_lines {
            rater.set_closed_through(closed_through);
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let validated = serde_json::from_str::<WireRecord<'_>>(line)
            .map_err(|e| Rejection::new(RejectCode::InvalidRecord, format!("line does not parse: {e}")))
            .and_then(|w| validate(&w, None, &cx));
        let refusals = effects.refusals.len();
        match validated {
            Ok(record) => {
                effects.decide(&mut rater, &record, book);
            }
            Err(rejection) => effects.pass_refused(Refusal {
                received_at,
                seller: String::new(),
                product: String::new(),
                customer: String::new(),
                record_id: None,
                rejection,
                raw: RefusedRecord::clip(line),
            }),
        }
        if effects.refusals.len() > refusals {
            // Numbered within its own input (the closed usage's lines first).
            refused_at.push(if i < closed_lines { i + 1 } else { i - closed_lines + 1 });
        }
    }
    if closed_lines == 0 {
        rater.set_closed_through(closed_through);
    }
    // No store: the whole file is one batch, kept at once.
    rater.commit();
    let mut rollup = MonthlyRollup::new();
    for r in effects.rated() {
        if trial_agreements.contains(&r.agreement_id) {
            trial_hours.push(TrialHourUsage {
                agreement_id: r.agreement_id.clone(),
                hour: r.hour,
                dimension: r.dimension.clone(),
                billable_quantity: r.billable_quantity,
                unit_rate: r.unit_rate,
            });
        }
        rollup.stage(r)?;
    }
    rollup.commit();
    let counts: BTreeMap<String, u64> = effects.counts.iter().map(|(s, n)| (s.to_owned(), n)).collect();
    let refused: Vec<RefusedLine> = refused_at
        .into_iter()
        .zip(effects.refusals)
        .map(|(line, r)| RefusedLine { line, status: r.rejection.code.as_str(), reason: r.rejection.message })
        .collect();
    let all_lines = rollup.lines()?;
    // The close takes every month's lines: a refund issued this month may credit an earlier one.
    let month_close = close_month_of.map(|m| close_month(book, m, &all_lines, &trial_hours)).transpose()?;
    let mut lines = all_lines;
    if let Some(m) = month {
        lines.retain(|l| l.month == m);
    }
    let invoice_totals = invoice_totals(&lines);
    let close_totals = month_close.as_ref().map(|c| close_totals(&c.lines));
    Ok(RateOutput {
        price_book_version: book.version().to_owned(),
        charge_lines: lines,
        invoice_totals,
        counts,
        refused,
        month_close,
        close_totals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOK: &str = include_str!("../docs/examples/price-book.toml");

    #[test]
    fn duplicate_lines_in_a_file_follow_the_api_semantics() {
        let book = PriceBook::from_toml(BOOK).unwrap();
        let rec = |q: u32| {
            format!(
                r#"{{"ProductCode":"acme-analytics","CustomerIdentifier":"cid-alpha","Dimension":"users","Timestamp":"2026-11-02T10:00:00Z","Quantity":{q}}}"#
            )
        };
        let input = [rec(100), rec(100), rec(90)].join("\n");
        let out = rate_lines(&book, &input, &RateOptions::default()).unwrap();
        assert_eq!(out.charge_lines.len(), 1);
        assert_eq!(out.charge_lines[0].amount.to_string(), "1.40");
        assert_eq!(out.counts["Success"], 1);
        assert_eq!(out.counts["Success (identical resend)"], 1);
        assert_eq!(
            out.refused,
            vec![RefusedLine { line: 3, status: "DuplicateRecord", reason: out.refused[0].reason.clone() }]
        );
    }
}
