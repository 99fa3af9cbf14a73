//! `rater` (distributed mode): raw topic → dedup + rating → rated and rejected topics.

use anyhow::Context;
use clap::Parser;
use common::catalogue::PriceBook;
use common::config::PipelineConfig;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(about = "Meterline rater: dedup and exact rating of raw usage")]
struct Args {
    /// The distributed-mode configuration file.
    #[arg(long, default_value = "meterline.toml")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::shell::init_tracing("warn,rater=info");
    let args = Args::parse();
    let cfg = PipelineConfig::load(&args.config)?;
    let book = Arc::new(PriceBook::load(&cfg.price_book).with_context(|| format!("loading {}", cfg.price_book.display()))?);
    common::kafka::ensure_topics(&cfg.kafka).await.context("creating topics")?;
    println!("rater consuming {} as group {}", cfg.kafka.topics.raw, cfg.rater.group);
    let stats = rater::pipeline::run(&cfg, book, common::shell::shutdown_signal()).await?;
    eprintln!("rater stopped: {stats:?}");
    Ok(())
}
