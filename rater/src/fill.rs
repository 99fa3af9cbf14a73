//! PURE. When the distributed rater's fill loop takes another record and when it cuts the batch
//! (issue 15).
//!
//! A batch is one Kafka transaction, and its commit (~50–60 ms on the test broker) is serial: the
//! rater takes no record meanwhile. Cut at the linger alone, a batch under lag held only what
//! arrived in 20 ms (~450 records), so the rater ran at batch / commit latency. So:
//!
//! - **Light load, nothing changes.** Until the linger runs out, the loop waits for records as it
//!   always did; once it has run out, the batch is cut as soon as no record is already waiting, so
//!   the ack latency of issue 14 stays what it was.
//! - **Under lag the batch grows.** Past the linger the loop keeps taking records that librdkafka
//!   already holds (a zero wait), until `max_batch` or until the batch's age (since its first
//!   record, i.e. since its transaction began) reaches `max_age`, which bounds both the
//!   transaction's open time and the ack latency a lagging rater adds.
//!
//! The shell (`pipeline`, feature `distributed`) asks [`FillPolicy::next`] before each receive and waits as told.

use std::time::Duration;

/// The least one receive waits while the batch is empty or inside its linger, kept from the fill
/// loop as it was (the loop wakes at least this often to look at the shutdown signal when idle).
pub const MIN_WAIT: Duration = Duration::from_millis(50);

/// What the fill loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Wait up to this long for the next record; a timeout cuts a non-empty batch.
    Wait(Duration),
    /// Past the linger: take a record only if one is already here (zero wait), else cut.
    TakeReady,
    /// Cut the batch now (commit it).
    Cut,
}

/// The rater's batch bounds (`rater.max_batch`, `rater.linger_ms`, `rater.max_batch_age_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillPolicy {
    /// Most records in a batch.
    pub max_batch: usize,
    /// How long a batch waits for records, from the moment it was started (after the previous
    /// commit).
    pub linger: Duration,
    /// Past the linger, how old (since its first record) a batch may grow while records are
    /// already waiting. Validated below the transaction timeout; at or below `linger` a batch
    /// is cut at the linger (no growth).
    pub max_age: Duration,
}

impl FillPolicy {
    /// What to do with a batch of `len` records, `since_start` after the batch was started and
    /// `age` after its first record (zero while empty).
    pub fn next(&self, len: usize, since_start: Duration, age: Duration) -> Fill {
        if len >= self.max_batch {
            return Fill::Cut;
        }
        let wait = self.linger.saturating_sub(since_start);
        if len == 0 || !wait.is_zero() {
            return Fill::Wait(wait.max(MIN_WAIT));
        }
        if age < self.max_age {
            Fill::TakeReady
        } else {
            Fill::Cut
        }
    }

    /// Whether a batch of `len` records takes one more when `record_ready` says one is already
    /// waiting: the bool view of [`FillPolicy::next`] (inside the linger the loop waits for one).
    pub fn keep_filling(&self, len: usize, since_start: Duration, age: Duration, record_ready: bool) -> bool {
        match self.next(len, since_start, age) {
            Fill::Wait(_) => true,
            Fill::TakeReady => record_ready,
            Fill::Cut => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> FillPolicy {
        FillPolicy { max_batch: 10_000, linger: ms(20), max_age: ms(500) }
    }

    #[test]
    fn inside_the_linger_the_loop_waits_for_records_as_before() {
        let p = policy();
        assert_eq!(p.next(0, ms(0), ms(0)), Fill::Wait(ms(50)));
        assert_eq!(p.next(3, ms(5), ms(2)), Fill::Wait(ms(50)), "the 50 ms floor on one wait is kept");
        let long = FillPolicy { linger: ms(100), ..p };
        assert_eq!(long.next(3, ms(10), ms(2)), Fill::Wait(ms(90)));
        // An empty batch waits on, however long it has been idle.
        assert_eq!(p.next(0, ms(60_000), ms(0)), Fill::Wait(ms(50)));
    }

    #[test]
    fn under_light_load_the_batch_is_cut_at_the_linger_once_nothing_is_waiting() {
        let p = policy();
        assert_eq!(p.next(450, ms(20), ms(19)), Fill::TakeReady);
        assert!(!p.keep_filling(450, ms(20), ms(19), false), "nothing waiting past the linger: cut");
        // A batch whose first record came after a long idle spell: cut at once if nothing waits.
        assert!(!p.keep_filling(1, ms(9_000), ms(0), false));
    }

    #[test]
    fn under_lag_the_batch_grows_past_the_linger_to_max_batch() {
        let p = policy();
        // Records keep being ready: the batch takes them at every size below max_batch...
        for len in [450, 1_000, 5_000, 9_999] {
            assert!(p.keep_filling(len, ms(200), ms(199), true), "len {len}");
        }
        // ...and is cut at max_batch, ready or not.
        assert_eq!(p.next(10_000, ms(200), ms(199)), Fill::Cut);
        assert!(!p.keep_filling(10_000, ms(200), ms(199), true));
    }

    #[test]
    fn a_lagging_batch_is_cut_at_its_max_age_counted_from_its_first_record() {
        let p = policy();
        assert!(p.keep_filling(2_000, ms(520), ms(499), true));
        assert_eq!(p.next(2_000, ms(520), ms(500)), Fill::Cut);
        assert!(!p.keep_filling(2_000, ms(9_000), ms(800), true));
    }

    #[test]
    fn a_max_age_within_the_linger_turns_the_growth_off() {
        let p = FillPolicy { linger: ms(3_000), max_age: ms(500), ..policy() };
        assert_eq!(p.next(10, ms(1_000), ms(900)), Fill::Wait(ms(2_000)), "the linger still waits");
        assert_eq!(p.next(10, ms(3_000), ms(2_900)), Fill::Cut, "cut at the linger, as before");
    }

    #[test]
    fn a_batch_never_exceeds_max_batch_even_inside_the_linger() {
        let p = FillPolicy { max_batch: 5, ..policy() };
        assert_eq!(p.next(5, ms(1), ms(1)), Fill::Cut);
        assert_eq!(p.next(4, ms(1), ms(1)), Fill::Wait(ms(50)));
    }
}
