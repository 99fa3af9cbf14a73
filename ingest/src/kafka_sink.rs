//! SHELL (distributed mode). Makes validated records durable in the raw topic and answers
//! each with the rater's decision, as the embedded default does.
//!
//! Each call's records are produced with an idempotent, `acks=all` producer, keyed by
//! (product, customer), each with a [`REPLY_HEADER`] naming this instance's partition of the
//! decisions topic, the call and the record's place in it. The rater that owns the record's raw
//! partition decides it (dedup + rating) and, in the same Kafka transaction as its rated output,
//! sends the decision back ([`DecisionBatch`]); this instance reads its decisions partition
//! `read_committed`, so a decision it sees is durable. A call is answered when every record's
//! decision is in: `Success` (new or an identical resend, with the record id), or the rater's
//! refusal (`DuplicateRecord` for a conflicting resend, `NotPriced`, a closed month) in the same
//! call, exactly as `meterline serve` answers. Records refused by validation go to the rejected
//! topic in the same call.
//!
//! When a decision does not come within `ingest.decision_timeout_ms` (no rater owns the
//! partition yet, a failover), the call gets 503 with `Retry-After`. Its records are durable and
//! are decided later; the seller's retry is an identical resend and answers `Success` with the
//! same ids (or the refusal that applies).
//!
//! Back-pressure: at most `max_in_flight` records wait; beyond that, and when librdkafka's
//! queue is full, callers get 429; when delivery fails or times out (broker down), 503. Nothing
//! is buffered without bound: a waiting call is one map entry, removed when it is answered or
//! abandoned.

use crate::sink::{InFlight, RefusedRecord, SinkError, SinkOutcome, UsageSink};
use common::codec;
use common::config::KafkaConfig;
use common::id::RecordId;
use common::reject::{RejectCode, Rejection};
use common::topic::{partition_key, Decided, DecisionBatch, RejectedEvent, ReplyTo, REPLY_HEADER};
use common::usage::UsageRecord;
use futures::future::join_all;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// The raw-topic sink.
#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer,
    raw_topic: String,
    rejected_topic: String,
    in_flight: InFlight,
    delivery_timeout: Duration,
    metrics: Option<std::sync::Arc<common::metrics::Metrics>>,
    decisions: Arc<Decisions>,
    /// The catalogue this instance validates against: its seq is stamped on every raw record.
    catalogue: Option<common::catalogue_topic::CatalogueFollower>,
}

/// Calls waiting for their records' decisions.
#[derive(Debug)]
struct Decisions {
    topic: String,
    /// The decisions partition this instance reads; -1 until [`KafkaSink::listen_for_decisions`].
    partition: AtomicI32,
    next_request: AtomicU64,
    timeout: Duration,
    waiting: Mutex<HashMap<u64, Waiting>>,
}

#[derive(Debug)]
struct Waiting {
    /// The records' own ids, for an answer that has none (an undecodable record).
    ids: Vec<RecordId>,
    slots: Vec<Option<SinkOutcome>>,
    missing: usize,
    done: Option<oneshot::Sender<Vec<SinkOutcome>>>,
}

