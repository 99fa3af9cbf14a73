//! Meterline's embedded default: the three stages wired in one process over SQLite.
//!
//! This package sits above `ingest`, `rater` and `aggregator` (they never depend on it), so the
//! same stage cores run here and, over Kafka, in distributed mode.
//!
//! # Layout
//! - [`store`]: SHELL. The SQLite database (rated usage, rejected records, monthly charges).
//! - [`pipeline`]: SHELL. The writer thread: group commit of dedup + rating + monthly fold.
//! - [`server`]: SHELL. The ingest HTTP API over the embedded pipeline, and the query API beside it.
//! - [`query`]: SHELL + PURE helpers. The read-only query API (usage, charges, invoice preview,
//!   tags, entitlements) over a mode-neutral [`query::QueryStore`].
//! - [`operator`]: SHELL. The operator API: catalogue changes applied while serving
//!   (`common::catalogue::change` is their pure core), with roles and optimistic versions.
//! - [`catalogue_log`]: SHELL. The store's catalogue versions: the audit log and the durable
//!   catalogue in force (the price-book file seeds it).
//! - [`rate`]: the `rate` command: price-book file + usage file → charge lines, through the same
//!   pure cores, with no store and no HTTP.
//! - [`close`]: SHELL. `meterline close`: month close over the store, CSV/JSON export.
//! - [`demo`]: a realistic month, posted through the real HTTP API.
//! - [`report`]: what a billing person reads at the end.
//!
//! Data enters at `ingest::http` (via [`server`]) and leaves in the store's `monthly_charges`.

/// `writeln!` into a `String`, which cannot fail (the modules below print reports with it).
macro_rules! outln {
    ($buf:expr, $($arg:tt)*) => {
        writeln!($buf, $($arg)*).expect("writing to a String cannot fail")
    };
}

pub mod catalogue_log;
pub mod close;
pub mod demo;
/// The operator API (its shell is shared with the distributed `ingest`).
pub use ingest::operator;
pub mod pipeline;
pub mod query;
pub mod rate;
pub mod report;
pub mod server;
pub mod store;
