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
use tokio::net::TcpListener;

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
    let metrics = Metrics::new("meterline");
    let embedded = Embedded::start_with_metrics(db, Arc::clone(&book), Arc::clone(&clock), max_in_flight, Arc::clone(&metrics))?;
    let sink = Metered::new(embedded.sink.clone(), Arc::clone(&metrics), Arc::clone(&book));
    let state = Arc::new(IngestState { book, sink, clock, limits: HttpLimits::default() });
    // `/metrics` and `/ready` beside the API (same names as the distributed binaries).
    let app = common::ops::instrument(router(state), &metrics);
    metrics.set_ready(true);
    let stopping = Arc::clone(&metrics);
    let shutdown = async move {
        shutdown.await;
        stopping.set_ready(false);
        tracing::info!("shutdown requested: draining in-flight calls, then the writer's queue");
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(embedded.shutdown()?)
}
