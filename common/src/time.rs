//! UTC instants, hours and billing months.
//!
//! Metering is hourly (domain-rules HR-1) and billing monthly; both are derived from the record's
//! own timestamp, never from the time it was received (HR-8). Stage cores take `now` as an
//! argument so that tests, replays and the demo's simulated month behave exactly like production;
//! shells read it from a [`Clock`].

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};

/// Milliseconds per hour.
pub const HOUR_MS: i64 = 3_600_000;

/// A source of "now": the one way a shell reads time. Cores take `now` as an argument; the
/// embedded demo replays a month, and tests pin an instant, by handing a shell a [`ManualClock`].
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current instant.
    fn now(&self) -> Timestamp;

    /// The start of the current hour.
    fn now_hour_start(&self) -> Timestamp {
        self.now().hour().start()
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(ms)
    }
}

/// A clock set by its owner (demo replays and tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock showing `t`.
    pub fn new(t: Timestamp) -> Self {
        ManualClock(AtomicI64::new(t.millis()))
    }
    /// Moves the clock to `t`.
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.millis(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// A UTC instant with millisecond precision (what the metering API carries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// From milliseconds since the Unix epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }
    /// Milliseconds since the Unix epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }
    /// The UTC hour this instant falls in (timestamp floored to the hour, MET-11).
    pub const fn hour(self) -> Hour {
        Hour(self.0.div_euclid(HOUR_MS))
    }
    /// Parses RFC 3339 (`2026-10-01T10:05:00Z`, offsets allowed and normalised to UTC).
    pub fn parse_rfc3339(s: &str) -> Result<Self, String> {
        DateTime::parse_from_rfc3339(s)
            .map(|d| Timestamp(d.with_timezone(&Utc).timestamp_millis()))
            .map_err(|e| format!("`{s}` is not an RFC 3339 timestamp: {e}"))
    }
    /// The instant as a chrono value (for formatting and calendar arithmetic).
    pub fn to_datetime(self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.0).single().unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
    /// Adds a signed number of milliseconds.
    pub const fn plus_millis(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }
    /// The same wall-clock instant `n` calendar months later (a 31st becomes the last day of a
    /// shorter month), for contract terms.
    pub fn plus_months(self, n: u32) -> Self {
        let d = self.to_datetime();
        d.checked_add_months(chrono::Months::new(n)).map_or(Timestamp(i64::MAX), |d| Timestamp(d.timestamp_millis()))
    }
    /// The UTC calendar day (days since the epoch).
    pub const fn day(self) -> i64 {
        self.0.div_euclid(DAY_MS)
    }
    /// The billing month this instant falls in.
    pub fn month(self) -> Month {
        self.hour().month()
    }
}

/// Milliseconds per day.
pub const DAY_MS: i64 = 86_400_000;

/// When a price change notified at `notified_at` reaches existing subscribers (PRC-18, as
/// corrected in domain-rules §3.10): the notice period starts on the notice day, so its last day
/// is notice + (`notice_days` − 1); the change applies from the 1st of the month after that last
/// day. 16 Mar → last 13 Jun → 1 Jul; 3 Mar → last 31 May → 1 Jun; 31 Dec → last 30 Mar → 1 Apr.
/// A zero-day period (a profile without notice) applies from the start of the notice day.
pub fn existing_subscriber_effective(notified_at: Timestamp, notice_days: u32) -> Timestamp {
    let notice_day = Timestamp(notified_at.day() * DAY_MS);
    match notice_days.checked_sub(1) {
        None => notice_day,
        Some(after_first) => notice_day.plus_millis(i64::from(after_first) * DAY_MS).month().end(),
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_datetime().to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    }
}

/// A UTC hour, counted in hours since the Unix epoch. The unit of metering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hour(pub i64);

impl Hour {
    /// The first instant of the hour.
    pub const fn start(self) -> Timestamp {
        Timestamp(self.0 * HOUR_MS)
    }
    /// The billing month this hour belongs to.
    pub fn month(self) -> Month {
        let d = self.start().to_datetime();
        Month { year: d.year(), month: d.month() }
    }
}

impl fmt::Display for Hour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.start().to_datetime().format("%Y-%m-%dT%H:00Z"))
    }
}

/// A calendar month in UTC: the billing period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Month {
    /// Calendar year, e.g. 2026.
    pub year: i32,
    /// 1 = January … 12 = December.
    pub month: u32,
}

