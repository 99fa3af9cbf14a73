//! The demo month: README command 1.
//!
//! Seeds a realistic catalogue (loadtest's scenario), starts the embedded pipeline behind the real
//! HTTP API on a loopback port, and replays a month hour by hour: a simulated clock is set to a
//! few minutes past each hour and the sellers post that hour's records through `BatchMeterUsage`
//! (with identical resends, conflicting resends and invalid records mixed in). Then it checks that
//! every invoice line equals the exact sum of its rated line items, and prints the summary.

use crate::report;
use crate::server::{serve, DEFAULT_MAX_IN_FLIGHT};
use crate::store::Store;
use aggregator::rollup::MonthlyRollup;
use anyhow::{bail, Context};
use common::catalogue::PriceBook;
use common::id::{DedupKey, RecordId};
use common::money::Currency;
use common::rated::{ChargeType, RatedRecord};
use common::time::{Hour, Month, Timestamp};
use indicatif::{ProgressBar, ProgressStyle};
use ingest::clock::{Clock, ManualClock};
use loadtest::client::{Client, Tally};
use loadtest::scenario::{Scenario, ScenarioConfig};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rust_decimal::Decimal;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

/// Hours of usage posted per round (the oldest is then 5 h 07 min old: inside the 6-hour window).
const HOURS_PER_ROUND: i64 = 4;

/// Demo knobs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the database, price book and keys go (recreated each run).
    pub data_dir: PathBuf,
    /// Customers.
    pub customers: usize,
    /// Month to replay.
    pub month: Month,
    /// Seed.
    pub seed: u64,
    /// Calls in flight.
    pub concurrency: usize,
    /// Show a progress bar.
    pub progress: bool,
}

/// Runs the demo and returns the text to print.
pub async fn run(opts: DemoOptions) -> anyhow::Result<String> {
    std::fs::create_dir_all(&opts.data_dir).with_context(|| format!("creating {}", opts.data_dir.display()))?;
    let db = opts.data_dir.join("meterline.db");
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", db.display()));
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing the previous demo's {}", p.display()))?;
        }
    }
    let scenario = Scenario::generate(ScenarioConfig {
        customers: opts.customers,
        month: opts.month,
        seed: opts.seed,
        ..Default::default()
    });
    let book = Arc::new(PriceBook::new(scenario.doc.clone())?);
    let book_path = opts.data_dir.join("price-book.toml");
    std::fs::write(&book_path, book.to_toml()?).with_context(|| format!("writing {}", book_path.display()))?;
    let keys_path = opts.data_dir.join("api-keys.txt");
    let keys: String = scenario.keys.iter().map(|k| format!("{} {}\n", k.seller, k.key)).collect();
    std::fs::write(&keys_path, keys)?;

    let month = opts.month;
    let clock = Arc::new(ManualClock::new(month.start()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let (db, book, clock) = (db.clone(), Arc::clone(&book), Arc::clone(&clock) as Arc<dyn Clock>);
        async move {
            serve(listener, &db, book, clock, DEFAULT_MAX_IN_FLIGHT, async {
                // A dropped sender also means stop.
                stop_rx.await.ok();
            })
            .await
        }
    });

    let client = Client::new(&url)?;
    let mut rng = SmallRng::seed_from_u64(opts.seed ^ 0x5eed);
    let hours = month.hours();
    let bar = if opts.progress { ProgressBar::new(hours as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<22} [{bar:40}] {pos}/{len} hours  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut tally = Tally::default();
    // Sellers report a few minutes after each hour ends; a round sends several hours at once
    // (all still inside the 6-hour window) so the group commits stay full.
    let mut h = 0;
    while h < hours {
        let round: Vec<Hour> = (h..(h + HOURS_PER_ROUND).min(hours)).map(|i| Hour(month.first_hour().0 + i)).collect();
        let last = *round.last().expect("a round has hours");
        clock.set(last.start().plus_millis(3_600_000 + 7 * 60_000));
        let batches: Vec<_> = round.iter().flat_map(|hour| scenario.hour_traffic(*hour, &mut rng)).collect();
        let t = client.send_all(batches, |s| scenario.key_of(s).to_owned(), opts.concurrency).await?;
        tally.merge(&t);
        bar.set_message(last.to_string());
        bar.inc(round.len() as u64);
        h += HOURS_PER_ROUND;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    // The server may have stopped by itself already; its result is awaited next.
    stop_tx.send(()).ok();
    let writer = server.await??;

    let conn = Store::open_read_only(&db)?;
    let check = verify_lines_against_line_items(&conn)?;
    let mut out = String::new();
    let products = &scenario.doc.products;
    let widest = products
        .iter()
        .max_by_key(|p| p.dimensions.len())
        .map(|p| (p.code.as_str(), p.dimensions.len()))
        .unwrap_or(("-", 0));
    let annual = scenario.doc.agreements.iter().filter(|a| !a.annual.is_empty()).count();
    out.push_str(&format!(
        "Meterline demo: {month} on the embedded default (SQLite, no server)\n\
         Catalogue: {} products ({} has {} dimensions), {} customers, {} agreements, {} with annual subscriptions\n\
         Posted {} records in {} BatchMeterUsage calls over HTTP in {:.1} s: {} records/s \
         (ack p50 {:.1} ms, p99 {:.1} ms; {} group commits)\n\n",
        products.len(),
        widest.0,
        widest.1,
        scenario.doc.customers.len(),
        scenario.doc.agreements.len(),
        annual,
        report::n(tally.records),
        report::n(tally.calls),
        elapsed.as_secs_f64(),
        report::n((tally.records as f64 / elapsed.as_secs_f64().max(1e-9)) as u64),
        tally.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
        tally.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
        report::n(writer.transactions),
    ));
    out.push_str(&report::store_summary(&conn, Some(&month.to_string()))?);
    out.push_str(&format!(
        "\nCheck: every invoice line equals the exact sum of its {} rated line items: {check}\n",
        report::n(check.items)
    ));
    drop(conn);
    // Month close: listing fees and each party's net, exported for invoicing, once the month's
    // window (its end + acceptance window + final-records grace) has passed.
    let now = aggregator::close::timing::earliest_final_close(month, book.windows());
    let closed = crate::close::close(&db, &book, month, &opts.data_dir.join("close"), now, Default::default())?;
    out.push('\n');
    out.push_str(&crate::close::summary(&closed));
    let dir = opts.data_dir.display();
    out.push_str(&format!(
        "\nQuery the results (the store is {dir}/meterline.db; the price book {dir}/price-book.toml):\n\
         \x20 cargo run --release -- charges  --data-dir {dir} --month {month} [--format csv|json]\n\
         \x20 cargo run --release -- invoices --data-dir {dir} --month {month}\n\
         \x20 cargo run --release -- close    --data-dir {dir} --month {month} --draft   (what it would bill now; the month is closed for good)\n\
         \x20 cargo run --release -- query    --data-dir {dir} \"SELECT reason, count(*) FROM rejected_records GROUP BY reason\"\n\
         \x20 cargo run --release -- serve    --data-dir {dir} --price-book {dir}/price-book.toml   (API keys: {dir}/api-keys.txt)\n"
    ));
    if tally.by_status.get("Success").copied().unwrap_or(0) == 0 {
        bail!("the demo accepted no records:\n{out}");
    }
    Ok(out)
}

/// Outcome of re-deriving invoice lines from line items.
#[derive(Debug, Clone, Copy)]
pub struct LineCheck {
    /// Rated line items read.
    pub items: u64,
    /// Lines compared.
    pub lines: usize,
    /// Lines that differed.
    pub mismatched: usize,
}

impl std::fmt::Display for LineCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.mismatched == 0 {
            write!(f, "OK ({} lines)", self.lines)
        } else {
            write!(f, "{} of {} lines DIFFER", self.mismatched, self.lines)
        }
    }
}

