//! PURE. When a month may be closed for good, and what closing it earlier cuts off.
//!
//! Usage for a month keeps arriving after its last hour: a record is accepted for the
//! profile's acceptance window after its hour, and an agreement that ended at the month's end
//! keeps taking its final records for the final-records grace. A final close before
//! `month end + acceptance window + final-records grace` would refuse (or move to the next month
//! as a correction) usage the seller sent in time, so it is refused unless the operator says
//! so, and then the close says what it cut off. A draft can be computed at any time; a final
//! close happens once (its invoice lines are immutable; later usage follows the profile's
//! late-usage rule).

use common::catalogue::{LateUsage, Windows};
use common::time::{Month, Timestamp, HOUR_MS};
use std::fmt;

/// The earliest instant `month` may be closed for good under `windows`.
pub fn earliest_final_close(month: Month, windows: Windows) -> Timestamp {
    month.end().plus_millis(windows.acceptance_ms + windows.final_grace_ms)
}

/// Why a final close is refused. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseRefused {
    /// Usage for the month may still arrive.
    #[error(
        "{month} can't be closed for good before {earliest} (its end + the {acceptance} acceptance window + the {grace} \
         final-records grace): usage for it may still arrive for another {left}. What to do: run `close --draft` to \
         review the invoice lines, or pass --cut-off-late-usage to close now, knowing that usage for {month} arriving \
         until {earliest} will be {fate}"
    )]
    TooEarly {
        /// The month.
        month: Month,
        /// The earliest final close.
        earliest: Rfc3339,
        /// The acceptance window.
        acceptance: Span,
        /// The final-records grace.
        grace: Span,
        /// Time left until `earliest`.
        left: Span,
        /// What happens to usage cut off.
        fate: Fate,
    },
    /// The month was closed for good already.
    #[error(
        "{month} was closed for good at {closed_at}; its invoice lines are final and are not rewritten. Usage for it \
         arriving now is {fate}. What to do: nothing; `close --draft --month {month}` still shows what it would bill now"
    )]
    AlreadyClosed {
        /// The month.
        month: Month,
        /// When it was closed.
        closed_at: Rfc3339,
        /// What happens to usage for it now.
        fate: Fate,
    },
}

/// What a forced early close cut off: said with the close's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutOff {
    /// The month.
    pub month: Month,
    /// Until when usage for it would still have been accepted.
    pub earliest: Timestamp,
    /// How long before that the close happened.
    pub early_by_ms: i64,
    /// What happens to that usage.
    pub fate: Fate,
}

impl fmt::Display for CutOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "closed {} before its window ended at {} (--cut-off-late-usage): usage for {} arriving until then is {}",
            Span(self.early_by_ms),
            Rfc3339(self.earliest),
            self.month,
            self.fate
        )
    }
}

/// Decides whether `month` may be closed for good at `now`.
///
/// `closed_at` is the month's earlier final close, if any; `cut_off` is the operator's explicit
/// consent to close before the window ends. `Ok(None)`: a regular close. `Ok(Some(cut))`: an early
/// close the operator asked for, with what it cuts off.
pub fn check_final_close(
    month: Month,
    windows: Windows,
    late_usage: LateUsage,
    now: Timestamp,
    closed_at: Option<Timestamp>,
    cut_off: bool,
) -> Result<Option<CutOff>, CloseRefused> {
    let fate = Fate { late_usage, next: month.next() };
    if let Some(at) = closed_at {
        return Err(CloseRefused::AlreadyClosed { month, closed_at: Rfc3339(at), fate });
    }
    let earliest = earliest_final_close(month, windows);
    let early_by_ms = earliest.millis() - now.millis();
    if early_by_ms <= 0 {
        return Ok(None);
    }
    if !cut_off {
        return Err(CloseRefused::TooEarly {
            month,
            earliest: Rfc3339(earliest),
            acceptance: Span(windows.acceptance_ms),
            grace: Span(windows.final_grace_ms),
            left: Span(early_by_ms),
            fate,
        });
    }
    Ok(Some(CutOff { month, earliest, early_by_ms, fate }))
}

/// What happens to usage for a closed month, by the profile's late-usage rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fate {
    late_usage: LateUsage,
    next: Month,
}

