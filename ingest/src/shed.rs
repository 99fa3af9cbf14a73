//! PURE. The in-flight bound derived from the sink's measured rate (issue 12).
//!
//! A fixed bound of records waiting for the writer is either too small for a fast disk or, at
//! the old default of 500,000, many seconds of queue on a slow one: 2× overload then got its first
//! 429 after 15 s, with accepted calls waiting as long. Instead the bound is what the writer
//! commits in `target` time at its measured rate, so an admitted call waits about one `target`
//! for the queue ahead of it plus its own commit, and shedding starts as soon as the queue is
//! `target` deep (well within a second of saturation).
//!
//! The rate is measured per commit (records ÷ commit time) and smoothed; it rises with batch
//! size (a commit's fixed cost is shared), so under saturation the bound grows until a commit
//! takes about `target`, and no further.

use std::time::Duration;

/// The adaptive bound on records in flight.
#[derive(Debug, Clone)]
pub struct QueueTarget {
    target: Duration,
    floor: usize,
    ceiling: usize,
    /// Smoothed records per second; `None` before the first measurement.
    rate: Option<f64>,
}

/// Default queueing target: an admitted call waits about this long for the calls ahead of it.
pub const DEFAULT_QUEUE_TARGET: Duration = Duration::from_millis(250);
/// The bound never goes below this many records (a commit's fixed cost must not starve it).
pub const MIN_IN_FLIGHT: usize = 1_000;
/// The bound before the first commit was measured.
pub const INITIAL_IN_FLIGHT: usize = 10_000;
/// Weight of a new measurement in the smoothed rate.
const ALPHA: f64 = 0.3;

impl QueueTarget {
    /// A bound aiming at `target` of queue, between [`MIN_IN_FLIGHT`] (or `ceiling` if smaller)
    /// and `ceiling`.
    pub fn new(target: Duration, ceiling: usize) -> Self {
        let ceiling = ceiling.max(1);
        QueueTarget { target, floor: MIN_IN_FLIGHT.min(ceiling), ceiling, rate: None }
    }

    /// The bound now.
    pub fn bound(&self) -> usize {
        match self.rate {
            None => INITIAL_IN_FLIGHT.clamp(self.floor, self.ceiling),
            Some(rate) => ((rate * self.target.as_secs_f64()) as usize).clamp(self.floor, self.ceiling),
        }
    }

    /// The smoothed rate in records per second, once measured.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Takes one commit of `records` that took `took`; returns the new bound.
    pub fn observe(&mut self, records: usize, took: Duration) -> usize {
        // An empty commit (a probe) says nothing about the rate.
        if records > 0 {
            let sample = records as f64 / took.as_secs_f64().max(1e-6);
            self.rate = Some(match self.rate {
                None => sample,
                Some(r) => r + ALPHA * (sample - r),
            });
        }
        self.bound()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_target_times_the_measured_rate_within_floor_and_ceiling() {
        let mut q = QueueTarget::new(Duration::from_millis(250), 500_000);
        assert_eq!(q.bound(), INITIAL_IN_FLIGHT);
        // 40,000 records/s → 10,000 records is 250 ms of queue.
        assert_eq!(q.observe(4_000, Duration::from_millis(100)), 10_000);
        // A slow disk lowers it, smoothed rather than at once.
        let b = q.observe(100, Duration::from_millis(100));
        assert!(b < 10_000 && b > MIN_IN_FLIGHT, "{b}");
        for _ in 0..50 {
            q.observe(10, Duration::from_millis(100));
        }
        assert_eq!(q.bound(), MIN_IN_FLIGHT, "never below the floor");
        assert_eq!(q.observe(0, Duration::from_secs(5)), MIN_IN_FLIGHT, "a probe changes nothing");
        let mut small = QueueTarget::new(Duration::from_millis(250), 2_000);
        assert_eq!(small.observe(1_000_000, Duration::from_millis(1)), 2_000, "never above the ceiling");
        assert_eq!(QueueTarget::new(Duration::from_millis(250), 500).bound(), 500, "a ceiling below the floor wins");
    }

    #[test]
    fn under_saturation_the_bound_settles_where_a_commit_takes_about_the_target() {
        // A commit costs 5 ms plus 20 µs a record; the writer takes the whole queue each time.
        let mut q = QueueTarget::new(Duration::from_millis(250), 1_000_000);
        let mut batch = MIN_IN_FLIGHT;
        for _ in 0..100 {
            let took = Duration::from_micros(5_000 + 20 * batch as u64);
            batch = q.observe(batch, took);
        }
        let took = Duration::from_micros(5_000 + 20 * batch as u64);
        assert!(took > Duration::from_millis(200) && took < Duration::from_millis(260), "{took:?} for {batch}");
    }
}
