//! SHELL. Serves the ingest HTTP API on a bound listener over the embedded pipeline.

use crate::pipeline::{Embedded, WriterStats};
use common::catalogue::PriceBook;
use ingest::clock::Clock;
use ingest::http::{router, HttpLimits, IngestState};
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
    let embedded = Embedded::start(db, Arc::clone(&book), Arc::clone(&clock), max_in_flight)?;
    let state = Arc::new(IngestState { book, sink: embedded.sink.clone(), clock, limits: HttpLimits::default() });
    let app = router(state);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(embedded.shutdown()?)
}
