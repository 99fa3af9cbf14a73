//! PURE. Window arithmetic: how far back dedup state must reach, in one place for every shell.
//!
//! A record is accepted up to the acceptance window after its hour (domain-rules MET-11), so a
//! dedup claim must be held that long. Stages keep it [`DEDUP_SLACK_MS`] longer: the clocks of
//! ingest and of the deciding stage may differ by that much, and a claim dropped a moment too
//! early would let a late resend be charged twice. The same span sizes the replay that rebuilds
//! the state on start ([`replay_start`]) and the eviction that bounds it ([`eviction_horizon`]),
//! so what is evicted is exactly what a rebuild would not have loaded.

use crate::time::{Hour, Timestamp};

/// Dedup state is kept this much longer than the acceptance window.
pub const DEDUP_SLACK_MS: i64 = crate::time::HOUR_MS;

/// How long dedup state is held: the acceptance window plus the slack.
pub const fn dedup_span_ms(acceptance_ms: i64) -> i64 {
    acceptance_ms + DEDUP_SLACK_MS
}

/// The earliest instant a rebuild at `now` replays: claims from before it can no longer collide
/// with a record the acceptance window admits.
pub const fn replay_start(now: Timestamp, acceptance_ms: i64) -> Timestamp {
    now.plus_millis(-dedup_span_ms(acceptance_ms))
}

/// The oldest hour whose dedup state is kept at `now`; every earlier hour may be dropped whole.
/// The hour of [`replay_start`], so eviction and rebuild agree.
pub const fn eviction_horizon(now: Timestamp, acceptance_ms: i64) -> Hour {
    replay_start(now, acceptance_ms).hour()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::HOUR_MS;

    #[test]
    fn the_replay_reaches_the_acceptance_window_plus_one_hour_of_slack() {
        // 6 h window, now 2026-11-02T10:30Z: replay from 03:30Z, keep hours from 03:00Z on.
        let now = Timestamp::parse_rfc3339("2026-11-02T10:30:00Z").unwrap();
        let start = replay_start(now, 6 * HOUR_MS);
        assert_eq!(start, Timestamp::parse_rfc3339("2026-11-02T03:30:00Z").unwrap());
        assert_eq!(
            eviction_horizon(now, 6 * HOUR_MS),
            Timestamp::parse_rfc3339("2026-11-02T03:00:00Z").unwrap().hour()
        );
        assert_eq!(dedup_span_ms(6 * HOUR_MS), 7 * HOUR_MS);
    }
}