/// Re-folds every rated line item and compares with `monthly_charges`: traceability, checked.
pub fn verify_lines_against_line_items(conn: &rusqlite::Connection) -> anyhow::Result<LineCheck> {
    let mut st = conn.prepare(
        "SELECT record_id, dedup_key, seller, product, customer, dimension, hour, quantity, covered_quantity,
                billable_quantity, unit_rate, currency, amount, agreement_id, offer_id, pricing_model, month_price,
                booked_month, charge_type
         FROM rated_usage",
    )?;
    let mut rows = st.query([])?;
    let mut rollup = MonthlyRollup::new();
    let mut items = 0u64;
    let d = |s: String| Decimal::from_str(&s).map_err(|e| anyhow::anyhow!("{s}: {e}"));
    while let Some(r) = rows.next()? {
        let rec = RatedRecord {
            record_id: RecordId::from_str(&r.get::<_, String>(0)?).map_err(anyhow::Error::msg)?,
            dedup_key: DedupKey::from_str(&r.get::<_, String>(1)?).map_err(anyhow::Error::msg)?,
            seller: r.get(2)?,
            product: r.get(3)?,
            customer: r.get(4)?,
            dimension: r.get(5)?,
            hour: Hour(r.get(6)?),
            quantity: d(r.get(7)?)?,
            covered_quantity: d(r.get(8)?)?,
            billable_quantity: d(r.get(9)?)?,
            unit_rate: d(r.get(10)?)?,
            currency: Currency::new(&r.get::<_, String>(11)?).map_err(anyhow::Error::msg)?,
            amount: d(r.get(12)?)?,
            month_price: r.get::<_, Option<String>>(16)?.map(|j| serde_json::from_str(&j)).transpose()?,
            pricing_model: r.get(15)?,
            booked_month: r
                .get::<_, Option<String>>(17)?
                .map(|m| Month::parse(&m))
                .transpose()
                .map_err(anyhow::Error::msg)?,
            charge_type: ChargeType::parse(&r.get::<_, String>(18)?).context("charge_type")?,
            agreement_id: r.get(13)?,
            offer_id: r.get(14)?,
            price_book_version: String::new(),
            allocations: vec![],
        };
        rollup.fold(&rec)?;
        items += 1;
    }
    let derived = rollup.lines()?;
    let stored = Store::charge_lines(conn, None)?;
    let mismatched = if derived.len() != stored.len() {
        derived.len().abs_diff(stored.len()).max(1)
    } else {
        derived
            .iter()
            .zip(&stored)
            .filter(|(a, b)| {
                (
                    a.month.as_str(),
                    a.customer.as_str(),
                    a.product.as_str(),
                    a.dimension.as_str(),
                    a.amount_unrounded,
                    a.amount,
                    a.quantity,
                ) != (
                    b.month.as_str(),
                    b.customer.as_str(),
                    b.product.as_str(),
                    b.dimension.as_str(),
                    b.amount_unrounded,
                    b.amount,
                    b.quantity,
                )
            })
            .count()
    };
    Ok(LineCheck { items, lines: stored.len(), mismatched })
}

/// Used by `main` to decide whether to draw a progress bar.
pub fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// Parses a month argument.
pub fn parse_month(s: &str) -> anyhow::Result<Month> {
    Month::parse(s).map_err(anyhow::Error::msg)
}

/// Now, from the system clock.
pub fn now() -> Timestamp {
    ingest::clock::SystemClock.now()
}
