//! SHELL (distributed mode). The operator API's [`CatalogueRecorder`] in `ingest`: a change is
//! published to the catalogue topic and is in force once this instance's follower has read it
//! back and the chain rule took it (`common::catalogue_topic`), which every other stage's
//! follower decides the same way.

use crate::operator::{CatalogueRecorder, RecordError};
use common::catalogue::change::AuditEntry;
use common::catalogue::PriceBook;
use common::catalogue_topic::{publish, CatalogueFollower};
use rdkafka::producer::FutureProducer;
use std::sync::Arc;
use std::time::Duration;

/// How long a change may take to be acknowledged by the broker, and then to be read back.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes changes to the catalogue topic; `follower` reads them back.
#[derive(Clone)]
pub struct KafkaRecorder {
    /// An idempotent producer (`common::kafka::producer_config`).
    pub producer: FutureProducer,
    /// The catalogue topic.
    pub topic: String,
    /// This instance's follower of it.
    pub follower: CatalogueFollower,
}

impl std::fmt::Debug for KafkaRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaRecorder").field("topic", &self.topic).field("follower", &self.follower).finish()
    }
}

impl CatalogueRecorder for KafkaRecorder {
    async fn record(&self, entry: AuditEntry, book: Arc<PriceBook>) -> Result<i64, RecordError> {
        let offset = publish(&self.producer, &self.topic, &entry, &book, PUBLISH_TIMEOUT)
            .await
            .map_err(|e| RecordError::Unavailable(e.to_string()))?;
        let follower = self.follower.clone();
        let read = tokio::task::spawn_blocking(move || follower.wait_for_offset(offset, READ_BACK_TIMEOUT))
            .await
            .map_err(|e| RecordError::Unavailable(e.to_string()))?;
        match read {
            Some(Some(seq)) => Ok(seq),
            Some(None) => Err(RecordError::Conflict(format!(
                "another server changed version `{}` first; nothing of this change is in force: read the catalogue again and retry",
                entry.previous
            ))),
            // Published but not read back: it goes in force (or is refused) when the follower
            // reads it; the audit log then says which. Not a success to report.
            None => Err(RecordError::Unconfirmed(format!(
                "published at {}:0@{offset} but not read back within {READ_BACK_TIMEOUT:?}; check GET /v1/catalogue/audit before retrying",
                self.topic
            ))),
        }
    }

    async fn entries(&self, after: i64, limit: usize) -> Result<Vec<AuditEntry>, String> {
        Ok(self.follower.entries(after, limit))
    }
}
