//! SHELL (distributed mode). How `aggregator close` tells the raters a month is closed, before it
//! reads the month's lines:
//!
//! 1. a row in ClickHouse `closed_months` (the analysts' record, one per close);
//! 2. the latest closed month — the greatest in `closed_months`, so closing an earlier month again
//!    never reopens a later one — as `YYYY-MM` text under the one key
//!    [`common::kafka::CLOSED_THROUGH_KEY`] of the compacted closed-months topic, which every
//!    rater follows (`rater::closed`);
//! 3. a settle wait ([`settle_time`]), so that a rater batch decided just before its rater saw the
//!    marker is committed and folded into `monthly_charges` before the close reads the lines. What
//!    the wait does not cover is in docs/ARCHITECTURE.md ("Closed months in distributed mode").

use clickhouse::Client;
use common::config::PipelineConfig;
use common::kafka::{CLOSED_MONTHS_POLL_MS, CLOSED_THROUGH_KEY};
use common::time::{Month, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

/// Margin in the default settle time for one rater transaction commit and one ClickHouse insert.
const COMMIT_MARGIN_MS: u64 = 1_000;

/// Why the close could not be recorded (the close stops before reading any line).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MarkError {
    /// Writing or reading `closed_months` in ClickHouse failed.
    #[error("clickhouse closed_months: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    /// The closed-months topic did not take the marker.
    #[error("publishing the closed month to {topic}: {reason}")]
    Publish {
        /// The closed-months topic.
        topic: String,
        /// Why.
        reason: String,
    },
}

/// How long the close waits after publishing before it reads lines, unless told otherwise: a
/// rater sees the marker within the follower's poll interval; a batch decided just before takes
/// up to the longer of its linger and its age bound (`max_batch_age_ms`: a lagging rater's
/// batch grows past the linger) plus a commit to be committed; the aggregator folds it within its flush
/// interval plus an insert.
pub fn settle_time(cfg: &PipelineConfig) -> Duration {
    let batch = cfg.rater.linger_ms.max(cfg.rater.max_batch_age_ms);
    Duration::from_millis(CLOSED_MONTHS_POLL_MS + batch + cfg.aggregator.flush_interval_ms + COMMIT_MARGIN_MS)
}

/// Records that `month` is closed (close version `now`): the `closed_months` row, then the
/// latest closed month on the closed-months topic, acknowledged by the broker. `client` is bound
/// to the Meterline database. Returns the month published (the latest closed, `month` or later).
pub async fn mark_closed(
    cfg: &PipelineConfig,
    client: &Client,
    month: Month,
    marketplace: &str,
    price_book_version: &str,
    now: Timestamp,
) -> Result<Month, MarkError> {
    client
        .query(
            "INSERT INTO closed_months (billing_month, close_version, closed_at, marketplace, price_book_version) \
             VALUES (toDate(?), ?, toDateTime(?), ?, ?)",
        )
        .bind(format!("{month}-01"))
        .bind(u64::try_from(now.millis()).unwrap_or_default())
        .bind(now.millis().div_euclid(1000))
        .bind(marketplace)
        .bind(price_book_version)
        .execute()
        .await?;
    let latest: String =
        client.query("SELECT toString(toStartOfMonth(max(billing_month))) FROM closed_months").fetch_one().await?;
    // `YYYY-MM-01`; the row just written makes it at least `month`.
    let latest = latest.get(..7).and_then(|m| Month::parse(m).ok()).map_or(month, |l| l.max(month));
    publish(cfg, latest).await?;
    Ok(latest)
}

/// Publishes `latest` as the closed-months topic's value and waits for the broker's ack.
async fn publish(cfg: &PipelineConfig, latest: Month) -> Result<(), MarkError> {
    let topic = cfg.kafka.topics.closed_months.clone();
    let failed = |reason: String| MarkError::Publish { topic: topic.clone(), reason };
    let producer: FutureProducer =
        common::kafka::producer_config(&cfg.kafka).create().map_err(|e| failed(e.to_string()))?;
    let payload = latest.to_string();
    let record = FutureRecord::to(&topic).partition(0).key(CLOSED_THROUGH_KEY).payload(payload.as_bytes());
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| failed(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_settle_time_covers_the_follower_poll_the_rater_batch_age_and_the_aggregator_flush() {
        let mut cfg = PipelineConfig::from_toml(include_str!("../../deploy/meterline.example.toml")).unwrap();
        cfg.rater.linger_ms = 100;
        cfg.aggregator.flush_interval_ms = 300;
        // 100 (follower poll) + 500 (a lagging batch's max age) + 300 (flush) + 1000 (commit and
        // insert margin).
        assert_eq!(settle_time(&cfg), Duration::from_millis(1_900));
        cfg.rater.max_batch_age_ms = 100;
        assert_eq!(settle_time(&cfg), Duration::from_millis(1_500), "the linger when no longer");
    }
}
