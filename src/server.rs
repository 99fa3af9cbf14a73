//! SHELL. Serves the ingest HTTP API on a bound listener over the embedded pipeline, with
//! `/metrics` and `/ready` beside it (`/health` is the API's).

use crate::pipeline::{Embedded, WriterStats};
use common::catalogue::PriceBook;
use ingest::clock::Clock;
use common::metrics::Metrics;
use ingest::http::{router, HttpLimits, IngestState};
use ingest::metered::Metered;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Hardening options of `serve` (issue 7); the default is plain HTTP, the price book's keys, no
/// per-seller limit and the default body deadline.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Serve TLS with this certificate and key.
    pub tls: Option<ingest::tls::TlsFiles>,
    /// Files to reload API keys from (on SIGHUP or when they change).
    pub keys: ingest::auth::KeySources,
    /// Per-seller rate limits.
    pub seller_limits: Option<ingest::limit::SellerLimits>,
    /// How long a request body may take to arrive.
    pub body_timeout: Option<Duration>,
    /// The registration tokens file `ResolveCustomer` reads (written by `meterline issue-token`).
    pub registration_tokens: Option<std::path::PathBuf>,
}

/// `serve`'s command-line flags for [`ServeOptions`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HardeningArgs {
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Extra API keys (TOML `[[keys]]` with seller, sha256, optional not_after); reloaded with the
    /// price book's keys on SIGHUP or when either file changes.
    #[arg(long)]
    pub keys_file: Option<std::path::PathBuf>,
    /// Per-seller limit in records per second (off when absent).
    #[arg(long)]
    pub seller_records_per_sec: Option<std::num::NonZeroU32>,
    /// Per-seller burst in records (default: the larger of 2 s of rate and one bulk call).
    #[arg(long, requires = "seller_records_per_sec")]
    pub seller_burst: Option<std::num::NonZeroU32>,
    /// Seconds a request body may take to arrive before 408.
    #[arg(long)]
    pub body_timeout_secs: Option<f64>,
}

impl HardeningArgs {
    /// The options, with keys reloaded from `price_book`.
    pub fn options(&self, price_book: &Path) -> anyhow::Result<ServeOptions> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ingest::tls::TlsFiles { cert: cert.clone(), key: key.clone() }),
            _ => None,
        };
        let one_bulk_call = std::num::NonZeroU32::new(HttpLimits::default().max_bulk_records as u32).expect("bulk limit > 0");
        let seller_limits = self.seller_records_per_sec.map(|rate| {
            let default_burst = rate.saturating_mul(std::num::NonZeroU32::new(2).expect("2 > 0")).max(one_bulk_call);
            ingest::limit::SellerLimits { records_per_sec: rate, burst: self.seller_burst.unwrap_or(default_burst) }
        });
        let body_timeout = match self.body_timeout_secs {
            Some(s) if !(s.is_finite() && s > 0.0) => anyhow::bail!("--body-timeout-secs must be a positive number of seconds"),
            Some(s) => Some(Duration::from_secs_f64(s)),
            None => None,
        };
        Ok(ServeOptions {
            tls,
            keys: ingest::auth::KeySources { price_book: Some(price_book.to_owned()), keys_file: self.keys_file.clone() },
            seller_limits,
            body_timeout,
            registration_tokens: None,
        })
    }
}

/// Records allowed to wait for the writer before callers get 429.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 500_000;

/// Runs the API on `listener` until `shutdown` resolves, then drains: in-flight calls finish,
/// the writer commits what is queued, and the store is closed.
pub async fn serve(
    listener: TcpListener,
    db: &Path,
    book: Arc<PriceBook>,
    clock: Arc<dyn Clock>,
    max_in_flight: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<WriterStats> {
    serve_with(listener, db, book, clock, max_in_flight, ServeOptions::default(), shutdown).await
}

/// [`serve`] with the hardening options.
pub async fn serve_with(
    listener: TcpListener,
    db: &Path,
    book: Arc<PriceBook>,
    clock: Arc<dyn Clock>,
    max_in_flight: usize,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<WriterStats> {
    let tls = opts.tls.as_ref().map(ingest::tls::server_config).transpose()?;
    let keys = ingest::auth::SharedKeys::new(opts.keys.load(&book)?);
    let security = ingest::guard::Security { keys: keys.clone(), ..ingest::guard::Security::for_book(&book) }
        .with_seller_limits(opts.seller_limits)
        .with_body_timeout(opts.body_timeout.unwrap_or(ingest::guard::DEFAULT_BODY_TIMEOUT));
    let reloads = (opts.keys.price_book.is_some() || opts.keys.keys_file.is_some())
        .then(|| ingest::auth::watch(keys, opts.keys.clone(), Arc::clone(&book), Duration::from_secs(2)));
    let metrics = Metrics::new("meterline");
    let embedded = Embedded::start_with_metrics(db, Arc::clone(&book), Arc::clone(&clock), max_in_flight, Arc::clone(&metrics))?;
    let sink = Metered::new(embedded.sink.clone(), Arc::clone(&metrics), Arc::clone(&book));
    let tokens = ingest::aws::RegistrationTokens { path: opts.registration_tokens.clone() };
    let state = Arc::new(IngestState { book, sink, clock, limits: HttpLimits::default(), security, tokens });
    // `/metrics` and `/ready` beside the API (same names as the distributed binaries).
    let app = common::ops::instrument(router(state), &metrics);
    metrics.set_ready(true);
    let stopping = Arc::clone(&metrics);
    let shutdown = async move {
        shutdown.await;
        stopping.set_ready(false);
        tracing::info!("shutdown requested: draining in-flight calls, then the writer's queue");
    };
    let served = ingest::tls::serve(listener, app, tls, shutdown).await;
    if let Some(r) = reloads {
        r.abort();
    }
    served?;
    Ok(embedded.shutdown()?)
}
