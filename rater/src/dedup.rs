//! PURE. Deduplication over the acceptance window (domain-rules MET-11, design guarantee 3).
//!
//! State: for each UTC hour still inside the window, the claims accepted for it: a [`DedupKey`]
//! (product, customer, dimension, hour) and the [`RecordId`] that was accepted for it. A new record
//! is either the first for its key, an identical resend (same record id: `Success`, no extra
//! charge), or a conflict (other quantity or allocations: `DuplicateRecord`, the first stands).
//! Records for one key are never summed.
//!
//! Claims are two-phase so that a key is never claimed before its record is durable (guarantee 2):
//! [`Deduper::check_and_stage`] stages a claim (visible to later records of the same batch),
//! [`Deduper::commit`] makes staged claims permanent after the shell's write succeeded, and
//! [`Deduper::rollback`] forgets them if it failed.
//!
//! Memory is bounded: hours older than the window (plus slack) are dropped whole by
//! [`Deduper::evict_before`]; a restart rebuilds the state by replaying that many hours.
//!
//! Layout (issue 6, P5): an hour's claims live in one sorted array of 32-byte (key, record)
//! pairs with no slack capacity, plus a small hash map of claims committed since the last merge.
//! When that map reaches 1/8 of the array it is sorted and merged in place, so an hour costs
//! 32 bytes per key plus at most ~1/8 of that in the map, instead of the ~45–90 bytes per key of a
//! hash map of the same pairs (load factor and power-of-two growth). The array is searched by
//! interpolation: fingerprints are uniform, so a key's rank is about `key / 2^128 × len`, and the
//! search touches a few neighbouring cache lines instead of ~log2(len) scattered ones. Both
//! 128-bit values are kept: the key exactly (no false duplicates) and the standing record id,
//! which a `DuplicateRecord` refusal names.

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

/// One accepted claim: a slot's key and the record that holds it.
#[derive(Clone, Copy, Debug, Default)]
struct Claim {
    key: u128,
    record: u128,
}

/// Merge the recent map into the sorted array once it holds this share of the array's length…
const MERGE_DIVISOR: usize = 8;
/// …or at least this many claims (small hours stay in the map).
const MERGE_MIN: usize = 1024;

/// The committed claims of one hour.
#[derive(Debug, Default)]
struct HourClaims {
    /// Sorted by key, unique, capacity == length.
    sorted: Vec<Claim>,
    /// Committed since the last merge; disjoint from `sorted`.
    recent: FpMap<u128>,
}

impl HourClaims {
    fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    fn get(&self, key: u128) -> Option<u128> {
        if let Some(&r) = self.recent.get(&key) {
            return Some(r);
        }
        find(&self.sorted, key).ok().map(|i| self.sorted[i].record)
    }

    /// Inserts or replaces a claim; true when the key is new.
    fn insert(&mut self, key: u128, record: u128) -> bool {
        if let Ok(i) = find(&self.sorted, key) {
            self.sorted[i].record = record;
            return false;
        }
        if self.recent.insert(key, record).is_some() {
            return false;
        }
        if self.recent.len() >= MERGE_MIN.max(self.sorted.len() / MERGE_DIVISOR) {
            self.merge();
        }
        true
    }

