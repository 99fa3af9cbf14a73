//! Load generation for Meterline: the demo month, smoke runs and benchmarks share it.
//!
//! # Layout
//! - [`scenario`]: a seeded, realistic catalogue (several sellers and products, one with 24
//!   dimensions, annual subscriptions, a private offer in EUR) and the hourly usage sellers would
//!   send for it, with a configurable share of identical resends, conflicting resends and invalid
//!   records.
//! - [`traffic`]: that usage as a bounded, paced stream of calls (AWS batches of 25 or native bulk
//!   calls), for the hours before now or for a month.
//! - [`client`]: posts that traffic through the real HTTP API and tallies the per-record answers
//!   and ack latencies.
//! - [`probe`]: event → charge visible in ClickHouse, sampled.
//! - [`prices`]: the price book flattened per (customer, product, dimension, hour), for SQL.
//! - `kafka` (feature `kafka`): produces straight to the raw topic; reads it back raw (the
//!   broker's limit).
//!
//! Traffic only ever goes to the addresses it is given; the binary refuses non-loopback ones.

pub mod client;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod prices;
pub mod probe;
pub mod scenario;
pub mod traffic;