impl Decisions {
    /// Registers a call of `ids.len()` records; the entry leaves with the returned guard.
    fn wait_for(self: &Arc<Self>, ids: Vec<RecordId>) -> (WaitGuard, oneshot::Receiver<Vec<SinkOutcome>>) {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let n = ids.len();
        let w = Waiting { ids, slots: vec![None; n], missing: n, done: Some(tx) };
        self.lock().insert(request, w);
        (WaitGuard { decisions: Arc::clone(self), request }, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting>> {
        // A panic while holding the map cannot leave it inconsistent (each entry is independent).
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fills in a batch of decisions; a call whose last record is decided is answered. Decisions
    /// for calls not waiting here (answered already, timed out, another instance's) are ignored.
    fn complete(&self, batch: DecisionBatch) {
        let mut waiting = self.lock();
        let Some(w) = waiting.get_mut(&batch.request) else { return };
        for (index, decided) in batch.decisions {
            let i = index as usize;
            let Some(slot) = w.slots.get_mut(i) else { continue };
            if slot.is_some() {
                continue;
            }
            *slot = Some(match decided {
                Decided::Rated { record_id } => SinkOutcome::Accepted { record_id },
                Decided::Identical { record_id } => SinkOutcome::AlreadyAccepted { record_id },
                Decided::Refused { record_id, rejection } => SinkOutcome::Refused { record_id, rejection },
                Decided::Undecodable { reason } => SinkOutcome::Refused {
                    record_id: w.ids[i],
                    rejection: Rejection::new(
                        RejectCode::InvalidRecord,
                        format!("the rater could not decode it: {reason}"),
                    ),
                },
            });
            w.missing -= 1;
        }
        if w.missing == 0 {
            if let Some(mut w) = waiting.remove(&batch.request) {
                let outcomes = w.slots.drain(..).flatten().collect();
                if let Some(done) = w.done.take() {
                    // A caller that went away is answered by nobody; its records are decided.
                    drop(done.send(outcomes));
                }
            }
        }
    }
}

/// Removes a call's entry when the call ends, answered or not (an abandoned call frees its slot).
struct WaitGuard {
    decisions: Arc<Decisions>,
    request: u64,
}

impl WaitGuard {
    fn reply_to(&self, index: usize) -> ReplyTo {
        ReplyTo {
            partition: self.decisions.partition.load(Ordering::Relaxed),
            request: self.request,
            index: index as u32,
        }
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.decisions.lock().remove(&self.request);
    }
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("raw_topic", &self.raw_topic).field("in_flight", &self.in_flight).finish()
    }
}

impl KafkaSink {
    /// Builds the producer (no network until the first send). Calls are answered once
    /// [`KafkaSink::listen_for_decisions`] runs.
    pub fn new(
        k: &KafkaConfig,
        max_in_flight: usize,
        delivery_timeout: Duration,
        decision_timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let mut cfg = common::kafka::producer_config(k);
        cfg.set("message.timeout.ms", delivery_timeout.as_millis().to_string());
        // A random start: a restarted instance never takes a predecessor's late decisions for its own.
        let first_request = uuid::Uuid::new_v4().as_u64_pair().0;
        Ok(KafkaSink {
            producer: cfg.create()?,
            raw_topic: k.topics.raw.clone(),
            rejected_topic: k.topics.rejected.clone(),
            in_flight: InFlight::new(max_in_flight),
            delivery_timeout,
            metrics: None,
            decisions: Arc::new(Decisions {
                topic: k.topics.decisions.clone(),
                partition: AtomicI32::new(-1),
                next_request: AtomicU64::new(first_request),
                timeout: decision_timeout,
                waiting: Mutex::new(HashMap::new()),
            }),
            catalogue: None,
        })
    }

    /// Starts reading this instance's partition of the decisions topic from its current end (a
    /// decision for any call made from now on lands after it) and answering waiting calls. The
    /// partition follows from the instance's random request ids, so instances spread over the
    /// partitions; instances that share one each ignore the other's decisions. Call once, before
    /// serving.
    pub async fn listen_for_decisions(&self, k: &KafkaConfig) -> Result<tokio::task::JoinHandle<()>, KafkaError> {
        let d = Arc::clone(&self.decisions);
        let mut cfg = common::kafka::consumer_config(k, &format!("meterline-ingest-decisions-{}", d.topic));
        // One small partition, read as soon as a rater commits: fetch without waiting to fill.
        cfg.set("fetch.wait.max.ms", "10");
        let consumer: StreamConsumer = cfg.create()?;
        let timeout = Duration::from_secs(10);
        let find_end = || -> Result<(i32, i64), KafkaError> {
            let md = consumer.fetch_metadata(Some(&d.topic), timeout)?;
            let count = md.topics().first().map_or(0, |t| t.partitions().len());
            if count == 0 {
                return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition));
            }
            let partition = (d.next_request.load(Ordering::Relaxed) % count as u64) as i32;
            let (_, high) = consumer.fetch_watermarks(&d.topic, partition, timeout)?;
            Ok((partition, high))
        };
        // A topic created a moment ago has no leader yet (NotLeaderForPartition): transient, so
        // retried for a while; an error that outlasts it stops the start with its cause.
        let started = std::time::Instant::now();
        let (partition, high) = loop {
            match tokio::task::block_in_place(find_end) {
                Ok(end) => break end,
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    tracing::debug!(error = %e, "decisions topic not ready yet");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&d.topic, partition, Offset::Offset(high))?;
        consumer.assign(&tpl)?;
        d.partition.store(partition, Ordering::Relaxed);
        tracing::info!(topic = %d.topic, partition, from_offset = high, "reading decisions");
        Ok(tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(m) => match codec::decode::<DecisionBatch>(m.payload().unwrap_or_default()) {
                        Ok(batch) => d.complete(batch),
                        Err(e) => tracing::warn!(offset = m.offset(), error = %e, "undecodable decision ignored"),
                    },
                    // Transient (a broker restarting): librdkafka reconnects by itself.
                    Err(e) => {
                        tracing::warn!(error = %e, "reading decisions");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }))
    }

