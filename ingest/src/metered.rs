//! SHELL. A [`UsageSink`] wrapper that counts what ingest did with each record (stage `ingest`)
//! and how many records wait for the sink. Both modes wrap their sink in it, so the HTTP router
//! stays free of metrics code.
//!
//! Counted once the sink answered: every validated record of a call the sink took is
//! `accepted`, every record refused by validation is `rejected` with its reason; a call the sink
//! refused whole (429/503) counts in `meterline_sink_errors_total` and nothing else, since its
//! records were not taken and the caller sends them again.

use crate::sink::{RefusedRecord, SinkError, SinkOutcome, UsageSink};
use common::catalogue::LiveBook;
use common::metrics::{Metrics, Outcome, RecordLabels, Tally};
use common::usage::UsageRecord;
use std::sync::Arc;

/// The stage label ingest counts under.
pub const STAGE: &str = "ingest";

/// `inner`, counted.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Arc<Metrics>,
    book: LiveBook,
}

impl<S> Metered<S> {
    /// Wraps `inner`; creates the catalogue's series at zero. Records are labelled by the book
    /// in force at each call (a product added by a catalogue change gets its series then).
    pub fn new(inner: S, metrics: Arc<Metrics>, book: impl Into<LiveBook>) -> Self {
        let book = book.into();
        metrics.init_catalogue(STAGE, &book.current());
        Metered { inner, metrics, book }
    }

    /// The wrapped sink.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

/// Lowers the in-flight gauge when the call ends, however it ends.
struct InFlightGuard<'a>(&'a Metrics, i64);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.in_flight.sub(self.1);
    }
}

impl<S: UsageSink> UsageSink for Metered<S> {
    async fn submit(
        &self,
        accepted: Vec<UsageRecord>,
        refused: Vec<RefusedRecord>,
    ) -> Result<Vec<SinkOutcome>, SinkError> {
        let n = (accepted.len() + refused.len()) as i64;
        self.metrics.in_flight.add(n);
        let _guard = InFlightGuard(&self.metrics, n);
        // Labels borrow the price book only, so they outlive the records moved into the sink.
        let book = self.book.current();
        let mut tally = Tally::default();
        for r in &accepted {
            tally.add(RecordLabels::new(&book, &r.product, &r.seller), Outcome::Accepted);
        }
        for r in &refused {
            tally.add(RecordLabels::new(&book, &r.product, &r.seller), Outcome::Rejected(r.rejection.code));
            // One debug line per refusal, enough to trace it (the rejected table holds the rest).
            tracing::debug!(seller = %r.seller, product = %r.product, record_id = ?r.record_id.map(|i| i.to_string()), reason = r.rejection.code.as_str(), "record refused by validation");
        }
        match self.inner.submit(accepted, refused).await {
            Ok(outcomes) => {
                tally.flush(&self.metrics, STAGE);
                // `/ready` follows the sink (issue 12): back as soon as a write is acknowledged.
                if !self.metrics.sink_writable() {
                    self.metrics.set_sink_writable(true);
                }
                Ok(outcomes)
            }
            Err(e) => {
                let kind = match e {
                    SinkError::Overloaded { .. } => "overloaded",
                    // The broker took the records; a rater is late. Readiness is not the sink's.
                    SinkError::Undecided(_) => "undecided",
                    SinkError::Unavailable(_) => {
                        // The store or broker refuses writes: out of the load balancer until it
                        // takes one again (the embedded writer and `ingest` probe meanwhile).
                        self.metrics.set_sink_writable(false);
                        "unavailable"
                    }
                };
                self.metrics.sink_errors.with_label_values(&[STAGE, kind]).inc();
                Err(e)
            }
        }
    }
}
