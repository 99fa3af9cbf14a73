//! Meterline's shared vocabulary: what every stage agrees on.
//!
//! # Layout
//! - [`time`]: UTC instants, hours and billing months, and the [`time::Clock`] shells read `now` from
//!   (cores take time as an argument; only [`time::SystemClock`] reads the system's).
//! - [`window`]: PURE. Window arithmetic: the dedup slack, the replay start, the eviction horizon.
//! - [`money`]: ISO-4217 currencies and exact decimal amounts, rounding half-up once per invoice line.
//! - [`id`]: deterministic 128-bit dedup keys and record ids (the exactly-once backbone).
//! - [`usage`]: a validated usage record, as accepted by ingest.
//! - [`reject`]: why a record was refused, by name.
//! - [`pricing`]: the usage pricing models and their arithmetic.
//! - [`catalogue`]: the price book as data: marketplace profile, sellers, products, offers,
//!   customers and agreements.
//! - [`rated`]: a rated hourly line item and a monthly charge line.
//! - [`codec`]: the one topic payload codec (bincode 2 behind a format-version byte).
//! - [`topic`]: what travels on each topic, and the partition key.
//! - [`config`]: the distributed mode's configuration file and environment overrides.
//! - [`metrics`]: every Prometheus metric, one registry per process; `ops` (feature `ops`)
//!   serves it with `/health` and `/ready`.
//!
//! Nothing here performs I/O except [`catalogue::PriceBook::load`], which reads one file, and
//! [`time::SystemClock`], which reads the system clock.

pub mod catalogue;
#[cfg(feature = "kafka")]
pub mod catalogue_topic;
pub mod codec;
pub mod config;
pub mod id;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
pub mod money;
#[cfg(feature = "ops")]
pub mod ops;
pub mod pricing;
pub mod rated;
pub mod reject;
#[cfg(feature = "kafka")]
pub mod shell;
pub mod time;
pub mod topic;
pub mod usage;
pub mod window;
