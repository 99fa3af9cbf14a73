//! `aggregator` (distributed mode): rated topic → monthly charges in ClickHouse.
//!
//! - `aggregator run --config meterline.toml`: applies pending migrations, then runs until
//!   SIGINT/SIGTERM (finishing the current flush). `/metrics`, `/health` and `/ready` on
//!   `aggregator.metrics_listen`.
//!
//! Exit status: 0 after a signal once everything read is in ClickHouse; 128 + the signal (143
//! for SIGTERM, 130 for SIGINT) when the signal came while ClickHouse could not take the last
//! flush (nothing unwritten was committed; the next start replays it); 1 with the error (naming
//! the table and what to fix) when ClickHouse or Kafka refused in a way retrying cannot fix.
//! - `aggregator migrate --config meterline.toml`: applies `deploy/clickhouse/` migrations only.
//! - `aggregator close --month YYYY-MM`: tells the raters the month is closed (ClickHouse
//!   `closed_months`, the closed-months topic), waits the settle time, then writes its invoice
//!   lines and exports them.

use anyhow::Context;
use clap::{Parser, Subcommand};
use common::catalogue::PriceBook;
use common::config::PipelineConfig;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(about = "Meterline aggregator: rated usage → monthly charges in ClickHouse")]
struct Args {
    /// The distributed-mode configuration file.
    #[arg(long, default_value = "meterline.toml", global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume and write (the default).
    Run,
    /// Apply the ClickHouse migrations and exit.
    Migrate,
    /// Close a month: append its invoice lines (fees, contracts, credits, each party's net) to
    /// `invoice_lines` and export them as CSV and JSON.
    Close {
        /// Month to close, YYYY-MM.
        #[arg(long)]
        month: String,
        /// Where the CSV and JSON go.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        /// How long to wait after telling the raters the month is closed, before reading its
        /// lines (ms). Default: the raters' follower poll + the longer of `rater.linger_ms` and
        /// `rater.max_batch_age_ms` + `aggregator.flush_interval_ms` + 1 s for a commit and an
        /// insert.
        #[arg(long)]
        settle_ms: Option<u64>,
        /// Compute and export the invoice lines (`invoice-lines-M.draft.*`) without closing:
        /// to review, any time, as often as needed. The raters are not told.
        #[arg(long)]
        draft: bool,
        /// Close for good before the month's window ended (its end + acceptance window +
        /// final-records grace): usage for it still arriving is then refused or, by the
        /// profile, booked on the next month.
        #[arg(long, conflicts_with = "draft")]
        cut_off_late_usage: bool,
    },
}

