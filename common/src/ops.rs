//! SHELL (feature `ops`). What an orchestrator and Prometheus ask every binary over HTTP:
//! `GET /metrics` (text exposition), `GET /health` (the process answers: liveness) and
//! `GET /ready` (200 once the stage does its work, 503 while starting or stopping: readiness).
//!
//! `ingest` and `meterline serve` merge [`routes`] into their API router (the API already has
//! `/health`); `rater` and `aggregator` run [`serve`] on their own small listener
//! (`rater.metrics_listen`, `aggregator.metrics_listen`). [`track_http`] times every API call
//! until its answer, which for usage calls is the durable acknowledgement.

use crate::metrics::Metrics;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// `/metrics` and `/ready`, to merge into a router that has its own `/health`.
pub fn routes(m: Arc<Metrics>) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/ready", get(ready)).with_state(m)
}

/// `/metrics`, `/ready` and `/health` for a binary with no other HTTP server.
pub fn standalone(m: Arc<Metrics>) -> Router {
    routes(m).route("/health", get(|| async { "ok" }))
}

async fn metrics(State(m): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.render()).into_response()
}

async fn ready(State(m): State<Arc<Metrics>>) -> Response {
    if m.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// Middleware: observes each request's duration by route pattern (never the raw path, so a
/// caller cannot mint label values) and status code.
pub async fn track_http(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let path =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    if path != "/metrics" {
        m.http_seconds.with_label_values(&[&path, resp.status().as_str()]).observe(started.elapsed().as_secs_f64());
    }
    resp
}

/// The API `router` with [`routes`] merged in and every call timed by [`track_http`].
pub fn instrument(router: Router, m: &Arc<Metrics>) -> Router {
    router.merge(routes(Arc::clone(m))).layer(axum::middleware::from_fn_with_state(Arc::clone(m), track_http))
}

/// A running [`standalone`] listener; stops when dropped.
#[derive(Debug)]
pub struct OpsListener {
    /// The bound address.
    pub addr: Option<SocketAddr>,
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Serves [`standalone`] on `listen` for `binary` (`rater.metrics_listen`, …) until the returned
/// handle is dropped; without an address, warns that nothing can be scraped.
pub async fn serve_configured(binary: &str, listen: Option<&str>, m: Arc<Metrics>) -> std::io::Result<OpsListener> {
    let Some(listen) = listen else {
        tracing::warn!("{binary}.metrics_listen is not set: no /metrics, /health or /ready");
        return Ok(OpsListener { addr: None, _stop: None });
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let addr = serve(listen, m, async {
        // Either a send or the handle dropped: stop in both cases.
        stopped.await.ok();
    })
    .await?;
    println!("{binary} metrics on http://{addr}/metrics");
    Ok(OpsListener { addr: Some(addr), _stop: Some(stop) })
}

/// Binds `listen` and serves [`standalone`] until `shutdown`; returns the bound address.
pub async fn serve(
    listen: &str,
    m: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, standalone(m)).with_graceful_shutdown(shutdown).await {
            eprintln!("metrics listener stopped: {e}");
        }
    });
    Ok(addr)
}
