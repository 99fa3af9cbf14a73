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
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,rater=info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = PipelineConfig::load(&args.config)?;
    let book = Arc::new(PriceBook::load(&cfg.price_book).with_context(|| format!("loading {}", cfg.price_book.display()))?);
    common::kafka::ensure_topics(&cfg.kafka).await.context("creating topics")?;
    println!("rater consuming {} as group {}", cfg.kafka.topics.raw, cfg.rater.group);
    let stats = rater::pipeline::run(&cfg, book, shutdown_signal()).await?;
    eprintln!("rater stopped: {stats:?}");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
