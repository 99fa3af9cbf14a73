//! SHELL (distributed mode). Makes validated records durable in the raw topic.
//!
//! Each call's records are produced with an idempotent, `acks=all` producer, keyed by
//! (product, customer); the call is answered only when every record's delivery report is back
//! (design guarantee 1). Records refused by validation go to the rejected topic in the same call.
//! Dedup and rating happen in the rater: an identical resend is produced again and collapses
//! there (same record id), and a conflicting one is refused there as `DuplicateRecord`.
//!
//! Back-pressure: at most `max_in_flight` records wait for delivery reports; beyond that, and
//! when librdkafka's queue is full, callers get 429; when delivery fails or times out (broker
//! down), 503. Nothing is buffered without bound.

use crate::sink::{InFlight, RefusedRecord, SinkError, SinkOutcome, UsageSink};
use common::codec;
use common::config::KafkaConfig;
use common::topic::{partition_key, RejectedEvent};
use common::usage::UsageRecord;
use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::time::Duration;

/// The raw-topic sink.
#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer,
    raw_topic: String,
    rejected_topic: String,
    in_flight: InFlight,
    delivery_timeout: Duration,
    metrics: Option<std::sync::Arc<common::metrics::Metrics>>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("raw_topic", &self.raw_topic).field("in_flight", &self.in_flight).finish()
    }
}

impl KafkaSink {
    /// Builds the producer (no network until the first send).
    pub fn new(k: &KafkaConfig, max_in_flight: usize, delivery_timeout: Duration) -> Result<Self, KafkaError> {
        let mut cfg = common::kafka::producer_config(k);
        cfg.set("message.timeout.ms", delivery_timeout.as_millis().to_string());
        Ok(KafkaSink {
            producer: cfg.create()?,
            raw_topic: k.topics.raw.clone(),
            rejected_topic: k.topics.rejected.clone(),
            in_flight: InFlight::new(max_in_flight),
            delivery_timeout,
            metrics: None,
        })
    }

    /// Counts delivery errors into `m` and reports the producer queue depth at each scrape.
    pub fn with_metrics(mut self, m: std::sync::Arc<common::metrics::Metrics>) -> Self {
        let producer = self.producer.clone();
        m.on_scrape(move |m| {
            m.producer_queue.with_label_values(&["ingest"]).set(i64::from(producer.in_flight_count()))
        });
        self.metrics = Some(m);
        self
    }

    /// Whether the broker answers for the raw topic with a leader for every partition: the probe
    /// behind `/ready` while deliveries fail (issue 12). Blocking: call it off the async threads.
    pub fn probe(&self, timeout: Duration) -> Result<(), String> {
        let md = self.producer.client().fetch_metadata(Some(&self.raw_topic), timeout).map_err(|e| e.to_string())?;
        let topic = md.topics().iter().find(|t| t.name() == self.raw_topic).ok_or("the raw topic is missing")?;
        if let Some(e) = topic.error() {
            return Err(format!("the raw topic: {e:?}"));
        }
        if topic.partitions().is_empty() || topic.partitions().iter().any(|p| p.leader() < 0) {
            return Err("a raw-topic partition has no leader".into());
        }
        Ok(())
    }

    /// Waits for outstanding deliveries (graceful shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "records still unacknowledged at shutdown: their callers got no Success and will resend");
        }
    }

    async fn send_all(&self, accepted: &[UsageRecord], refused: &[RefusedRecord]) -> Result<(), SinkError> {
        let mut deliveries = Vec::with_capacity(accepted.len() + refused.len());
        for r in accepted {
            let key = partition_key(&r.product, &r.customer);
            let payload = codec::encode(r);
            deliveries.push(self.enqueue(&self.raw_topic, key, payload)?);
        }
        for r in refused {
            let ev = RejectedEvent::new(
                r.received_at,
                &r.seller,
                &r.product,
                "",
                r.record_id,
                r.rejection.code,
                r.rejection.message.clone(),
                r.raw.clone(),
            );
            deliveries.push(self.enqueue(&self.rejected_topic, r.seller.as_bytes().to_vec(), codec::encode(&ev))?);
        }
        let n_raw = accepted.len();
        let mut first_failure = None;
        for (i, d) in join_all(deliveries).await.into_iter().enumerate() {
            let failed = match d {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => format!("broker did not acknowledge: {e}"),
                Err(_) => "delivery report lost".to_owned(),
            };
            if let Some(m) = &self.metrics {
                let topic = if i < n_raw { &self.raw_topic } else { &self.rejected_topic };
                m.delivery_errors.with_label_values(&["ingest", topic]).inc();
            }
            first_failure.get_or_insert(failed);
        }
        first_failure.map_or(Ok(()), |f| Err(SinkError::Unavailable(f)))
    }

    fn enqueue(
        &self,
        topic: &str,
        key: Vec<u8>,
        payload: Vec<u8>,
    ) -> Result<rdkafka::producer::DeliveryFuture, SinkError> {
        let record = FutureRecord::to(topic).key(&key).payload(&payload);
        match self.producer.send_result(record) {
            Ok(f) => Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SinkError::Overloaded { in_flight: self.in_flight.current(), retry_after_secs: 1 })
            }
            Err((e, _)) => Err(SinkError::Unavailable(format!("producing to {topic}: {e}"))),
        }
    }
}

impl UsageSink for KafkaSink {
    async fn submit(
        &self,
        accepted: Vec<UsageRecord>,
        refused: Vec<RefusedRecord>,
    ) -> Result<Vec<SinkOutcome>, SinkError> {
        let _admitted = self.in_flight.admit(accepted.len() + refused.len())?;
        let timeout = self.delivery_timeout + Duration::from_secs(1);
        let result = match tokio::time::timeout(timeout, self.send_all(&accepted, &refused)).await {
            Ok(r) => r,
            Err(_) => Err(SinkError::Unavailable(format!("no acknowledgement from the broker within {timeout:?}"))),
        };
        result?;
        Ok(accepted.iter().map(|r| SinkOutcome::Accepted { record_id: r.record_id() }).collect())
    }
}