impl Month {
    /// Parses `YYYY-MM`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a month (expected YYYY-MM)");
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        let year: i32 = y.parse().map_err(|_| bad())?;
        let month: u32 = m.parse().map_err(|_| bad())?;
        if !(1..=12).contains(&month) || y.len() != 4 {
            return Err(bad());
        }
        Ok(Month { year, month })
    }
    /// The first instant of the month.
    pub fn start(self) -> Timestamp {
        let d = NaiveDate::from_ymd_opt(self.year, self.month, 1).unwrap_or_default();
        Timestamp(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc().timestamp_millis())
    }
    /// The month after this one.
    pub fn next(self) -> Month {
        if self.month == 12 {
            Month { year: self.year + 1, month: 1 }
        } else {
            Month { year: self.year, month: self.month + 1 }
        }
    }
    /// First instant of the next month (exclusive end of this one).
    pub fn end(self) -> Timestamp {
        self.next().start()
    }
    /// Number of hours in the month (672, 696, 720 or 744).
    pub fn hours(self) -> i64 {
        (self.end().0 - self.start().0) / HOUR_MS
    }
    /// The first hour of the month.
    pub fn first_hour(self) -> Hour {
        self.start().hour()
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Parses a duration such as `6h`, `90m`, `35d`, `300s` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let bad = || format!("`{s}` is not a duration (expected a number and one of s, m, h, d)");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => HOUR_MS,
        "d" => 24 * HOUR_MS,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_ms).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_change_notice_moves_to_the_first_of_the_month_after_the_90_day_period() {
        // The period's last day is notice + 89 days (domain-rules §3.10, corrected: 3 Mar used
        // to give 1 Jul, reading the day after the period as inside it; it gives 1 Jun).
        let t = |s: &str| Timestamp::parse_rfc3339(s).unwrap();
        let eff = |s: &str| existing_subscriber_effective(t(s), 90).to_string();
        assert_eq!(eff("2026-03-16T09:00:00Z"), "2026-07-01T00:00:00.000Z"); // AWS's example: last 13 Jun
        assert_eq!(eff("2026-12-31T00:00:00Z"), "2027-04-01T00:00:00.000Z"); // last 30 Mar
        assert_eq!(eff("2026-03-02T00:00:00Z"), "2026-06-01T00:00:00.000Z"); // last 30 May
        assert_eq!(eff("2026-03-03T00:00:00Z"), "2026-06-01T00:00:00.000Z"); // last 31 May
        assert_eq!(eff("2026-03-03T23:59:59Z"), "2026-06-01T00:00:00.000Z"); // time of day is irrelevant
        assert_eq!(eff("2026-03-04T00:00:00Z"), "2026-07-01T00:00:00.000Z"); // last 1 Jun
                                                                             // Leap years: 29 Feb 2028 + 89 = 28 May → 1 Jun; a period crossing February differs by a
                                                                             // month: 2 Dec 2027 + 89 = 29 Feb 2028 → 1 Mar, but 2 Dec 2026 + 89 = 1 Mar 2027 → 1 Apr.
        assert_eq!(eff("2028-02-29T12:00:00Z"), "2028-06-01T00:00:00.000Z");
        assert_eq!(eff("2027-12-02T00:00:00Z"), "2028-03-01T00:00:00.000Z");
        assert_eq!(eff("2026-12-02T00:00:00Z"), "2027-04-01T00:00:00.000Z");
        assert_eq!(eff("2028-03-03T00:00:00Z"), "2028-06-01T00:00:00.000Z"); // leap year, same as 2026
                                                                             // Other periods follow the same reading; zero days applies from the notice day.
        assert_eq!(existing_subscriber_effective(t("2026-03-03T10:00:00Z"), 1).to_string(), "2026-04-01T00:00:00.000Z");
        assert_eq!(existing_subscriber_effective(t("2026-03-03T10:00:00Z"), 0).to_string(), "2026-03-03T00:00:00.000Z");
        assert_eq!(t("2026-01-31T00:00:00Z").plus_months(1).to_string(), "2026-02-28T00:00:00.000Z");
    }

    /// Effective date for existing subscribers of a change notified at `notice` (90-day period).
    fn effective_90(notice: &str) -> String {
        existing_subscriber_effective(Timestamp::parse_rfc3339(notice).unwrap(), 90).to_string()
    }

    #[test]
    fn notice_2_march_ends_the_period_30_may_so_the_change_applies_1_june() {
        assert_eq!(effective_90("2026-03-02T00:00:00Z"), "2026-06-01T00:00:00.000Z");
    }

    #[test]
    fn notice_3_march_ends_the_period_31_may_so_the_change_applies_1_june_not_1_july() {
        // The corrected reading (domain-rules §3.10): day 1 is 3 Mar, day 90 is 31 May.
        assert_eq!(effective_90("2026-03-03T00:00:00Z"), "2026-06-01T00:00:00.000Z");
        // The notice's time of day does not move it: the last instant of 3 Mar is still 1 Jun.
        assert_eq!(effective_90("2026-03-03T23:59:59.999Z"), "2026-06-01T00:00:00.000Z");
    }

    #[test]
    fn notice_4_march_ends_the_period_1_june_so_the_change_applies_1_july() {
        assert_eq!(effective_90("2026-03-04T00:00:00Z"), "2026-07-01T00:00:00.000Z");
    }

    #[test]
    fn notice_16_march_ends_the_period_13_june_so_the_change_applies_1_july_aws_example() {
        assert_eq!(effective_90("2026-03-16T09:00:00Z"), "2026-07-01T00:00:00.000Z");
    }

    #[test]
    fn notice_31_december_ends_the_period_30_march_so_the_change_applies_1_april() {
        // 31 Dec 2026 + 89 days = 30 Mar 2027 → 1 Apr 2027. Before a leap February:
        // 31 Dec 2027 + 89 days = 29 Mar 2028 → 1 Apr 2028 as well.
        assert_eq!(effective_90("2026-12-31T00:00:00Z"), "2027-04-01T00:00:00.000Z");
        assert_eq!(effective_90("2027-12-31T00:00:00Z"), "2028-04-01T00:00:00.000Z");
    }

    #[test]
    fn leap_year_notices_count_29_february_as_a_day_of_the_period() {
        // 29 Feb 2028 + 89 = 28 May → 1 Jun 2028.
        assert_eq!(effective_90("2028-02-29T12:00:00Z"), "2028-06-01T00:00:00.000Z");
        // A period that contains 29 Feb ends a day earlier than in a common year:
        // 2 Dec 2027 + 89 = 29 Feb 2028 → 1 Mar 2028; 2 Dec 2026 + 89 = 1 Mar 2027 → 1 Apr 2027.
        assert_eq!(effective_90("2027-12-02T00:00:00Z"), "2028-03-01T00:00:00.000Z");
        assert_eq!(effective_90("2026-12-02T00:00:00Z"), "2027-04-01T00:00:00.000Z");
        // 3 Dec 2027 + 89 = 1 Mar 2028 → 1 Apr 2028 (the first notice day that misses March).
        assert_eq!(effective_90("2027-12-03T00:00:00Z"), "2028-04-01T00:00:00.000Z");
        // March notices in a leap year fall after February: 3 Mar 2028 → 31 May → 1 Jun,
        // 4 Mar 2028 → 1 Jun → 1 Jul, as in 2026.
        assert_eq!(effective_90("2028-03-03T00:00:00Z"), "2028-06-01T00:00:00.000Z");
        assert_eq!(effective_90("2028-03-04T00:00:00Z"), "2028-07-01T00:00:00.000Z");
    }

    #[test]
    fn every_notice_day_of_four_years_takes_effect_on_the_first_of_the_month_after_its_90th_day() {
        // The property behind the examples, for every day 2026–2029 (one leap year): the
        // effective instant is a 1st at 00:00, after the period's last day (notice + 89 days),
        // and no later than the 1st of the month after that day.
        let start = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        for day in 0..(4 * 365 + 1) {
            let notice = start.plus_millis(day * DAY_MS + 13 * HOUR_MS);
            let eff = existing_subscriber_effective(notice, 90);
            let last_day = Timestamp(notice.day() * DAY_MS).plus_millis(89 * DAY_MS);
            assert_eq!(eff, eff.month().start(), "{notice}: not the 1st of a month");
            assert!(eff > last_day, "{notice}: effective {eff} inside the period ending {last_day}");
            assert_eq!(eff, last_day.month().end(), "{notice}: not the month after the 90th day");
        }
    }

    #[test]
    fn hour_floors_and_boundary_splits_two_hours() {
        let a = Timestamp::parse_rfc3339("2026-10-01T10:59:59.999Z").unwrap();
        let b = Timestamp::parse_rfc3339("2026-10-01T11:00:00.000Z").unwrap();
        assert_eq!(a.hour().0 + 1, b.hour().0);
        assert_eq!(a.hour().to_string(), "2026-10-01T10:00Z");
    }

    #[test]
    fn month_of_last_hour_is_the_old_month() {
        let t = Timestamp::parse_rfc3339("2026-10-31T23:30:00Z").unwrap();
        assert_eq!(t.hour().month(), Month::parse("2026-10").unwrap());
        assert_eq!(Month::parse("2026-10").unwrap().hours(), 744);
        assert_eq!(Month::parse("2028-02").unwrap().hours(), 696);
        assert_eq!(Month::parse("2026-12").unwrap().next().to_string(), "2027-01");
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration_ms("6h").unwrap(), 6 * HOUR_MS);
        assert_eq!(parse_duration_ms("5m").unwrap(), 300_000);
        assert!(parse_duration_ms("6 hours").is_err());
        assert!(parse_duration_ms("h").is_err());
    }
}

/// serde for timestamps in human-written files: RFC 3339 text (`"2026-10-01T00:00:00Z"`), or
/// milliseconds since the epoch as an integer.
pub mod rfc3339 {
    use super::Timestamp;
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    /// Writes RFC 3339 text.
    pub fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_string())
    }

    /// Reads RFC 3339 text or epoch milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp such as \"2026-10-01T00:00:00Z\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Timestamp, E> {
                Ok(Timestamp(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Timestamp, E> {
                i64::try_from(v).map(Timestamp).map_err(|_| E::custom("timestamp out of range"))
            }
        }
        d.deserialize_any(V)
    }
}

/// [`rfc3339`] for `Option<Timestamp>`.
pub mod rfc3339_opt {
    use super::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes RFC 3339 text or nothing.
    pub fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&t.to_string()),
            None => s.serialize_none(),
        }
    }

    /// Reads an optional RFC 3339 timestamp.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::rfc3339")] Timestamp);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}