impl fmt::Display for Fate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.late_usage {
            LateUsage::Refuse => f.write_str("refused as belonging to a closed month"),
            LateUsage::CorrectionNextMonth => write!(f, "booked on {} as a correction", self.next),
        }
    }
}

/// A timestamp printed as RFC 3339, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub Timestamp);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.to_datetime().format("%Y-%m-%dT%H:%M:%SZ"))
    }
}

/// A duration printed for people: `6 h`, `1 h 30 min`, `45 min`, `12 s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub i64);

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.max(0);
        let (h, min) = (ms / HOUR_MS, (ms % HOUR_MS) / 60_000);
        match (h, min) {
            (0, 0) => write!(f, "{} s", (ms + 999) / 1000),
            (0, m) => write!(f, "{m} min"),
            (h, 0) => write!(f, "{h} h"),
            (h, m) => write!(f, "{h} h {m} min"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AWS: Windows = Windows { acceptance_ms: 6 * HOUR_MS, future_skew_ms: 300_000, final_grace_ms: HOUR_MS };
    fn nov() -> Month {
        Month::parse("2026-11").unwrap()
    }
    fn at(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn the_earliest_close_is_the_month_end_plus_the_window_and_the_grace() {
        assert_eq!(earliest_final_close(nov(), AWS), at("2026-12-01T07:00:00Z"));
    }

    #[test]
    fn a_close_inside_the_window_is_refused_and_says_until_when_and_what_to_do() {
        // The morning after the month: usage from 2026-11-30 late evening is still being accepted.
        let e = check_final_close(nov(), AWS, LateUsage::Refuse, at("2026-12-01T01:30:00Z"), None, false).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, CloseRefused::TooEarly { .. }));
        assert!(text.contains("before 2026-12-01T07:00:00Z"), "{text}");
        assert!(text.contains("6 h acceptance window + the 1 h final-records grace"), "{text}");
        assert!(text.contains("another 5 h 30 min"), "{text}");
        assert!(text.contains("--draft") && text.contains("--cut-off-late-usage"), "{text}");
        assert!(text.contains("refused as belonging to a closed month"), "{text}");
        // Before the month even ended.
        assert!(check_final_close(nov(), AWS, LateUsage::Refuse, at("2026-11-15T00:00:00Z"), None, false).is_err());
    }

    #[test]
    fn a_close_after_the_window_is_a_regular_close() {
        for now in ["2026-12-01T07:00:00Z", "2027-03-01T00:00:00Z"] {
            assert_eq!(check_final_close(nov(), AWS, LateUsage::Refuse, at(now), None, false), Ok(None));
        }
    }

    #[test]
    fn an_early_close_the_operator_asked_for_says_what_it_cut_off() {
        let cut = check_final_close(nov(), AWS, LateUsage::CorrectionNextMonth, at("2026-12-01T06:00:00Z"), None, true)
            .unwrap()
            .unwrap();
        assert_eq!(cut.earliest, at("2026-12-01T07:00:00Z"));
        assert_eq!(cut.early_by_ms, HOUR_MS);
        let text = cut.to_string();
        assert!(text.contains("closed 1 h before its window ended at 2026-12-01T07:00:00Z"), "{text}");
        assert!(text.contains("booked on 2026-12 as a correction"), "{text}");
    }

    #[test]
    fn a_month_closed_for_good_is_not_closed_again_even_when_forced() {
        let closed = Some(at("2026-12-02T00:00:00Z"));
        for cut_off in [false, true] {
            let e = check_final_close(nov(), AWS, LateUsage::Refuse, at("2026-12-03T00:00:00Z"), closed, cut_off)
                .unwrap_err();
            assert!(matches!(e, CloseRefused::AlreadyClosed { .. }));
            assert!(e.to_string().contains("closed for good at 2026-12-02T00:00:00Z"), "{e}");
        }
    }

    #[test]
    fn spans_read_as_people_write_them() {
        assert_eq!(Span(6 * HOUR_MS).to_string(), "6 h");
        assert_eq!(Span(HOUR_MS + 30 * 60_000).to_string(), "1 h 30 min");
        assert_eq!(Span(45 * 60_000).to_string(), "45 min");
        assert_eq!(Span(1_500).to_string(), "2 s");
    }
}
