//! SHELL. Serves the ingest HTTP API on a bound listener over the embedded pipeline, with the
//! query API ([`crate::query`]), `/metrics` and `/ready` beside it (`/health` is the API's).

use crate::pipeline::{Embedded, WriterStats};
use anyhow::Context as _;
use common::catalogue::{LiveBook, PriceBook};
use common::metrics::Metrics;
use ingest::clock::Clock;
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
    /// Connection limits (issue 12); `max_connections` is lowered below the open-file limit.
    pub conn: ConnOptions,
    /// Queue target of the in-flight bound (default [`ingest::shed::DEFAULT_QUEUE_TARGET`]).
    pub queue_target: Option<Duration>,
    /// Operator credentials: with them the catalogue changes through the operator API
    /// ([`ingest::operator`]) and the price-book file only seeds it.
    pub operators: Vec<ingest::operator::Credential>,
}

/// Connection options; `None` = the default of [`ingest::serve::ConnLimits`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnOptions {
    /// Most connections open at once.
    pub max_connections: Option<usize>,
    /// Time to send a complete request head (also the keep-alive idle time between calls).
    pub header_timeout: Option<Duration>,
    /// Time a connection may stay open with no byte moving either way.
    pub idle_timeout: Option<Duration>,
}

impl ConnOptions {
    /// The limits, the connection cap kept below the (raised) open-file limit `soft_fds`.
    pub fn limits(&self, soft_fds: u64) -> ingest::serve::ConnLimits {
        let d = ingest::serve::ConnLimits::default();
        ingest::serve::ConnLimits {
            header_read_timeout: self.header_timeout.unwrap_or(d.header_read_timeout),
            idle_timeout: self.idle_timeout.unwrap_or(d.idle_timeout),
            max_connections: ingest::serve::connection_cap(self.max_connections, soft_fds),
            ..d
        }
    }
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
    /// Most connections open at once (default 10,000, always below the open-file limit); one
    /// more gets 503 with `Connection: close`.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a connection may take to send a request head, after opening or after its
    /// previous answer (default 10).
    #[arg(long)]
    pub header_timeout_secs: Option<f64>,
    /// Seconds a connection may stay open with nothing moving either way (default 60).
    #[arg(long)]
    pub idle_timeout_secs: Option<f64>,
    /// Milliseconds of queue the in-flight bound aims at: it admits what the writer commits in
    /// this time at its measured rate (default 250), never more than --max-in-flight.
    #[arg(long)]
    pub queue_target_ms: Option<u64>,
    /// Operator credentials (TOML `[[operators]]`: name, role = operator | seller | analyst,
    /// seller for role seller, api_key_sha256): turns on the operator API, which changes the
    /// catalogue while serving (docs/api.md). The price-book file then only seeds the catalogue.
    #[arg(long)]
    pub operators: Option<std::path::PathBuf>,
}

fn secs(flag: &str, v: Option<f64>) -> anyhow::Result<Option<Duration>> {
    match v {
        Some(s) if !(s.is_finite() && s > 0.0) => anyhow::bail!("--{flag} must be a positive number of seconds"),
        Some(s) => Ok(Some(Duration::from_secs_f64(s))),
        None => Ok(None),
    }
}

impl HardeningArgs {
    /// The options, with keys reloaded from `price_book`.
    pub fn options(&self, price_book: &Path) -> anyhow::Result<ServeOptions> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ingest::tls::TlsFiles { cert: cert.clone(), key: key.clone() }),
            _ => None,
        };
        let one_bulk_call =
            std::num::NonZeroU32::new(HttpLimits::default().max_bulk_records as u32).expect("bulk limit > 0");
        let seller_limits = self.seller_records_per_sec.map(|rate| {
            let default_burst = rate.saturating_mul(std::num::NonZeroU32::new(2).expect("2 > 0")).max(one_bulk_call);
            ingest::limit::SellerLimits { records_per_sec: rate, burst: self.seller_burst.unwrap_or(default_burst) }
        });
        let body_timeout = secs("body-timeout-secs", self.body_timeout_secs)?;
        if self.queue_target_ms == Some(0) {
            anyhow::bail!("--queue-target-ms must be at least 1");
        }
        let operators = match &self.operators {
            Some(path) => ingest::operator::load_operators(path, &common::catalogue::PriceBook::load(price_book)?)
                .map_err(anyhow::Error::msg)?,
            None => Vec::new(),
        };
        Ok(ServeOptions {
            tls,
            keys: ingest::auth::KeySources {
                // With the operator API the book in force (not the file) holds the sellers' keys.
                price_book: operators.is_empty().then(|| price_book.to_owned()),
                keys_file: self.keys_file.clone(),
            },
            operators,
            seller_limits,
            body_timeout,
            conn: ConnOptions {
                max_connections: self.max_connections,
                header_timeout: secs("header-timeout-secs", self.header_timeout_secs)?,
                idle_timeout: secs("idle-timeout-secs", self.idle_timeout_secs)?,
            },
            queue_target: self.queue_target_ms.map(Duration::from_millis),
            registration_tokens: None,
        })
    }
}

