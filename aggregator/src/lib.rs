//! Aggregator: turns rated hourly line items into monthly invoice lines.
//!
//! # Layout
//! - [`rollup`]: PURE. Folds [`common::rated::RatedRecord`]s into one exact accumulator per
//!   (month, customer, product, dimension, charge type, currency) and rounds each line once.
//! - [`close`]: PURE. Month close: fees, contracts, trial credits, listing fees, each party's
//!   net, FX for reporting; invoice lines with the RPT-6 columns, as CSV and JSON.
//! - [`invoice`]: PURE. Invoice totals per customer and currency as sums of rounded lines.
//!
//! - `schema` (feature `distributed`): the versioned ClickHouse migrations of `deploy/clickhouse/`.
//! - `sink` (feature `distributed`): SHELL. Row types and ClickHouse reads and writes.
//! - `closed` (feature `distributed`): SHELL. `aggregator close` records the close (ClickHouse
//!   `closed_months`, the closed-months topic the raters follow) before it reads lines.
//! - `closing` (feature `distributed`): SHELL. `aggregator close`: month close over ClickHouse.
//! - `pipeline` (feature `distributed`): SHELL. Rated topic → fold → ClickHouse, exactly once;
//!   transient ClickHouse errors retried with back-off (and SIGTERM seen meanwhile), poison
//!   records dead-lettered, fatal ones (credentials, schema) stop it naming the table and the fix.
//!
//! - [`query`]: SHELL + PURE helpers. The read-only query API's routes, over a mode's
//!   [`query::QueryStore`]; `query_clickhouse` (feature `distributed`) is ClickHouse's.
//!
//! Data enters as rated records (from the embedded store or the rated topic) and leaves as
//! [`common::rated::ChargeLine`]s (to the store or ClickHouse).

pub mod close;
#[cfg(feature = "distributed")]
pub mod closed;
#[cfg(feature = "distributed")]
pub mod closing;
pub mod invoice;
#[cfg(feature = "distributed")]
pub mod pipeline;
pub mod query;
#[cfg(feature = "distributed")]
pub mod query_clickhouse;
pub mod rollup;
#[cfg(feature = "distributed")]
pub mod schema;
#[cfg(feature = "distributed")]
pub mod sink;
