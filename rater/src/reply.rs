//! SHELL (distributed mode). Per-record answers for distributed `ingest`.
//!
//! A raw record that carries a [`REPLY_HEADER`] gets its decision back on the decisions topic,
//! in the same Kafka transaction as the batch's rated output and raw offsets: the asking ingest
//! instance reads that topic `read_committed`, so a decision it sees is durable, and a batch
//! that aborts takes its decisions with it (the records are decided again, and answered then).
//! One [`DecisionBatch`] goes out per asking call and rater batch.

use crate::decision::Decision;
use common::topic::{Decided, DecisionBatch, ReplyTo, REPLY_HEADER};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use std::collections::BTreeMap;

/// The answer a [`Decision`] gives the seller.
pub fn decided(d: &Decision) -> Decided {
    match d {
        Decision::Rated(r) => Decided::Rated { record_id: r.record_id },
        Decision::Identical { record_id } => Decided::Identical { record_id: *record_id },
        Decision::Refused { record_id, rejection } => {
            Decided::Refused { record_id: *record_id, rejection: rejection.clone() }
        }
    }
}

/// Where `msg`'s decision goes, if it asks for one. A header naming a partition outside
/// `0..partitions` is ignored (logged): producing to it would fail the whole batch, forever.
pub fn reply_to(msg: &BorrowedMessage<'_>, partitions: i32) -> Option<ReplyTo> {
    let headers = msg.headers()?;
    let value = headers.iter().find(|h| h.key == REPLY_HEADER)?.value?;
    match ReplyTo::decode(value) {
        Some(r) if (0..partitions).contains(&r.partition) => Some(r),
        _ => {
            tracing::warn!(
                partition = msg.partition(),
                offset = msg.offset(),
                "unusable reply header ignored: nobody is answered for this record"
            );
            None
        }
    }
}

/// The decisions of the current batch, grouped by (decisions partition, call).
#[derive(Debug, Default)]
pub struct Replies {
    by_call: BTreeMap<(i32, u64), Vec<(u32, Decided)>>,
}

impl Replies {
    /// Adds one record's decision.
    pub fn add(&mut self, to: ReplyTo, decided: Decided) {
        self.by_call.entry((to.partition, to.request)).or_default().push((to.index, decided));
    }

    /// The messages to produce: (decisions partition, payload), emptying the set.
    pub fn drain(&mut self) -> impl Iterator<Item = (i32, DecisionBatch)> {
        std::mem::take(&mut self.by_call)
            .into_iter()
            .map(|((partition, request), decisions)| (partition, DecisionBatch { request, decisions }))
    }
}