/// The most records allowed to wait for the writer before callers get 429: the ceiling of the
/// adaptive bound, which follows the writer's measured rate below it (issue 12).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 100_000;

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
    start(db, book, clock, max_in_flight, opts).await?.run(listener, shutdown).await
}

/// A server whose store opened writable, not yet serving: [`Started::run`] serves it. The
/// binary prints "listening" only once this exists (issue 12: a full disk used to print it and
/// then exit 1).
#[derive(Debug)]
pub struct Started {
    embedded: Embedded,
    app: axum::Router,
    tls: Option<Arc<ingest::tls::ServerConfig>>,
    metrics: Arc<Metrics>,
    reloads: Option<tokio::task::JoinHandle<()>>,
    limits: ingest::serve::ConnLimits,
}

/// Opens the store (refusing one that does not accept a write), loads keys and TLS, raises the
/// open-file limit, and builds the router.
pub async fn start(
    db: &Path,
    book: Arc<PriceBook>,
    clock: Arc<dyn Clock>,
    max_in_flight: usize,
    opts: ServeOptions,
) -> anyhow::Result<Started> {
    let tls = opts.tls.as_ref().map(ingest::tls::server_config).transpose()?;
    // The store's newest catalogue version when operators changed it, else the file's book.
    let book = crate::catalogue_log::in_force(db, book)?;
    let live = LiveBook::new(Arc::clone(&book));
    let keys = ingest::auth::SharedKeys::new(opts.keys.load(&book)?);
    let security = ingest::guard::Security { keys: keys.clone(), ..ingest::guard::Security::for_book(&book) }
        .with_seller_limits(opts.seller_limits)
        .with_body_timeout(opts.body_timeout.unwrap_or(ingest::guard::DEFAULT_BODY_TIMEOUT));
    let metrics = Metrics::new("meterline");
    let target = opts.queue_target.unwrap_or(ingest::shed::DEFAULT_QUEUE_TARGET);
    let embedded =
        Embedded::start_with_target(db, live.clone(), Arc::clone(&clock), max_in_flight, target, Arc::clone(&metrics))
            .with_context(|| {
                format!(
                    "the store at {} does not open for writing (disk full? permissions?); fix it and restart",
                    db.display()
                )
            })?;
    let reloads = (opts.keys.price_book.is_some() || opts.keys.keys_file.is_some())
        .then(|| ingest::auth::watch(keys.clone(), opts.keys.clone(), live.clone(), Duration::from_secs(2)));
    let sink = Metered::new(embedded.sink.clone(), Arc::clone(&metrics), live.clone());
    let tokens = ingest::aws::RegistrationTokens { path: opts.registration_tokens.clone() };
    // The read-only query API beside ingest: the same keys and throttle, its own auth check (not
    // the metering gate), reads on their own read-only connections (WAL: never the writer's).
    let queries = Arc::new(crate::query::QueryState {
        book: live.clone(),
        security: security.clone(),
        clock: Arc::clone(&clock),
        store: Arc::new(crate::query::SqliteQueries { db: db.to_owned() }),
    });
    let operator = Arc::new(ingest::operator::OperatorState {
        book: live.clone(),
        keys,
        key_sources: opts.keys.clone(),
        recorder: crate::catalogue_log::SqliteRecorder { db: db.to_owned(), book: live.clone() },
        credentials: opts.operators.clone(),
        clock: Arc::clone(&clock),
        throttle: security.auth_throttle.clone(),
        serial: tokio::sync::Mutex::new(()),
    });
    let state = Arc::new(IngestState { book: live, sink, clock, limits: HttpLimits::default(), security, tokens });
    // `/metrics` and `/ready` beside the API (same names as the distributed binaries).
    let app = router(state).merge(crate::query::router(queries)).merge(ingest::operator::router(operator));
    let app = common::ops::instrument(app, &metrics);
    let soft_fds = ingest::serve::raise_fd_limit();
    let limits = opts.conn.limits(soft_fds);
    tracing::info!(soft_fds, max_connections = limits.max_connections, "connection cap");
    Ok(Started { embedded, app, tls, metrics, reloads, limits })
}

impl Started {
    /// The connection limits in force.
    pub fn limits(&self) -> ingest::serve::ConnLimits {
        self.limits
    }

    /// Serves on `listener` until `shutdown`, then drains and closes the store.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<WriterStats> {
        let Started { embedded, app, tls, metrics, reloads, limits } = self;
        metrics.set_ready(true);
        let stopping = Arc::clone(&metrics);
        let shutdown = async move {
            shutdown.await;
            stopping.set_ready(false);
            tracing::info!("shutdown requested: draining in-flight calls, then the writer's queue");
        };
        let served = ingest::serve::serve(listener, app, tls, limits, shutdown).await;
        if let Some(r) = reloads {
            r.abort();
        }
        served?;
        Ok(embedded.shutdown()?)
    }
}
