//! PURE. Deduplication over the acceptance window (domain-rules MET-11, design guarantee 3).
//!
//! State: for each UTC hour still inside the window, a map from [`DedupKey`] (product, customer,
//! dimension, hour) to the [`RecordId`] that was accepted for it. A new record is either the
//! first for its key, an identical resend (same record id: `Success`, no extra charge), or a
//! conflict (other quantity or allocations: `DuplicateRecord`, the first stands). Records for one
//! key are never summed.
//!
//! Claims are two-phase so that a key is never claimed before its record is durable (guarantee 2):
//! [`Deduper::check_and_stage`] stages a claim (visible to later records of the same batch),
//! [`Deduper::commit`] makes staged claims permanent after the shell's write succeeded, and
//! [`Deduper::rollback`] forgets them if it failed.
//!
//! Memory is bounded: hours older than the window (plus slack) are dropped whole by
//! [`Deduper::evict_before`]; a restart rebuilds the state by replaying that many hours.

use common::id::{DedupKey, RecordId};
use common::time::Hour;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// What dedup says about a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupOutcome {
    /// First record for its key: stage it and rate it.
    New,
    /// Same key, same content: answer `Success` with the same id and charge nothing more.
    Identical,
    /// Same key, other content: refuse as `DuplicateRecord`; `standing` is what was accepted.
    Conflict {
        /// The record accepted first for this key.
        standing: RecordId,
    },
}

/// Keys are already uniformly distributed fingerprints: hashing them again is wasted work.
#[derive(Default, Clone, Copy, Debug)]
pub struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-u128 keys; fold bytes in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64);
    }
}

type FpMap<V> = HashMap<u128, V, BuildHasherDefault<FingerprintHasher>>;

/// The dedup state of one partition (embedded: of the whole store).
#[derive(Debug, Default)]
pub struct Deduper {
    /// Committed claims, per hour.
    hours: BTreeMap<i64, FpMap<u128>>,
    /// Claims staged by the current batch, not yet durable.
    staged: FpMap<(i64, u128)>,
    /// Committed claims in total.
    len: usize,
}

impl Deduper {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of committed keys held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no keys are held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of hours held.
    pub fn hours(&self) -> usize {
        self.hours.len()
    }

    /// Classifies a record and, if it is new, stages its claim.
    pub fn check_and_stage(&mut self, key: DedupKey, hour: Hour, record: RecordId) -> DedupOutcome {
        let found = self
            .staged
            .get(&key.0)
            .map(|&(_, r)| r)
            .or_else(|| self.hours.get(&hour.0).and_then(|m| m.get(&key.0).copied()));
        match found {
            Some(r) if r == record.0 => DedupOutcome::Identical,
            Some(r) => DedupOutcome::Conflict { standing: RecordId(r) },
            None => {
                self.staged.insert(key.0, (hour.0, record.0));
                DedupOutcome::New
            }
        }
    }

    /// Forgets a staged claim (the record was refused later, e.g. it could not be priced).
    pub fn unstage(&mut self, key: DedupKey) {
        self.staged.remove(&key.0);
    }

    /// Makes every staged claim permanent. Call only after the records are durable.
    pub fn commit(&mut self) {
        for (key, (hour, record)) in self.staged.drain() {
            if self.hours.entry(hour).or_default().insert(key, record).is_none() {
                self.len += 1;
            }
        }
    }

    /// Drops every staged claim (the write failed; the records were not accepted).
    pub fn rollback(&mut self) {
        self.staged.clear();
    }

    /// Inserts a claim known to be durable already (replay on restart).
    pub fn restore(&mut self, key: DedupKey, hour: Hour, record: RecordId) {
        if self.hours.entry(hour.0).or_default().insert(key.0, record.0).is_none() {
            self.len += 1;
        }
    }

    /// Drops every hour before `oldest`. Records that old are refused by the acceptance window,
    /// so they can never collide with a dropped key.
    pub fn evict_before(&mut self, oldest: Hour) {
        let keep = self.hours.split_off(&oldest.0);
        let dropped: usize = self.hours.values().map(HashMap::len).sum();
        self.len -= dropped;
        self.hours = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u128) -> DedupKey {
        DedupKey(n)
    }
    fn r(n: u128) -> RecordId {
        RecordId(n)
    }

    #[test]
    fn identical_resend_is_identical_conflict_names_the_standing_record() {
        let mut d = Deduper::new();
        assert_eq!(d.check_and_stage(k(1), Hour(10), r(100)), DedupOutcome::New);
        d.commit();
        assert_eq!(d.check_and_stage(k(1), Hour(10), r(100)), DedupOutcome::Identical);
        assert_eq!(d.check_and_stage(k(1), Hour(10), r(101)), DedupOutcome::Conflict { standing: r(100) });
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn duplicates_within_one_batch_see_the_staged_claim() {
        let mut d = Deduper::new();
        assert_eq!(d.check_and_stage(k(1), Hour(10), r(100)), DedupOutcome::New);
        assert_eq!(d.check_and_stage(k(1), Hour(10), r(100)), DedupOutcome::Identical);
        assert_eq!(d.check_and_stage(k(1), Hour(10), r(7)), DedupOutcome::Conflict { standing: r(100) });
    }

    #[test]
    fn a_rolled_back_claim_is_not_held() {
        let mut d = Deduper::new();
        d.check_and_stage(k(1), Hour(10), r(100));
        d.rollback();
        assert_eq!(d.check_and_stage(k(1), Hour(10), r(200)), DedupOutcome::New);
    }

    #[test]
    fn eviction_drops_whole_hours_and_keeps_the_count() {
        let mut d = Deduper::new();
        for h in 0..10 {
            for i in 0..5 {
                d.restore(k(h * 100 + i), Hour(h as i64), r(1));
            }
        }
        assert_eq!(d.len(), 50);
        d.evict_before(Hour(7));
        assert_eq!(d.len(), 15);
        assert_eq!(d.hours(), 3);
        assert_eq!(d.check_and_stage(k(900), Hour(9), r(1)), DedupOutcome::Identical);
    }
}
