//! `meterline`: the embedded default's command line.
//!
//! - `demo`: a realistic month end to end through the real HTTP API (README command 1).
//! - `serve`: the ingest API over the embedded store, on the system clock.
//! - `rate`: price book + usage file → charge lines as JSON (scripted checks, golden tests).
//! - `issue-token`: a registration token for `ResolveCustomer` (the AWS sign-up hand-off).
//! - `charges`, `invoices`, `stats`, `query`: read the store.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use common::catalogue::PriceBook;
use common::time::Timestamp;
use meterline::store::Store;
use meterline::{demo, rate, report, server};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "meterline", version, about = "Exact metering and rating of marketplace usage")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a realistic month end to end on the embedded default and print the invoices.
    Demo {
        /// Where the database, price book and demo API keys go (the demo's database is recreated).
        #[arg(long, default_value = "meterline-data")]
        data_dir: PathBuf,
        /// Number of customers.
        #[arg(long, default_value_t = 300)]
        customers: usize,
        /// Month to replay, YYYY-MM.
        #[arg(long, default_value = "2026-10")]
        month: String,
        /// Seed for the catalogue and traffic.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// HTTP calls in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Serve the ingest API over the embedded store.
    Serve {
        /// The price book (TOML or JSON).
        #[arg(long)]
        price_book: PathBuf,
        /// Where the database lives.
        #[arg(long, default_value = "meterline-data")]
        data_dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Most records allowed to wait for the store before callers get 429; below it the bound
        /// follows the writer's measured rate (see --queue-target-ms).
        #[arg(long, default_value_t = server::DEFAULT_MAX_IN_FLIGHT)]
        max_in_flight: usize,
        /// TLS, key rotation, per-seller limits, body deadline.
        #[command(flatten)]
        hardening: server::HardeningArgs,
        /// Registration tokens `ResolveCustomer` resolves (default: the data directory's
        /// `registration-tokens.toml`, which `issue-token` writes).
        #[arg(long)]
        registration_tokens: Option<PathBuf>,
    },
    /// Issue a registration token for a customer's sign-up: the token `ResolveCustomer` turns into
    /// the customer (AWS hands it to the seller's landing page). Prints the token; the tokens
    /// file keeps only its SHA-256.
    IssueToken {
        /// The price book (TOML or JSON).
        #[arg(long)]
        price_book: PathBuf,
        /// Customer id in the price book.
        #[arg(long)]
        customer: String,
        /// Product code in the price book.
        #[arg(long)]
        product: String,
        /// The tokens file to append to (default: the data directory's `registration-tokens.toml`).
        #[arg(long)]
        tokens_file: Option<PathBuf>,
        /// Where `serve` keeps its data (locates the default tokens file).
        #[arg(long, default_value = "meterline-data")]
        data_dir: PathBuf,
        /// How long the token resolves, e.g. `24h`.
        #[arg(long, default_value = "24h")]
        valid_for: String,
    },
    /// Rate a file of usage records (JSON lines with ProductCode) and print the charge lines as JSON.
    Rate {
        /// The price book (TOML or JSON).
        #[arg(long)]
        price_book: PathBuf,
        /// Usage records, one JSON object per line (`-` for standard input).
        #[arg(long)]
        usage: PathBuf,
        /// Apply acceptance windows as if the records arrived at this RFC 3339 instant.
        #[arg(long)]
        now: Option<String>,
        /// Only print lines of this month (YYYY-MM).
        #[arg(long)]
        month: Option<String>,
        /// Also close the month: fees, contracts, credits, listing fees and each party's net.
        #[arg(long, requires = "month")]
        close: bool,
        /// Treat months up to this one (YYYY-MM) as closed: late usage follows the profile's policy.
        #[arg(long)]
        closed_through: Option<String>,
        /// Usage the closed months held when they were closed (JSON lines), rated before
        /// `--closed-through` applies: late usage is corrected at the position they had reached.
        #[arg(long, requires = "closed_through")]
        closed_usage: Option<PathBuf>,
    },
    /// Close a month: write its invoice lines (fees, contracts, credits, each party's net) to the
    /// store and export them as CSV and JSON.
    Close {
        /// Where the database lives.
        #[arg(long, default_value = "meterline-data")]
        data_dir: PathBuf,
        /// The price book (default: the data directory's `price-book.toml`).
        #[arg(long)]
        price_book: Option<PathBuf>,
        /// Month to close, YYYY-MM.
        #[arg(long)]
        month: String,
        /// Where the CSV and JSON go (default: the data directory's `close/`).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Compute and export the invoice lines without closing (`invoice-lines-M.draft.*`): to
        /// review, any time, as often as needed.
        #[arg(long)]
        draft: bool,
        /// Close for good before the month's window ended (its end + acceptance window +
        /// final-records grace): usage for it still arriving is then refused or, by the
        /// profile, booked on the next month.
        #[arg(long, conflicts_with = "draft")]
        cut_off_late_usage: bool,
    },
    /// Validate a price book; with --previous, also check it may replace that one (published
    /// dimensions are add-only).
    CheckPriceBook {
        /// The price book in force until now.
        #[arg(long)]
        previous: Option<PathBuf>,
        /// The new price book.
        price_book: PathBuf,
    },
    /// Print invoice lines from the store.
    Charges(ReportArgs),
    /// Print invoice totals per customer, month and currency.
    Invoices(ReportArgs),
    /// Print record counts by outcome and the summary.
    Stats {
        #[arg(long, default_value = "meterline-data")]
        data_dir: PathBuf,
        #[arg(long)]
        month: Option<String>,
    },
    /// Run a read-only SQL query against the store and print the rows (tab-separated).
    Query {
        #[arg(long, default_value = "meterline-data")]
        data_dir: PathBuf,
        /// The SQL.
        sql: String,
    },
}

