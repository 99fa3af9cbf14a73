//! `rater` (distributed mode): raw topic → dedup + rating → rated and rejected topics.
//!
//! SIGINT/SIGTERM: the current batch is finished (outputs acknowledged, offsets committed), then
//! the process exits 0. On an error it exits 1 saying whether a restart helps (transient) or
//! the cause must be fixed first (fatal: fenced, authorization, configuration). `/metrics`, `/health` and `/ready` on `rater.metrics_listen`.

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
    let seed =
        Arc::new(PriceBook::load(&cfg.price_book).with_context(|| format!("loading {}", cfg.price_book.display()))?);
    common::kafka::ensure_topics(&cfg.kafka).await.context("creating topics")?;
    // The file seeds the catalogue; the catalogue topic's changes are in force on top of it.
    let catalogue = tokio::task::block_in_place(|| common::catalogue_topic::follow(&cfg.kafka, &cfg.rater.group, seed))
        .context("reading the catalogue topic")?;
    let metrics = common::metrics::Metrics::new("rater");
    let _ops = common::ops::serve_configured("rater", cfg.rater.metrics_listen.as_deref(), Arc::clone(&metrics))
        .await
        .context("binding rater.metrics_listen")?;
    println!("rater consuming {} as group {}", cfg.kafka.topics.raw, cfg.rater.group);
    let stats = rater::pipeline::run_with_metrics(&cfg, catalogue, metrics, common::shell::shutdown_signal())
        .await
        .map_err(|e| {
            let what_to_do = match e.class() {
                common::shell::ErrorClass::Fatal => "retrying cannot fix this: fix it, then restart",
                _ => "a restart retries it (the partitions' state is rebuilt from the rated topic)",
            };
            anyhow::anyhow!("rater stopped: {e}. What to do: {what_to_do}")
        })?;
    eprintln!("rater stopped: {stats:?}");
    Ok(())
}
