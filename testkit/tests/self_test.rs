//! Self-tests of testkit against the real servers it starts: Apache Kafka (produce with an
//! idempotent `acks=all` producer, consume with groups, kill -9 and restart, committed offsets
//! inside a batch, transactions and fencing, a three-node cluster losing a node)
//! and ClickHouse 18.16 (Decimal(38, 9) round trip through the `clickhouse` crate, restart,
//! `ReplacingMergeTree ... FINAL`). They also document what the stage tests may rely on.
//!
//! Run with `cargo test -p meterline-testkit -- --test-threads=1` (each test starts its own
//! server; on 2 cores one at a time is fastest).

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use rdkafka::{
    consumer::{CommitMode, Consumer, StreamConsumer},
    producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer},
    Message, Offset, TopicPartitionList,
};
use testkit::{Broker, ClickHouse};

/// An idempotent, `acks=all` producer for `broker` that waits `linger_ms` to fill a batch.
fn producer(broker: &Broker, linger_ms: u32) -> Result<FutureProducer> {
    broker
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms.to_string())
        .set("message.timeout.ms", "30000")
        .create()
        .context("creating producer")
}

/// A group consumer starting at the earliest offset, auto-commit off.
fn consumer(broker: &Broker, group: &str, topic: &str) -> Result<StreamConsumer> {
    let c: StreamConsumer = broker
        .client_config()
        .set("group.id", group)
        .set("session.timeout.ms", "6000")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .context("creating consumer")?;
    c.subscribe(&[topic]).context("subscribing")?;
    Ok(c)
}

/// Produces `n` keyed messages (`key-{i}` / `value-{i}`) concurrently (so librdkafka batches
/// them) and waits for every delivery.
async fn produce(broker: &Broker, topic: &str, n: usize) -> Result<()> {
    produce_lingering(broker, topic, n, 5).await
}

/// [`produce`] with a chosen `linger.ms`; a long linger puts all `n` into one batch.
async fn produce_lingering(broker: &Broker, topic: &str, n: usize, linger_ms: u32) -> Result<()> {
    let p = producer(broker, linger_ms)?;
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("key-{i}");
        let value = format!("value-{i}");
        let fut = p
            .send_result(FutureRecord::to(topic).key(&key).payload(&value))
            .map_err(|(e, _)| e)
            .with_context(|| format!("enqueueing message {i}"))?;
        pending.push(fut);
    }
    for (i, fut) in pending.into_iter().enumerate() {
        fut.await
            .context("delivery future cancelled")?
            .map_err(|(e, _)| e)
            .with_context(|| format!("delivering message {i}"))?;
    }
    Ok(())
}

/// One consumed message: (partition, offset, key).
type Got = (i32, i64, String);

/// Receives exactly `n` messages or fails after `timeout`.
async fn consume(c: &StreamConsumer, n: usize, timeout: Duration) -> Result<Vec<Got>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("received only {} of {n} messages within {timeout:?}", got.len());
        }
        match tokio::time::timeout(left, c.recv()).await {
            Err(_) => continue,
            // A node that is down (the cluster test kills one) is reported, not fatal: the
            // client goes on with the others.
            Ok(Err(e)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure) => {
                eprintln!("consumer: {e} (a node is down; continuing)");
            }
            Ok(Err(e)) => bail!("consumer error after {} messages: {e}", got.len()),
            Ok(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                got.push((m.partition(), m.offset(), key));
            }
        }
    }
    Ok(got)
}

fn distinct_keys(got: &[Got]) -> HashSet<&str> {
    got.iter().map(|(_, _, k)| k.as_str()).collect()
}

