//! The one place the ingest shell reads time. The cores take `now` as an argument; the embedded
//! demo replays a month by handing the server a simulated clock.
//!
//! The clock lives in [`common::time`] so that every shell (ingest, the embedded writer, the
//! rater) reads time the same way; it is re-exported here so callers keep their paths.

pub use common::time::{Clock, ManualClock, SystemClock};
