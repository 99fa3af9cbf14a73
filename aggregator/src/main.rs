//! `aggregator` (distributed mode): rated topic → monthly charges in ClickHouse.
//!
//! - `aggregator run --config meterline.toml`: applies pending migrations, then runs until
//!   SIGINT/SIGTERM (finishing the current flush).
//! - `aggregator migrate --config meterline.toml`: applies `deploy/clickhouse/` migrations only.

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
    let applied = aggregator::schema::migrate(&base, &ch.database).await.context("applying ClickHouse migrations")?;
    if !applied.is_empty() {
        println!("applied migrations {applied:?} to {}", ch.database);
    }
    if matches!(args.command, Some(Command::Migrate)) {
        return Ok(());
    }
    let book = Arc::new(PriceBook::load(&cfg.price_book).with_context(|| format!("loading {}", cfg.price_book.display()))?);
    common::kafka::ensure_topics(&cfg.kafka).await.context("creating topics")?;
    println!("aggregator consuming {} as group {} → ClickHouse {}/{}", cfg.kafka.topics.rated, cfg.aggregator.group, ch.url, ch.database);
    let stats = aggregator::pipeline::run(&cfg, book, base.with_database(&ch.database), common::shell::shutdown_signal()).await?;
    eprintln!("aggregator stopped: {stats:?}");
    Ok(())
}