    /// Sorts the recent claims and merges them into the array from the back, in place.
    fn merge(&mut self) {
        let mut add: Vec<Claim> = self.recent.drain().map(|(key, record)| Claim { key, record }).collect();
        self.recent = FpMap::default();
        add.sort_unstable_by_key(|c| c.key);
        let old = self.sorted.len();
        self.sorted.reserve_exact(add.len());
        self.sorted.resize(old + add.len(), Claim::default());
        let (mut i, mut j) = (old, add.len());
        for w in (0..old + add.len()).rev() {
            if j == 0 {
                break;
            }
            if i > 0 && self.sorted[i - 1].key > add[j - 1].key {
                self.sorted[w] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[w] = add[j - 1];
                j -= 1;
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        self.sorted.capacity() * std::mem::size_of::<Claim>() + map_bytes(&self.recent)
    }
}

/// Heap bytes of a hashbrown map: its buckets plus one control byte each (plus a group's worth).
fn map_bytes<V>(m: &FpMap<V>) -> usize {
    let cap = m.capacity();
    if cap == 0 {
        return 0;
    }
    // hashbrown keeps `buckets` = next power of two ≥ cap × 8/7.
    let buckets = (cap * 8 / 7).next_power_of_two();
    buckets * (std::mem::size_of::<(u128, V)>() + 1) + 16
}

/// Position of `key` in `sorted` (or where it would go), by interpolation then a bracketing search.
fn find(sorted: &[Claim], key: u128) -> Result<usize, usize> {
    let n = sorted.len();
    if n < 32 {
        return sorted.binary_search_by_key(&key, |c| c.key);
    }
    // Uniform fingerprints: the expected rank of `key` is key / 2^128 × n (< n).
    let g = (((key >> 64) * n as u128) >> 64) as usize;
    let at = sorted[g].key;
    if at == key {
        return Ok(g);
    }
    let (lo, hi) = if at < key {
        // Grow a window above g until its last element is ≥ key.
        let (mut lo, mut step) = (g + 1, 16);
        loop {
            let hi = (g + step).min(n);
            if hi == n || sorted[hi - 1].key >= key {
                break (lo, hi);
            }
            lo = hi;
            step *= 2;
        }
    } else {
        let (mut hi, mut step) = (g, 16);
        loop {
            let lo = g.saturating_sub(step);
            if lo == 0 || sorted[lo].key <= key {
                break (lo, hi);
            }
            hi = lo;
            step *= 2;
        }
    };
    sorted[lo..hi].binary_search_by_key(&key, |c| c.key).map(|i| i + lo).map_err(|i| i + lo)
}

/// The dedup state of one partition (embedded: of the whole store).
#[derive(Debug, Default)]
pub struct Deduper {
    /// Committed claims, per hour.
    hours: BTreeMap<i64, HourClaims>,
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

    /// Heap bytes held by the claims (arrays at capacity, maps at bucket count), for P5.
    pub fn heap_bytes(&self) -> usize {
        let per_hour = std::mem::size_of::<HourClaims>() + 3 * std::mem::size_of::<usize>();
        self.hours.values().map(|h| h.heap_bytes() + per_hour).sum::<usize>() + map_bytes(&self.staged)
    }

    /// Classifies a record and, if it is new, stages its claim.
    pub fn check_and_stage(&mut self, key: DedupKey, hour: Hour, record: RecordId) -> DedupOutcome {
        let found =
            self.staged.get(&key.0).map(|&(_, r)| r).or_else(|| self.hours.get(&hour.0).and_then(|m| m.get(key.0)));
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
            if self.hours.entry(hour).or_default().insert(key, record) {
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
        if self.hours.entry(hour.0).or_default().insert(key.0, record.0) {
            self.len += 1;
        }
    }

    /// Drops every hour before `oldest`. Records that old are refused by the acceptance window,
    /// so they can never collide with a dropped key.
    pub fn evict_before(&mut self, oldest: Hour) {
        let keep = self.hours.split_off(&oldest.0);
        let dropped: usize = self.hours.values().map(HourClaims::len).sum();
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

    #[test]
    fn large_hours_merge_into_the_sorted_array_and_stay_exact() {
        // Enough keys for several merges; spread keys like fingerprints (multiplicative hash).
        let fp = |i: u128| i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) ^ (i << 3);
        let mut d = Deduper::new();
        for i in 0..20_000u128 {
            assert_eq!(d.check_and_stage(k(fp(i)), Hour(5), r(i)), DedupOutcome::New, "key {i}");
            if i % 100 == 99 {
                d.commit();
            }
        }
        d.commit();
        assert_eq!(d.len(), 20_000);
        for i in (0..20_000u128).step_by(7) {
            assert_eq!(d.check_and_stage(k(fp(i)), Hour(5), r(i)), DedupOutcome::Identical);
            assert_eq!(d.check_and_stage(k(fp(i)), Hour(5), r(i + 1)), DedupOutcome::Conflict { standing: r(i) });
        }
        assert_eq!(d.check_and_stage(k(fp(20_001)), Hour(5), r(1)), DedupOutcome::New);
        // Extreme keys are found too.
        for key in [0, 1, u128::MAX] {
            d.restore(k(key), Hour(5), r(9));
            assert_eq!(d.check_and_stage(k(key), Hour(5), r(9)), DedupOutcome::Identical);
        }
        assert!(d.heap_bytes() < 20_003 * 40, "{} bytes", d.heap_bytes());
    }
}