/// What the store-reading reports take.
#[derive(clap::Args, Debug)]
struct ReportArgs {
    /// Where the database lives.
    #[arg(long, default_value = "meterline-data")]
    data_dir: PathBuf,
    /// Only this month (YYYY-MM).
    #[arg(long)]
    month: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

/// The registration tokens file's name in the data directory.
const TOKENS_FILE: &str = "registration-tokens.toml";

fn db_path(data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let db = data_dir.join("meterline.db");
    if !db.exists() {
        anyhow::bail!("no store at {} (run `meterline demo` or `meterline serve` first)", db.display());
    }
    Ok(db)
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

macro_rules! outln {
    ($buf:expr) => { $buf.push('\n') };
    ($buf:expr, $($arg:tt)*) => {{ use std::fmt::Write as _; writeln!($buf, $($arg)*).expect("writing to a String cannot fail"); }};
}

fn main() -> anyhow::Result<()> {
    let mut out = String::new();
    let result = run(&mut out);
    emit(&out)?;
    result
}

fn run(out: &mut String) -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo prints its own report; the server logs what it does.
    let default_filter =
        if matches!(cli.command, Command::Serve { .. }) { "warn,meterline=info,ingest=info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Demo { data_dir, customers, month, seed, concurrency } => {
            let opts = demo::DemoOptions {
                data_dir,
                customers,
                month: demo::parse_month(&month)?,
                seed,
                concurrency,
                progress: demo::stderr_is_terminal(),
            };
            eprintln!("Replaying {month} for {customers} customers through the HTTP API…");
            let rt = tokio::runtime::Runtime::new()?;
            let text = rt.block_on(demo::run(opts))?;
            out.push_str(&text);
        }
        Command::Serve { price_book, data_dir, listen, max_in_flight, hardening, registration_tokens } => {
            let book = Arc::new(PriceBook::load(&price_book)?);
            let mut opts = hardening.options(&price_book)?;
            opts.registration_tokens = Some(registration_tokens.unwrap_or_else(|| data_dir.join(TOKENS_FILE)));
            let scheme = if opts.tls.is_some() { "https" } else { "http" };
            std::fs::create_dir_all(&data_dir)?;
            let db = data_dir.join("meterline.db");
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let listener = ingest::serve::bind(&listen).await.with_context(|| format!("binding {listen}"))?;
                let addr = listener.local_addr()?;
                let clock = Arc::new(ingest::clock::SystemClock);
                // The store opens writable (or the process exits naming why) before "listening".
                let started = server::start(&db, book, clock, max_in_flight, opts).await?;
                // One write, tolerant of a reader that went away; scripts (and the crash test)
                // read the address from the first line.
                emit(&format!(
                    "Meterline listening on {scheme}://{addr}  (store {})\n\
                     \x20 POST http://{addr}/v1/BatchMeterUsage   AWS BatchMeterUsage JSON, header X-Api-Key\n\
                     \x20 POST http://{addr}/                     with X-Amz-Target: AWSMPMeteringService.BatchMeterUsage\n\
                     \x20 POST http://{addr}/v1/MeterUsage        AWS MeterUsage JSON (also ResolveCustomer, RegisterUsage)\n\
                     \x20 POST http://{addr}/v1/usage             native bulk, JSON lines\n\
                     \x20 GET  http://{addr}/v1/customers/{{customer}}/usage  query API: usage, charges, invoice-preview, … (docs/api.md)\n\
                     \x20 GET  http://{addr}/metrics             Prometheus metrics (and /health, /ready)\n",
                    db.display()
                ))?;
                // SIGINT or SIGTERM (what systemd and Kubernetes send): drain, commit, exit 0.
                let stats = started
                    .run(listener, async {
                        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                        }
                    })
                    .await?;
                eprintln!("stopped after {} transactions, {} records", stats.transactions, stats.records);
                anyhow::Ok(())
            })?;
        }
        Command::IssueToken { price_book, customer, product, tokens_file, data_dir, valid_for } => {
            let book = PriceBook::load(&price_book)?;
            let now = Timestamp::from_millis(chrono::Utc::now().timestamp_millis());
            let ttl = common::time::parse_duration_ms(&valid_for).map_err(anyhow::Error::msg)?;
            if book.customer(&customer).is_none() {
                anyhow::bail!("customer `{customer}` is not in {}", price_book.display());
            }
            if book.product(&product).is_none() {
                anyhow::bail!("product `{product}` is not in {}", price_book.display());
            }
            // The licence of the agreement in force now (or the next one), so ResolveCustomer
            // answers it as AWS does for Concurrent Agreements.
            let agreement = book
                .agreement_at(&customer, &product, now)
                .or_else(|| book.agreements(&customer, &product).find(|a| a.start > now));
            let Some(agreement) = agreement else {
                anyhow::bail!("customer `{customer}` holds no current or future agreement for `{product}`");
            };
            let token = format!("mlrt-{}", hex::encode(rand::random::<[u8; 24]>()));
            let entry = ingest::aws::TokenEntry::new(
                &token,
                &customer,
                &product,
                agreement.license_arn.as_deref(),
                now.plus_millis(ttl),
            );
            let path = tokens_file.unwrap_or_else(|| data_dir.join(TOKENS_FILE));
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            writeln!(f, "{}", entry.to_toml())?;
            eprintln!(
                "token for `{customer}` / `{product}` appended to {} (valid until {})",
                path.display(),
                entry.expires
            );
            outln!(out, "{token}");
        }
        Command::Rate { price_book, usage, now, month, close, closed_through, closed_usage } => {
            let book = PriceBook::load(&price_book)?;
            let text = if usage.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&usage).with_context(|| format!("reading {}", usage.display()))?
            };
            let now = now.map(|n| Timestamp::parse_rfc3339(&n)).transpose().map_err(anyhow::Error::msg)?;
            let closed_through =
                closed_through.map(|m| common::time::Month::parse(&m)).transpose().map_err(anyhow::Error::msg)?;
            let closed_usage = closed_usage
                .map(|p| std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display())))
                .transpose()?;
            let opts = rate::RateOptions {
                now,
                month: month.as_deref(),
                close,
                closed_through,
                closed_usage: closed_usage.as_deref(),
            };
            let rated = rate::rate_lines(&book, &text, &opts)?;
            outln!(out, "{}", serde_json::to_string_pretty(&rated)?);
        }
        Command::Close { data_dir, price_book, month, out_dir, draft, cut_off_late_usage } => {
            let db = db_path(&data_dir)?;
            let book = PriceBook::load(&price_book.unwrap_or_else(|| data_dir.join("price-book.toml")))?;
            // Operators may have changed the catalogue since the file: close with the book in force.
            let book = meterline::catalogue_log::in_force(&db, Arc::new(book))?;
            let month = common::time::Month::parse(&month).map_err(anyhow::Error::msg)?;
            let now = Timestamp::from_millis(chrono::Utc::now().timestamp_millis());
            let out_dir = out_dir.unwrap_or_else(|| data_dir.join("close"));
            let opts = meterline::close::CloseOptions { draft, cut_off_late_usage };
            let closed = meterline::close::close(&db, &book, month, &out_dir, now, opts)?;
            out.push_str(&meterline::close::summary(&closed));
        }
        Command::CheckPriceBook { previous, price_book } => {
            let book = PriceBook::load(&price_book)?;
            if let Some(prev) = previous {
                book.check_evolution(&PriceBook::load(&prev)?)?;
            }
            let d = book.doc();
            outln!(
                out,
                "{}: valid (version {}, {} products, {} offers, {} agreements)",
                price_book.display(),
                book.version(),
                d.products.len(),
                d.offers.len(),
                d.agreements.len()
            );
        }
        Command::Charges(ReportArgs { data_dir, month, format }) => {
            let conn = Store::open_read_only(&db_path(&data_dir)?)?;
            let lines = Store::charge_lines(&conn, month.as_deref())?;
            match format {
                Format::Json => outln!(out, "{}", serde_json::to_string_pretty(&lines)?),
                Format::Csv => {
                    outln!(out, "month,customer,seller,product,dimension,charge_type,currency,quantity,covered_quantity,billable_quantity,unit_rate,amount_unrounded,amount,records");
                    for l in &lines {
                        outln!(
                            out,
                            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                            l.month,
                            l.customer,
                            l.seller,
                            l.product,
                            l.dimension,
                            l.charge_type,
                            l.currency,
                            l.quantity,
                            l.covered_quantity,
                            l.billable_quantity,
                            l.unit_rate.map(|r| r.to_string()).unwrap_or_default(),
                            l.amount_unrounded,
                            l.amount,
                            l.records
                        );
                    }
                }
                Format::Table => {
                    outln!(
                        out,
                        "{:<8} {:<10} {:<16} {:<14} {:<4} {:>14} {:>12} {:>14} {:>18} {:>14}",
                        "month",
                        "customer",
                        "product",
                        "dimension",
                        "cur",
                        "quantity",
                        "covered",
                        "unit_rate",
                        "unrounded",
                        "amount"
                    );
                    for l in &lines {
                        outln!(
                            out,
                            "{:<8} {:<10} {:<16} {:<14} {:<4} {:>14} {:>12} {:>14} {:>18} {:>14}",
                            l.month,
                            l.customer,
                            l.product,
                            l.dimension,
                            l.currency,
                            l.quantity,
                            l.covered_quantity,
                            l.unit_rate.map(|r| r.to_string()).unwrap_or_else(|| "mixed".into()),
                            l.amount_unrounded,
                            report::money(l.amount)
                        );
                    }
                }
            }
        }
        Command::Invoices(ReportArgs { data_dir, month, format }) => {
            let conn = Store::open_read_only(&db_path(&data_dir)?)?;
            let lines = Store::charge_lines(&conn, month.as_deref())?;
            let invoices = aggregator::invoice::invoice_totals(&lines);
            match format {
                Format::Json => outln!(out, "{}", serde_json::to_string_pretty(&invoices)?),
                Format::Csv => {
                    outln!(out, "month,customer,currency,lines,amount,amount_unrounded");
                    for i in &invoices {
                        outln!(
                            out,
                            "{},{},{},{},{},{}",
                            i.month,
                            i.customer,
                            i.currency,
                            i.lines,
                            i.amount,
                            i.amount_unrounded
                        );
                    }
                }
                Format::Table => out.push_str(&report::invoice_table(&invoices, usize::MAX)),
            }
        }
        Command::Stats { data_dir, month } => {
            let conn = Store::open_read_only(&db_path(&data_dir)?)?;
            out.push_str(&report::store_summary(&conn, month.as_deref())?);
        }
        Command::Query { data_dir, sql } => {
            let conn = Store::open_read_only(&db_path(&data_dir)?)?;
            let mut st = conn.prepare(&sql).with_context(|| format!("preparing `{sql}`"))?;
            let cols: Vec<String> = st.column_names().iter().map(|s| (*s).to_owned()).collect();
            outln!(out, "{}", cols.join("\t"));
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let vals: Vec<String> = (0..cols.len())
                    .map(|i| match r.get_ref(i) {
                        Ok(rusqlite::types::ValueRef::Null) => "NULL".into(),
                        Ok(rusqlite::types::ValueRef::Integer(v)) => v.to_string(),
                        Ok(rusqlite::types::ValueRef::Real(v)) => v.to_string(),
                        Ok(rusqlite::types::ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
                        Ok(rusqlite::types::ValueRef::Blob(b)) => format!("<{} bytes>", b.len()),
                        Err(e) => format!("<{e}>"),
                    })
                    .collect();
                outln!(out, "{}", vals.join("\t"));
            }
        }
    }
    Ok(())
}
