//! Ingest: where usage enters Meterline.
//!
//! # Layout
//! - [`wire`]: the AWS Metering JSON shapes (`BatchMeterUsage`, `MeterUsage`) and the native bulk
//!   line format, parsed with borrowed strings.
//! - [`validate`]: PURE. A wire record + the price book + `now` → a canonical
//!   [`common::usage::UsageRecord`] or a named [`common::reject::Rejection`].
//! - [`sink`]: where validated records go to become durable (the embedded store, or Kafka in
//!   distributed mode); the HTTP answer waits for it.
//! - [`http`]: SHELL. The axum router: authentication, body limits, back-pressure, responses.
//! - [`metered`]: SHELL. Any sink, counted into the process's metrics (stage `ingest`).
//! - `kafka_sink` (feature `distributed`): SHELL. The raw topic as the sink, answered after the
//!   broker's acknowledgement.
//!
//! - [`aws`]: AWS Metering's semantics on the AWS-shaped routes (whole-call exceptions, the
//!   per-record opt-in, deployment identities, `ResolveCustomer`, `RegisterUsage`, request ids).
//! - [`auth`], [`limit`], [`guard`], [`tls`] (issue 7): hashed keys compared in constant time and
//!   reloaded without a restart, per-seller rate limits, the body deadline and size limits, TLS.
//!
//! - [`serve`] (issue 12): the connection loop: header-read and idle timeouts, the connection
//!   cap below the open-file limit, TLS on the same path. [`shed`]: PURE. The in-flight bound
//!   from the sink's measured rate. [`ndjson`]: bodies read under the route's byte, record and
//!   line limits as they arrive. [`throttle`]: failed authentication throttled per address.
//!
//! Data enters in [`http`] and leaves through a [`sink::UsageSink`]; a record is answered
//! `Success` only after the sink reports it durable (design guarantee 1).

pub mod auth;
pub mod aws;
pub mod clock;
pub mod guard;
pub mod http;
#[cfg(feature = "distributed")]
pub mod kafka_recorder;
#[cfg(feature = "distributed")]
pub mod kafka_sink;
pub mod limit;
pub mod metered;
pub mod ndjson;
pub mod operator;
pub mod serve;
pub mod shed;
pub mod sink;
pub mod throttle;
pub mod tls;
pub mod validate;
pub mod wire;
