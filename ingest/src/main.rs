//! `ingest` (distributed mode): the HTTP API in front of the raw topic.
//!
//! `ingest --config meterline.toml` loads the shared configuration, creates missing topics,
//! and serves until SIGINT/SIGTERM, then drains: in-flight calls finish and the producer flushes.
//! `/metrics`, `/health` and `/ready` are served on the API's listener.

use anyhow::Context;
use clap::Parser;
use common::catalogue::PriceBook;
use common::config::PipelineConfig;
use common::metrics::Metrics;
use ingest::clock::SystemClock;
use ingest::http::{router, HttpLimits, IngestState};
use ingest::kafka_sink::KafkaSink;
use ingest::metered::Metered;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(about = "Meterline ingest: AWS-compatible metering API → raw topic")]
struct Args {
    /// The distributed-mode configuration file.
    #[arg(long, default_value = "meterline.toml")]
    config: PathBuf,
    /// Listen address (overrides `ingest.listen`).
    #[arg(long)]
    listen: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::shell::init_tracing("warn,ingest=info");
    let args = Args::parse();
    let cfg = PipelineConfig::load(&args.config)?;
    let seed =
        Arc::new(PriceBook::load(&cfg.price_book).with_context(|| format!("loading {}", cfg.price_book.display()))?);
    common::kafka::ensure_topics(&cfg.kafka).await.context("creating topics")?;
    // The catalogue in force: the file seeds it, the catalogue topic's changes are applied on top
    // (read to its end before serving) and followed from then on.
    let catalogue =
        tokio::task::block_in_place(|| common::catalogue_topic::follow(&cfg.kafka, "meterline-ingest", seed))
            .context("reading the catalogue topic")?;
    let live = catalogue.live();
    let book = live.current();
    let operators = match &cfg.ingest.operators {
        Some(path) => ingest::operator::load_operators(path, &book).map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    let metrics = Metrics::new("ingest");
    metrics.in_flight_limit.set(cfg.ingest.max_in_flight as i64);
    metrics.set_config("partitions", i64::from(cfg.kafka.partitions));
    let sink = KafkaSink::new(
        &cfg.kafka,
        cfg.ingest.max_in_flight,
        Duration::from_millis(cfg.ingest.delivery_timeout_ms),
        Duration::from_millis(cfg.ingest.decision_timeout_ms),
    )?
    .with_metrics(Arc::clone(&metrics))
    .with_catalogue(catalogue.clone());
    let decisions = sink.listen_for_decisions(&cfg.kafka).await.context("reading the decisions topic")?;
    let listen = args.listen.unwrap_or(cfg.ingest.listen.clone());
    let sec = &cfg.ingest.security;
    let tls = match (&sec.tls_cert, &sec.tls_key) {
        (Some(cert), Some(key)) => {
            Some(ingest::tls::server_config(&ingest::tls::TlsFiles { cert: cert.clone(), key: key.clone() })?)
        }
        (None, None) => None,
        _ => anyhow::bail!("ingest.security: tls_cert and tls_key go together"),
    };
    // With the operator API the book in force (not the file) holds the sellers' keys.
    let sources = ingest::auth::KeySources {
        price_book: operators.is_empty().then(|| cfg.price_book.clone()),
        keys_file: sec.keys_file.clone(),
    };
    let keys = ingest::auth::SharedKeys::new(sources.load(&book)?);
    let reloads = ingest::auth::watch(keys.clone(), sources.clone(), live.clone(), Duration::from_secs(2));
    // Keys added or revoked through any ingest instance's operator API are in force here too.
    {
        let (keys, sources) = (keys.clone(), sources.clone());
        catalogue.on_change(move |book| match sources.load(book) {
            Ok(ring) => keys.replace(ring),
            Err(e) => tracing::error!("metering keys not rebuilt after catalogue change, the previous keys stay: {e}"),
        });
    }
    let seller_limits = sec.seller_records_per_sec.and_then(NonZeroU32::new).map(|rate| {
        let burst = sec
            .seller_burst
            .and_then(NonZeroU32::new)
            .unwrap_or(rate.saturating_mul(NonZeroU32::new(2).expect("2 > 0")));
        ingest::limit::SellerLimits { records_per_sec: rate, burst }
    });
    let security_keys = keys.clone();
    let security = ingest::guard::Security { keys, ..ingest::guard::Security::for_book(&book) }
        .with_seller_limits(seller_limits)
        .with_body_timeout(sec.body_timeout_ms.map_or(ingest::guard::DEFAULT_BODY_TIMEOUT, Duration::from_millis));
    let listener = ingest::serve::bind(&listen).await.with_context(|| format!("binding {listen}"))?;
    let soft_fds = ingest::serve::raise_fd_limit();
    let defaults = ingest::serve::ConnLimits::default();
    let limits = ingest::serve::ConnLimits {
        max_connections: ingest::serve::connection_cap(sec.max_connections, soft_fds),
        header_read_timeout: sec.header_timeout_ms.map_or(defaults.header_read_timeout, Duration::from_millis),
        idle_timeout: sec.idle_timeout_ms.map_or(defaults.idle_timeout, Duration::from_millis),
        ..defaults
    };
    tracing::info!(soft_fds, max_connections = limits.max_connections, "connection cap");
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("ingest listening on {scheme}://{addr} → topic {}", cfg.kafka.topics.raw);
    let metered = Metered::new(sink.clone(), Arc::clone(&metrics), live.clone());
    let throttle = security.auth_throttle.clone();
    let state = Arc::new(IngestState {
        book: live.clone(),
        sink: metered,
        clock: Arc::new(SystemClock),
        limits: HttpLimits::default(),
        security,
        tokens: Default::default(),
    });
    // `/metrics` and `/ready` beside the API; every call timed until its answer (the ack).
    let mut app = router(state);
    if !operators.is_empty() {
        let producer = common::kafka::producer_config(&cfg.kafka).create().context("catalogue producer")?;
        let recorder = ingest::kafka_recorder::KafkaRecorder {
            producer,
            topic: cfg.kafka.topics.catalogue.clone(),
            follower: catalogue.clone(),
        };
        let operator = Arc::new(ingest::operator::OperatorState {
            book: live.clone(),
            keys: security_keys,
            key_sources: sources,
            recorder,
            credentials: operators,
            clock: Arc::new(SystemClock),
            throttle,
            serial: tokio::sync::Mutex::new(()),
        });
        app = app.merge(ingest::operator::router(operator));
    }
    let app = common::ops::instrument(app, &metrics);
    metrics.set_ready(true);
    // While deliveries fail `/ready` is 503 (see `Metered`); the broker is probed once a second so
    // readiness comes back even when the load balancer sends no calls meanwhile.
    let probing = {
        let (sink, metrics) = (sink.clone(), Arc::clone(&metrics));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if metrics.sink_writable() {
                    continue;
                }
                let s = sink.clone();
                match tokio::task::spawn_blocking(move || s.probe(Duration::from_secs(2))).await {
                    Ok(Ok(())) => {
                        tracing::info!("the broker answers again: ready");
                        metrics.set_sink_writable(true);
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "the broker still refuses"),
                    Err(e) => tracing::warn!(error = %e, "broker probe failed"),
                }
            }
        })
    };
    let stopping = Arc::clone(&metrics);
    let shutdown = async move {
        common::shell::shutdown_signal().await;
        // Out of the load balancer first; in-flight calls still finish.
        stopping.set_ready(false);
        tracing::info!("shutdown requested: draining in-flight calls");
    };
    ingest::serve::serve(listener, app, tls, limits, shutdown).await?;
    reloads.abort();
    probing.abort();
    decisions.abort();
    sink.flush(Duration::from_secs(10));
    tracing::info!("ingest stopped: producer flushed");
    Ok(())
}
