//! Rater: decides, for each accepted usage record, whether it is new, an identical resend or a
//! conflicting duplicate, and prices the new ones exactly.
//!
//! # Layout
//! - [`dedup`]: PURE. The acceptance-window dedup state, keyed by 128-bit fingerprints, with
//!   claims that only become permanent once the caller has made the record durable.
//! - [`rating`]: PURE. Price lookup and the per-unit and annual-coverage (Y−X) math.
//! - [`decision`]: PURE. [`decision::Rater::decide`] = dedup, then rating, as one [`decision::Decision`].
//! - [`batch`]: PURE. A batch of records through the rater: decisions in order, refusals with one
//!   rendering, counts per status, amounts per currency. Every shell (the embedded writer, the
//!   distributed rater, `meterline rate`) decides through it.
//! - [`fill`]: PURE. When the distributed rater's fill loop takes another record and when it
//!   cuts the batch: at the linger under light load, grown to `max_batch` while records are
//!   already waiting, never older than `max_batch_age_ms`.
//!
//! - `pipeline` (feature `distributed`): SHELL. Consume raw → decide → produce rated/rejected →
//!   commit, with the partition's dedup state rebuilt from the rated topic on assignment.
//! - `closed` (feature `distributed`): SHELL. Follows the closed-months topic `aggregator close`
//!   writes, so the late-usage policy applies in distributed mode as in the embedded default.
//! - `reply` (feature `distributed`): SHELL. Each asking record's decision, back to the ingest
//!   instance that asked, in the batch's transaction.
//!
//! Data enters as [`common::usage::UsageRecord`]s and leaves as [`common::rated::RatedRecord`]s or
//! refusals; the shells (embedded store, Kafka) persist them and only then call
//! [`decision::Rater::commit`].

pub mod batch;
#[cfg(feature = "distributed")]
pub mod closed;
pub mod decision;
pub mod dedup;
pub mod fill;
#[cfg(feature = "distributed")]
pub mod pipeline;
pub mod rating;
#[cfg(feature = "distributed")]
pub mod reply;
