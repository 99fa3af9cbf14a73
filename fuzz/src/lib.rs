//! Shared pieces of the fuzz targets: the example price book, a fixed "now" inside its
//! agreements, and a sink that accepts whatever the HTTP layer hands it (the targets fuzz the
//! decoders and cores, not storage).

use common::catalogue::PriceBook;
use common::time::Timestamp;
use common::usage::UsageRecord;
use ingest::sink::{RefusedRecord, SinkError, SinkOutcome, UsageSink};
use std::sync::OnceLock;

/// docs/examples/price-book.toml, the book the examples and tests use.
pub const BOOK_TOML: &str = include_str!("../../docs/examples/price-book.toml");

/// The example book, loaded once.
pub fn book() -> &'static PriceBook {
    static BOOK: OnceLock<PriceBook> = OnceLock::new();
    BOOK.get_or_init(|| PriceBook::from_toml(BOOK_TOML).expect("the example price book loads"))
}

/// "Now" for the targets: inside the example agreements.
pub fn now() -> Timestamp {
    Timestamp::parse_rfc3339("2026-11-02T12:30:00Z").expect("valid instant")
}

/// Answers every validated record `Accepted` without storing it.
#[derive(Debug, Default)]
pub struct AcceptAll;

impl UsageSink for AcceptAll {
    async fn submit(&self, accepted: Vec<UsageRecord>, _refused: Vec<RefusedRecord>) -> Result<Vec<SinkOutcome>, SinkError> {
        Ok(accepted.iter().map(|r| SinkOutcome::Accepted { record_id: r.record_id() }).collect())
    }
}
