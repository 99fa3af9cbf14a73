//! Feature `kafka`: traffic straight to the raw topic, and a raw consume of that topic.
//!
//! - [`produce`]: validates the scenario's records as ingest would (invalid ones are counted and
//!   not produced; ingest would put them on the rejected topic) and produces each with the same
//!   key and encoding as ingest's sink, through the same idempotent `acks=all` producer settings.
//!   Ack latency per record (enqueue → delivery report) goes into an HdrHistogram.
//! - [`consume`]: reads the raw topic from the start with the same client library and consumer
//!   settings the rater uses, doing nothing with the payloads: the broker + client limit that the
//!   distributed pipeline is measured against (BENCHMARKS.md P3).

use crate::probe::Prober;
use crate::traffic::{Pacer, Stream};
use common::catalogue::PriceBook;
use common::config::KafkaConfig;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};

/// What a produce run saw.
#[derive(Debug)]
pub struct Produced {
    /// Records acknowledged by the broker.
    pub acked: u64,
    /// Records refused by validation (not produced).
    pub invalid: u64,
    /// Delivery failures.
    pub failed: u64,
    /// Distinct priced slots among the produced records: the rated line items the pipeline must
    /// end with (resends and conflicts collapse; unpriced records are refused).
    pub expected_rated: u64,
    /// Enqueue → delivery report, microseconds.
    pub ack_us: Histogram<u64>,
    /// Wall time of the run.
    pub seconds: f64,
}

/// Most records waiting for a delivery report at once.
const MAX_IN_FLIGHT: usize = 200_000;

/// Produces `stream` to the raw topic; `pacer` sets the rate; `prober` samples charge visibility;
/// `dump` receives every produced record as a JSONEachRow line (for P4's raw ClickHouse load):
/// its production order, slot and quantity.
pub async fn produce(
    k: &KafkaConfig,
    book: &PriceBook,
    stream: Stream<'_>,
    pacer: Pacer,
    prober: Option<&Prober>,
    mut dump: Option<&mut dyn std::io::Write>,
) -> anyhow::Result<Produced> {
    let producer: FutureProducer = common::kafka::producer_config(k).create()?;
    let mut slots = std::collections::HashSet::new();
    let mut out = Produced {
        acked: 0,
        invalid: 0,
        failed: 0,
        expected_rated: 0,
        ack_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        seconds: 0.0,
    };
    let mut in_flight = FuturesUnordered::new();
    let started = Instant::now();
    let mut sent = 0u64;
    for call in stream {
        pacer.wait(sent).await;
        let now = crate::traffic::system_now();
        let seller = book.doc().sellers.iter().find(|s| s.id == call.seller);
        let cx = ingest::validate::Context {
            book,
            caller: seller.map_or(ingest::validate::Caller::Trusted, ingest::validate::Caller::Seller),
            now: Some(now),
            received_at: now,
        };
        for r in &call.records {
            sent += 1;
            let text = r.to_string();
            let wire: ingest::wire::WireRecord<'_> = serde_json::from_str(&text)?;
            let product = (!call.product.is_empty()).then_some(call.product.as_str());
            let Ok(mut u) = ingest::validate::validate(&wire, product, &cx) else {
                out.invalid += 1;
                continue;
            };
            u.canonicalise();
            if book.price_at(&u.customer, &u.product, &u.dimension, u.hour()).is_some() {
                slots.insert(u.dedup_key());
            }
            let key = common::topic::partition_key(&u.product, &u.customer);
            let payload = common::codec::encode(&u);
            if let Some(w) = dump.as_mut() {
                let hour = u.hour().start().to_datetime().format("%Y-%m-%d %H:%M:%S").to_string();
                let row = serde_json::json!({ "seq": sent, "product": u.product, "customer": u.customer, "dimension": u.dimension, "hour": hour, "quantity": crate::prices::number(u.quantity)? });
                writeln!(w, "{row}")?;
            }
            let sent_at = Instant::now();
            if let Some(p) = prober {
                p.offer(&u.record_id().to_string(), sent_at);
            }
            loop {
                match producer.send_result(FutureRecord::to(&k.topics.raw).key(&key).payload(&payload)) {
                    Ok(f) => {
                        in_flight.push(async move { (sent_at, f.await) });
                        break;
                    }
                    // librdkafka's queue is full: wait for some reports, then retry.
                    Err(_) => {
                        if let Some(done) = in_flight.next().await {
                            tally(&mut out, done);
                        } else {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
            }
            while in_flight.len() >= MAX_IN_FLIGHT {
                if let Some(done) = in_flight.next().await {
                    tally(&mut out, done);
                }
            }
        }
    }
    while let Some(done) = in_flight.next().await {
        tally(&mut out, done);
    }
    out.seconds = started.elapsed().as_secs_f64();
    out.expected_rated = slots.len() as u64;
    Ok(out)
}

/// Counts one delivery report (its type is rdkafka's `Result<OwnedDeliveryResult, Canceled>`).
fn tally<T, E, C>(out: &mut Produced, (sent, d): (Instant, Result<Result<T, E>, C>)) {
    match d {
        Ok(Ok(_)) => {
            out.acked += 1;
            out.ack_us.saturating_record(sent.elapsed().as_micros().max(1) as u64);
        }
        _ => out.failed += 1,
    }
}

/// What a raw consume saw.
#[derive(Debug)]
pub struct Consumed {
    /// Messages read.
    pub messages: u64,
    /// Payload bytes read.
    pub bytes: u64,
    /// First message → last message.
    pub seconds: f64,
}

/// Reads `topic` from the start with a fresh group until `expected` messages, `idle` without
/// one, or `max` in total.
pub fn consume(k: &KafkaConfig, topic: &str, expected: u64, idle: Duration, max: Duration) -> anyhow::Result<Consumed> {
    let group = format!("loadtest-raw-consume-{}", std::process::id());
    let consumer: BaseConsumer = common::kafka::consumer_config(k, &group).create()?;
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let (mut messages, mut bytes) = (0u64, 0u64);
    while messages < expected && started.elapsed() < max {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                messages += 1;
                bytes += m.payload().map_or(0, |p| p.len() as u64);
            }
            Some(Err(e)) => anyhow::bail!("consuming {topic}: {e}"),
            None if first.is_some_and(|_| last.elapsed() > idle) => break,
            None => {}
        }
    }
    let seconds = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok(Consumed { messages, bytes, seconds })
}
