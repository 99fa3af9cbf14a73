//! Load generation for Meterline: the demo month, smoke runs and benchmarks share it.
//!
//! # Layout
//! - [`scenario`]: a seeded, realistic catalogue (several sellers and products, one with 24
//!   dimensions, annual subscriptions, a private offer in EUR) and the hourly usage sellers would
//!   send for it, with a configurable share of identical resends, conflicting resends and invalid
//!   records.
//! - [`client`]: posts that traffic through the real HTTP API (AWS `BatchMeterUsage` batches of 25
//!   or the native bulk endpoint) and tallies the per-record answers and ack latencies.
//!
//! Traffic only ever goes to the URL it is given; the binary refuses non-loopback addresses.

pub mod client;
pub mod scenario;