    /// Stamps every raw record with the catalogue seq in force when it is sent (at least the one
    /// it was validated under: versions only move forward), so the rater rates it under that
    /// catalogue or a later one.
    pub fn with_catalogue(mut self, follower: common::catalogue_topic::CatalogueFollower) -> Self {
        self.catalogue = Some(follower);
        self
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

    async fn send_all(
        &self,
        accepted: &[UsageRecord],
        refused: &[RefusedRecord],
        call: &WaitGuard,
    ) -> Result<(), SinkError> {
        let mut deliveries = Vec::with_capacity(accepted.len() + refused.len());
        let seq = self.catalogue.as_ref().map_or(0, |c| c.seq()).to_string();
        for (i, r) in accepted.iter().enumerate() {
            let key = partition_key(&r.product, &r.customer);
            let payload = codec::encode(r);
            let reply = call.reply_to(i).encode();
            let mut headers = OwnedHeaders::new().insert(Header { key: REPLY_HEADER, value: Some(&reply[..]) });
            if seq != "0" {
                let stamp = Header { key: common::catalogue_topic::SEQ_HEADER, value: Some(seq.as_bytes()) };
                headers = headers.insert(stamp);
            }
            deliveries.push(self.enqueue(&self.raw_topic, key, payload, Some(headers))?);
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
            deliveries.push(self.enqueue(
                &self.rejected_topic,
                r.seller.as_bytes().to_vec(),
                codec::encode(&ev),
                None,
            )?);
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
        headers: Option<OwnedHeaders>,
    ) -> Result<rdkafka::producer::DeliveryFuture, SinkError> {
        let mut record = FutureRecord::to(topic).key(&key).payload(&payload);
        if let Some(h) = headers {
            record = record.headers(h);
        }
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
        if self.decisions.partition.load(Ordering::Relaxed) < 0 {
            return Err(SinkError::Unavailable("not reading decisions yet".into()));
        }
        // Registered before anything is produced: a decision can come back before the ack.
        let (call, decided) = self.decisions.wait_for(accepted.iter().map(UsageRecord::record_id).collect());
        let timeout = self.delivery_timeout + Duration::from_secs(1);
        let result = match tokio::time::timeout(timeout, self.send_all(&accepted, &refused, &call)).await {
            Ok(r) => r,
            Err(_) => Err(SinkError::Unavailable(format!("no acknowledgement from the broker within {timeout:?}"))),
        };
        result?;
        if accepted.is_empty() {
            return Ok(Vec::new());
        }
        let wait = self.decisions.timeout;
        match tokio::time::timeout(wait, decided).await {
            Ok(Ok(outcomes)) => Ok(outcomes),
            _ => Err(SinkError::Undecided(format!(
                "the records are durable but no rater decided them within {wait:?}; resend the same call: \
                 an identical resend answers with the same record ids"
            ))),
        }
    }
}