#[tokio::test]
async fn broker_produces_and_consumes_with_an_idempotent_producer() -> Result<()> {
    let started = Instant::now();
    let broker = Broker::start().await?;
    let topic = broker.topic("idempotent");
    broker.create_topic(&topic, 2).await?;
    produce(&broker, &topic, 1000).await?;

    let c = consumer(&broker, &broker.group("idempotent"), &topic)?;
    let got = consume(&c, 1000, Duration::from_secs(40)).await?;
    assert_eq!(got.len(), 1000);
    assert_eq!(distinct_keys(&got).len(), 1000, "every key exactly once");
    let partitions: HashSet<i32> = got.iter().map(|(p, _, _)| *p).collect();
    assert_eq!(partitions, HashSet::from([0, 1]), "keys spread over both partitions");
    eprintln!("idempotent produce/consume of 1000: {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn broker_keeps_messages_across_a_kill_and_restart() -> Result<()> {
    let started = Instant::now();
    let mut broker = Broker::start().await?;
    let topic = broker.topic("restart");
    broker.create_topic(&topic, 1).await?;
    produce(&broker, &topic, 100).await?;

    broker.kill();
    assert!(broker.pid().is_none());
    broker.restart().await?;

    let c = consumer(&broker, &broker.group("restart"), &topic)?;
    let got = consume(&c, 100, Duration::from_secs(40)).await?;
    assert_eq!(distinct_keys(&got).len(), 100);
    let offsets: Vec<i64> = got.iter().map(|(_, o, _)| *o).collect();
    assert_eq!(offsets, (0..100).collect::<Vec<i64>>());
    eprintln!("kill -9 and restart: {:?}", started.elapsed());
    Ok(())
}

/// Consumes the first 50 of 100 messages, commits "next = 50" and returns.
async fn consume_50_and_commit(broker: &Broker, group: &str, topic: &str) -> Result<()> {
    let c = consumer(broker, group, topic)?;
    let first = consume(&c, 50, Duration::from_secs(30)).await.context("first consumer")?;
    let offsets: Vec<i64> = first.iter().map(|(_, o, _)| *o).collect();
    assert_eq!(offsets, (0..50).collect::<Vec<i64>>());
    // Commit "next to read" = last processed + 1, per partition.
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, o, _) in &first {
        let e = next.entry(*p).or_default();
        *e = (*e).max(o + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &next {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    c.commit(&tpl, CommitMode::Sync).context("committing offsets")?;
    let committed = c.committed(Duration::from_secs(10))?;
    let at = committed.find_partition(topic, 0).context("partition 0 in committed offsets")?.offset();
    assert_eq!(at, Offset::Offset(50));
    Ok(())
}

/// A long linger puts all 100 messages in one record batch, so the committed offset 50 is inside
/// it: a consumer of the same group resumes exactly there (the gap Tansu's memory engine had).
#[tokio::test]
async fn committed_offsets_resume_inside_a_record_batch() -> Result<()> {
    let started = Instant::now();
    let broker = Broker::start().await?;
    let topic = broker.topic("commit");
    let group = broker.group("commit");
    broker.create_topic(&topic, 1).await?;
    produce_lingering(&broker, &topic, 100, 200).await?;

    consume_50_and_commit(&broker, &group, &topic).await?;

    let c = consumer(&broker, &group, &topic)?;
    let rest = consume(&c, 50, Duration::from_secs(30)).await.context("second consumer, same group")?;
    let offsets: Vec<i64> = rest.iter().map(|(_, o, _)| *o).collect();
    assert_eq!(offsets, (50..100).collect::<Vec<i64>>(), "continues at 50");
    // Nothing beyond the 100 produced.
    let extra = tokio::time::timeout(Duration::from_secs(2), c.recv()).await;
    assert!(extra.is_err(), "no message after offset 99");
    eprintln!("committed offsets: {:?}", started.elapsed());
    Ok(())
}

fn transactional_producer(broker: &Broker, id: &str) -> Result<BaseProducer> {
    let p: BaseProducer = broker
        .client_config()
        .set("transactional.id", id)
        .set("transaction.timeout.ms", "10000")
        .create()
        .context("creating a transactional producer")?;
    p.init_transactions(Duration::from_secs(30)).context("init_transactions")?;
    Ok(p)
}

fn send_in_txn(p: &BaseProducer, topic: &str, keys: std::ops::Range<usize>) -> Result<()> {
    for i in keys {
        let key = format!("key-{i}");
        p.send(BaseRecord::to(topic).key(&key).payload("v")).map_err(|(e, _)| e).context("enqueueing")?;
    }
    p.flush(Duration::from_secs(30)).context("flushing")?;
    Ok(())
}

/// What the rater relies on: an aborted transaction is invisible to `read_committed`, a committed
/// one visible, and `send_offsets_to_transaction` commits the group's offsets with the output.
#[tokio::test]
async fn transactions_hide_aborted_records_and_commit_offsets_atomically() -> Result<()> {
    let started = Instant::now();
    let broker = Broker::start().await?;
    let input = broker.topic("txn-in");
    let output = broker.topic("txn-out");
    let group = broker.group("txn");
    broker.create_topic(&input, 1).await?;
    broker.create_topic(&output, 1).await?;
    produce(&broker, &input, 10).await?;

    let c = consumer(&broker, &group, &input)?;
    consume(&c, 10, Duration::from_secs(30)).await?;
    let p = transactional_producer(&broker, &broker.transactional_id("txn"))?;

    p.begin_transaction()?;
    send_in_txn(&p, &output, 0..5)?;
    p.abort_transaction(Duration::from_secs(30))?;

    p.begin_transaction()?;
    send_in_txn(&p, &output, 5..10)?;
    let mut offsets = TopicPartitionList::new();
    offsets.add_partition_offset(&input, 0, Offset::Offset(10))?;
    let meta = c.group_metadata().context("group metadata")?;
    p.send_offsets_to_transaction(&offsets, &meta, Duration::from_secs(30))?;
    p.commit_transaction(Duration::from_secs(30))?;

    let reader = consumer(&broker, &broker.group("txn-reader"), &output)?;
    let got = consume(&reader, 5, Duration::from_secs(30)).await?;
    let keys: Vec<&str> = got.iter().map(|(_, _, k)| k.as_str()).collect();
    assert_eq!(keys, ["key-5", "key-6", "key-7", "key-8", "key-9"], "only the committed transaction's records");
    let extra = tokio::time::timeout(Duration::from_secs(2), reader.recv()).await;
    assert!(extra.is_err(), "nothing of the aborted transaction");
    let committed = c.committed(Duration::from_secs(10))?;
    assert_eq!(committed.find_partition(&input, 0).context("input partition")?.offset(), Offset::Offset(10));
    eprintln!("transactions: {:?}", started.elapsed());
    Ok(())
}

/// A second producer with the same transactional id fences the first: its next transactional
/// call fails as fatal, and what it had sent is aborted.
#[tokio::test]
async fn a_new_producer_with_the_same_transactional_id_fences_the_old_one() -> Result<()> {
    let broker = Broker::start().await?;
    let topic = broker.topic("fence");
    broker.create_topic(&topic, 1).await?;
    let id = broker.transactional_id("fence");
    let zombie = transactional_producer(&broker, &id)?;
    zombie.begin_transaction()?;
    send_in_txn(&zombie, &topic, 0..3)?;

    let successor = transactional_producer(&broker, &id)?;
    successor.begin_transaction()?;
    send_in_txn(&successor, &topic, 3..4)?;
    successor.commit_transaction(Duration::from_secs(30))?;

    let err = zombie.commit_transaction(Duration::from_secs(30)).expect_err("the zombie must be fenced");
    eprintln!("zombie commit: {err}");
    let reader = consumer(&broker, &broker.group("fence-reader"), &topic)?;
    let got = consume(&reader, 1, Duration::from_secs(30)).await?;
    assert_eq!(got[0].2, "key-3");
    assert!(tokio::time::timeout(Duration::from_secs(2), reader.recv()).await.is_err(), "nothing of the zombie");
    Ok(())
}

/// Three nodes at replication factor 3 and `min.insync.replicas=2`: with one node killed,
/// `acks=all` produce and consume go on; the node rejoins on its data.
#[tokio::test]
async fn a_three_node_cluster_serves_through_the_loss_of_one_node() -> Result<()> {
    let started = Instant::now();
    let mut broker = Broker::start_cluster().await?;
    assert_eq!(broker.nodes(), 3);
    let topic = broker.topic("cluster");
    broker.create_topic(&topic, 2).await?;
    produce(&broker, &topic, 200).await?;
    broker.kill_node(1);
    assert!(broker.node_pid(1).is_none());
    produce(&broker, &topic, 200).await.context("producing with one node down")?;
    let c = consumer(&broker, &broker.group("cluster"), &topic)?;
    let got = consume(&c, 400, Duration::from_secs(60)).await?;
    assert_eq!(got.len(), 400);
    broker.restart_node(1).await?;
    eprintln!("three-node cluster with a node lost and back: {:?}", started.elapsed());
    Ok(())
}

/// A row with a `Decimal(38, 9)` amount carried as its `i128` mantissa.
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize)]
struct R {
    id: u64,
    amount: i128,
}

/// Formats a scale-9 mantissa as ClickHouse prints `Decimal(38, 9)` (all 9 digits).
fn decimal_9(m: i128) -> String {
    let sign = if m < 0 { "-" } else { "" };
    let a = m.unsigned_abs();
    format!("{sign}{}.{:09}", a / 1_000_000_000, a % 1_000_000_000)
}

/// ClickHouse 24.x may drop trailing zeros of a decimal's text; 18.16 prints all of them.
fn trim_decimal(s: &str) -> &str {
    let s = s.trim();
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

async fn insert_rows(client: &clickhouse::Client, table: &str, rows: &[R]) -> Result<()> {
    let mut insert = client.insert::<R>(table).await?;
    for r in rows {
        insert.write(r).await?;
    }
    insert.end().await?;
    Ok(())
}

#[tokio::test]
async fn clickhouse_starts_and_round_trips_a_decimal_38_9() -> Result<()> {
    let started = Instant::now();
    let ch = ClickHouse::start().await?;
    assert_eq!(ch.query_text("SELECT 1").await?, "1\n");
    let (db, client) = ch.database("decimal").await?;
    client.query("CREATE TABLE t (id UInt64, amount Decimal(38, 9)) ENGINE = MergeTree ORDER BY id").execute().await?;

    // Mantissas beyond i64 (~1.2e20, i.e. 123 billion units) and some negatives (credits).
    let rows: Vec<R> = (1..=1000u64)
        .map(|i| {
            let base = i128::from(i) * 123_456_789_012_345_678_901;
            R { id: i, amount: if i % 10 == 0 { -base } else { base + i128::from(i % 7) } }
        })
        .collect();
    insert_rows(&client, "t", &rows).await?;

    let expected: i128 = rows.iter().map(|r| r.amount).sum();
    let text: String = client.query("SELECT toString(sum(amount)) AS text FROM t").fetch_one().await?;
    assert_eq!(trim_decimal(&text), trim_decimal(&decimal_9(expected)));
    // Also the exact 18.16 text, via the plain-text helper.
    let tsv = ch.query_text(&format!("SELECT sum(amount) FROM {db}.t")).await?;
    assert_eq!(trim_decimal(&tsv), trim_decimal(&decimal_9(expected)));

    // And back as mantissas through RowBinary.
    let back: Vec<R> = client.query("SELECT ?fields FROM t ORDER BY id").fetch_all().await?;
    assert_eq!(back, rows);
    eprintln!("decimal round trip ({text}): {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn clickhouse_restart_keeps_data() -> Result<()> {
    let started = Instant::now();
    let mut ch = ClickHouse::start().await?;
    let (db, client) = ch.database("restart").await?;
    client.query("CREATE TABLE t (id UInt64, amount Decimal(38, 9)) ENGINE = MergeTree ORDER BY id").execute().await?;
    let rows: Vec<R> = (0..100u64).map(|i| R { id: i, amount: i128::from(i) * 1_000_000_001 }).collect();
    insert_rows(&client, "t", &rows).await?;

    ch.kill();
    assert!(ch.pid().is_none());
    assert!(ch.query_text("SELECT 1").await.is_err(), "server is down");
    ch.restart().await?;

    let count = ch.query_text(&format!("SELECT count() FROM {db}.t")).await?;
    assert_eq!(count, "100\n");
    let back: Vec<R> = client.query("SELECT ?fields FROM t ORDER BY id").fetch_all().await?;
    assert_eq!(back, rows);
    eprintln!("clickhouse restart: {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn replacing_merge_tree_with_final_works_on_18_16() -> Result<()> {
    let started = Instant::now();
    let ch = ClickHouse::start().await?;
    let (db, _client) = ch.database("replacing").await?;
    ch.query_text(&format!(
        "CREATE TABLE {db}.charges (key String, version UInt64, amount Decimal(38, 9)) \
         ENGINE = ReplacingMergeTree(version) ORDER BY key"
    ))
    .await?;
    // Two separate inserts = two parts, so only FINAL (or a merge) collapses them.
    ch.query_text(&format!("INSERT INTO {db}.charges VALUES ('a', 1, 1.5), ('b', 1, 7)")).await?;
    ch.query_text(&format!("INSERT INTO {db}.charges VALUES ('a', 2, 2.25)")).await?;

    let raw = ch.query_text(&format!("SELECT count() FROM {db}.charges")).await?;
    assert_eq!(raw, "3\n", "both versions stored until merged");
    let fin =
        ch.query_text(&format!("SELECT key, version, toString(amount) FROM {db}.charges FINAL ORDER BY key")).await?;
    let lines: Vec<Vec<&str>> = fin.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{fin}");
    assert_eq!(lines[0][..2], ["a", "2"]);
    assert_eq!(trim_decimal(lines[0][2]), "2.25");
    assert_eq!(lines[1][..2], ["b", "1"]);
    assert_eq!(trim_decimal(lines[1][2]), "7");
    eprintln!("replacing merge tree: {:?}", started.elapsed());
    Ok(())
}
