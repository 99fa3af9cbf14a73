//! Per-seller rate limits, so one seller's flood cannot starve the others.
//!
//! Each seller has a token bucket of records (GCRA, from `governor`): `records_per_sec` refill
//! and `burst` capacity. A call takes as many tokens as it carries records; when the bucket is
//! short, the call is refused whole with 429 and a `Retry-After` that says when it would fit.
//! The global in-flight bound (see [`crate::sink::InFlight`]) still protects memory; this bound
//! protects fairness. Buckets exist only for sellers whose key authenticated, so the map is
//! bounded by the price book.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::time::Duration;

/// The per-seller budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SellerLimits {
    /// Sustained records per second.
    pub records_per_sec: NonZeroU32,
    /// Most records at once (a call larger than this can never pass).
    pub burst: NonZeroU32,
}

/// Why a seller's call was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Over budget now: retry after this long.
    RetryAfter(Duration),
    /// The call alone exceeds the burst: split it.
    TooLarge {
        /// The burst.
        burst: u32,
    },
}

/// Token buckets per seller.
#[derive(Debug)]
pub struct SellerLimiter {
    limits: SellerLimits,
    buckets: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl SellerLimiter {
    /// Buckets with `limits` for every seller.
    pub fn new(limits: SellerLimits) -> Self {
        let quota = Quota::per_second(limits.records_per_sec).allow_burst(limits.burst);
        let clock = DefaultClock::default();
        SellerLimiter { limits, buckets: RateLimiter::dashmap_with_clock(quota, clock.clone()), clock }
    }

    /// The budget.
    pub fn limits(&self) -> SellerLimits {
        self.limits
    }

    /// Takes `records` tokens from `seller`'s bucket, or says why not.
    pub fn check(&self, seller: &str, records: usize) -> Result<(), Limited> {
        let Some(n) = u32::try_from(records).ok().and_then(NonZeroU32::new) else {
            return if records == 0 { Ok(()) } else { Err(Limited::TooLarge { burst: self.limits.burst.get() }) };
        };
        // The key is allocated per call only to look it up; sellers are few and ids short.
        match self.buckets.check_key_n(&seller.to_owned(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Limited::RetryAfter(not_until.wait_time_from(self.clock.now()))),
            Err(_) => Err(Limited::TooLarge { burst: self.limits.burst.get() }),
        }
    }
}

/// Whole seconds to put in `Retry-After` (at least 1: 0 would invite an immediate retry storm).
pub fn retry_after_secs(wait: Duration) -> u32 {
    u32::try_from(wait.as_millis().div_ceil(1000)).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn one_sellers_flood_leaves_the_others_budget_alone() {
        let l = SellerLimiter::new(SellerLimits { records_per_sec: nz(10), burst: nz(50) });
        assert_eq!(l.check("a", 50), Ok(()));
        assert!(matches!(l.check("a", 25), Err(Limited::RetryAfter(w)) if w > Duration::ZERO));
        assert_eq!(l.check("b", 50), Ok(()), "b has its own bucket");
        assert_eq!(l.check("c", 51), Err(Limited::TooLarge { burst: 50 }));
        assert_eq!(l.check("c", 0), Ok(()));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