fn client(cfg: &common::config::ClickHouseConfig) -> clickhouse::Client {
    let mut c = clickhouse::Client::default().with_url(&cfg.url).with_user(&cfg.user).with_validation(false);
    if let Some(p) = &cfg.password {
        c = c.with_password(p);
    }
    c
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::shell::init_tracing("warn,aggregator=info");
    let args = Args::parse();
    let cfg = PipelineConfig::load(&args.config)?;
    let ch = cfg.clickhouse.clone().context("the aggregator needs a [clickhouse] section")?;
    let base = client(&ch);
    let applied = aggregator::schema::migrate(&base, &ch.database).await.map_err(|source| {
        let e = aggregator::sink::SinkError::ClickHouse { table: "schema_migrations", source };
        let what_to_do = match e.class() {
            common::shell::ErrorClass::Transient => {
                "ClickHouse is unreachable or busy: start the aggregator again once it answers"
            }
            _ => e.advice(),
        };
        anyhow::anyhow!(
            "applying ClickHouse migrations to {} at {}: {e}. What to do: {what_to_do}",
            ch.database,
            ch.url
        )
    })?;
    if !applied.is_empty() {
        println!("applied migrations {applied:?} to {}", ch.database);
    }
    if matches!(args.command, Some(Command::Migrate)) {
        return Ok(());
    }
    let seed =
        Arc::new(PriceBook::load(&cfg.price_book).with_context(|| format!("loading {}", cfg.price_book.display()))?);
    // The closed-months topic the raters follow must exist before a close marker goes on it.
    common::kafka::ensure_topics(&cfg.kafka).await.context("creating topics")?;
    // The file seeds the catalogue; the catalogue topic's changes are in force on top of it, so
    // a close prices fees and channel shares with what operators changed since.
    let catalogue =
        tokio::task::block_in_place(|| common::catalogue_topic::follow(&cfg.kafka, &cfg.aggregator.group, seed))
            .context("reading the catalogue topic")?;
    let book = catalogue.snapshot().1;
    if let Some(Command::Close { month, out_dir, settle_ms, draft, cut_off_late_usage }) = &args.command {
        let month = common::time::Month::parse(month).map_err(anyhow::Error::msg)?;
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let now = common::time::Timestamp::from_millis(i64::try_from(since_epoch.as_millis())?);
        let client = base.with_database(&ch.database);
        let (close, note) = if *draft {
            let (close, closable) = aggregator::closing::draft(&client, &book, month, out_dir, now).await?;
            let note = match closable {
                Ok(()) => format!("it can be closed for good now: `aggregator close --month {month}`"),
                Err(why) => format!("not closable for good now: {why}"),
            };
            (close, Some(note))
        } else {
            let settle =
                settle_ms.map_or_else(|| aggregator::closed::settle_time(&cfg), std::time::Duration::from_millis);
            let (close, cut) = aggregator::closing::close_and_tell_raters(
                &cfg,
                &client,
                &book,
                month,
                out_dir,
                now,
                settle,
                *cut_off_late_usage,
            )
            .await?;
            (close, cut.map(|c| format!("warning: {c}")))
        };
        let billed: std::collections::BTreeMap<String, rust_decimal::Decimal> =
            close.lines.iter().fold(Default::default(), |mut m, l| {
                *m.entry(l.currency.to_string()).or_default() += l.customer_billed_amount;
                m
            });
        let what =
            if *draft { format!("draft of {month} (nothing closed)") } else { format!("closed {month} for good") };
        println!("{what}: {} invoice lines; billed {billed:?}; exported to {}", close.lines.len(), out_dir.display());
        if let Some(note) = note {
            println!("{note}");
        }
        for w in &close.warnings {
            println!("warning: {w}");
        }
        return Ok(());
    }
    let metrics = common::metrics::Metrics::new("aggregator");
    let queries = match &cfg.aggregator.query_listen {
        Some(listen) => Some(serve_queries(&cfg, listen, &catalogue, base.clone().with_database(&ch.database)).await?),
        None => None,
    };
    let _ops =
        common::ops::serve_configured("aggregator", cfg.aggregator.metrics_listen.as_deref(), Arc::clone(&metrics))
            .await
            .context("binding aggregator.metrics_listen")?;
    println!(
        "aggregator consuming {} as group {} → ClickHouse {}/{}",
        cfg.kafka.topics.rated, cfg.aggregator.group, ch.url, ch.database
    );
    let signal = Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let signal = Arc::clone(&signal);
        async move {
            // Set once: only the first signal is waited for.
            signal.set(common::shell::stop_signal().await).ok();
        }
    };
    let stats =
        aggregator::pipeline::run_with_metrics(&cfg, catalogue, base.with_database(&ch.database), metrics, shutdown)
            .await?;
    if let Some(q) = queries {
        q.abort();
    }
    eprintln!("aggregator stopped: {stats:?}");
    if stats.stopped_unflushed {
        if let Some(s) = signal.get() {
            eprintln!("aggregator stopped on {s:?} without its last flush; the next start replays it");
            std::process::exit(s.exit_code());
        }
    }
    Ok(())
}

/// Serves the query API on `listen`, over ClickHouse, with the sellers' metering keys of the
/// catalogue in force (and `ingest.security.keys_file`), as `meterline serve` serves it.
async fn serve_queries(
    cfg: &common::config::PipelineConfig,
    listen: &str,
    catalogue: &common::catalogue_topic::CatalogueFollower,
    client: clickhouse::Client,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let live = catalogue.live();
    let book = live.current();
    let sources = ingest::auth::KeySources { price_book: None, keys_file: cfg.ingest.security.keys_file.clone() };
    let keys = ingest::auth::SharedKeys::new(sources.load(&book)?);
    {
        let (keys, sources) = (keys.clone(), sources.clone());
        catalogue.on_change(move |book| match sources.load(book) {
            Ok(ring) => keys.replace(ring),
            Err(e) => tracing::error!("query API keys not rebuilt after catalogue change, the previous keys stay: {e}"),
        });
    }
    let reloads = sources
        .keys_file
        .is_some()
        .then(|| ingest::auth::watch(keys.clone(), sources.clone(), live.clone(), std::time::Duration::from_secs(2)));
    let state = Arc::new(aggregator::query::QueryState {
        book: live,
        security: ingest::guard::Security { keys, ..ingest::guard::Security::for_book(&book) },
        clock: Arc::new(ingest::clock::SystemClock),
        store: Arc::new(aggregator::query_clickhouse::ClickHouseQueries {
            client,
            runtime: tokio::runtime::Handle::current(),
        }),
    });
    let listener =
        ingest::serve::bind(listen).await.with_context(|| format!("binding aggregator.query_listen {listen}"))?;
    println!("aggregator serving the query API on http://{}", listener.local_addr()?);
    let app = aggregator::query::router(state);
    let limits = ingest::serve::ConnLimits::default();
    Ok(tokio::spawn(async move {
        if let Err(e) = ingest::serve::serve(listener, app, None, limits, std::future::pending()).await {
            tracing::error!("the query API stopped: {e}");
        }
        if let Some(r) = reloads {
            r.abort();
        }
    }))
}
