//! Errors say what the caller does next (issue 14 item 5), against real servers: Apache Kafka
//! and Debian's ClickHouse from `testkit`, and the real `aggregator` binary.
//!
//! - `sigterm_while_clickhouse_is_down_stops_the_aggregator_in_seconds_and_commits_nothing`:
//!   ClickHouse is killed, a rated record arrives, the flush retries with back-off; SIGTERM then
//!   ends the aggregator within seconds with status 143 (128 + SIGTERM), its Kafka offsets not
//!   past the unwritten record; once ClickHouse is back, a new aggregator writes that record
//!   (nothing was lost) and a SIGTERM with everything flushed exits 0.
//! - `a_monthly_charges_table_of_another_schema_stops_the_aggregator_naming_table_and_fix`: the
//!   table has other columns than this version writes; the first flush stops the aggregator with
//!   an error naming `monthly_charges` and the migrations, instead of retrying forever.
//! - `wrong_clickhouse_credentials_stop_the_aggregator_saying_check_the_password`.
//!
//! The binaries must be built first (`cargo build --workspace --all-features --bins`).

use crate::fixtures::price_book;
use ::common::catalogue::PriceBook;
use ::common::id::{DedupKey, RecordId};
use ::common::money::Currency;
use ::common::rated::{ChargeType, RatedRecord};
use ::common::time::Timestamp;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use testkit::{Broker, ClickHouse};

fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> → target/<profile>/<name>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the distributed binaries first (cargo build --workspace --all-features)",
        p.display()
    );
    p
}

/// A broker, a ClickHouse database and an aggregator configuration over them.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    broker: Broker,
    clickhouse: ClickHouse,
    db: String,
    rated: String,
    group: String,
}

impl Setup {
    async fn start(test: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start().await.unwrap();
        let clickhouse = ClickHouse::start().await.unwrap();
        let (db, _) = clickhouse.database(test).await.unwrap();
        let book = PriceBook::new(price_book(2)).unwrap();
        let book_path = dir.path().join("price-book.toml");
        std::fs::write(&book_path, book.to_toml().unwrap()).unwrap();
        let rated = broker.topic("rated");
        let group = broker.group("aggregator");
        let config = dir.path().join("meterline.toml");
        std::fs::write(
            &config,
            format!(
                r#"price_book = "{book}"
[kafka]
bootstrap = "{bootstrap}"
partitions = 1
replication = 1
[kafka.topics]
raw = "{raw}"
rated = "{rated}"
rejected = "{rejected}"
dead_letter = "{dead}"
decisions = "{decisions}"
[clickhouse]
url = "{ch}"
database = "{db}"
[aggregator]
group = "{group}"
flush_max_records = 5000
flush_interval_ms = 200
"#,
                book = book_path.display(),
                bootstrap = broker.bootstrap(),
                raw = broker.topic("raw"),
                rejected = broker.topic("rejected"),
                dead = broker.topic("dead"),
                decisions = broker.topic("decisions"),
                ch = clickhouse.url(),
            ),
        )
        .unwrap();
        Setup { dir, config, broker, clickhouse, db, rated, group }
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// `aggregator <args>` as process `name` (stderr to `name.log`).
    fn aggregator(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(name)).unwrap();
        Command::new(bin("aggregator"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "warn,aggregator=info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    async fn wait_for_log(&self, name: &str, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log(name).contains(needle) {
            assert!(Instant::now() < deadline, "no `{needle}` in {name}'s log within {timeout:?}:\n{}", self.log(name));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Puts one rated record on partition 0 of the rated topic; returns its offset.
    async fn produce_rated(&self, id: u128) -> i64 {
        let producer: FutureProducer = self.broker.client_config().create().unwrap();
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let r = RatedRecord {
            record_id: RecordId(id),
            dedup_key: DedupKey(id),
            seller: "s1".into(),
            product: "p".into(),
            customer: "c0000".into(),
            dimension: "d1".into(),
            hour: Timestamp(now_ms).hour(),
            quantity: d("10"),
            covered_quantity: Decimal::ZERO,
            billable_quantity: d("10"),
            unit_rate: d("0.5"),
            currency: Currency::USD,
            amount: d("5"),
            month_price: None,
            pricing_model: "per_unit".into(),
            booked_month: None,
            charge_type: ChargeType::Usage,
            agreement_id: "a0000".into(),
            offer_id: "o".into(),
            price_book_version: "crash-test".into(),
            allocations: vec![],
        };
        let payload = ::common::codec::encode(&r);
        let delivery = producer
            .send(FutureRecord::to(&self.rated).partition(0).key("p/c0000").payload(&payload), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        delivery.offset
    }

    /// The aggregator group's committed offset of rated partition 0, if any.
    fn committed(&self) -> Option<i64> {
        let consumer: BaseConsumer = self.broker.client_config().set("group.id", &self.group).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.rated, 0);
        // The group coordinator may still be moving in (a fresh broker): ask again.
        let mut tries = 0;
        let c = loop {
            match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
                Ok(c) => break c,
                Err(e) if tries < 10 => {
                    eprintln!("reading committed offsets: {e}; again");
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("reading the aggregator group's committed offsets: {e}"),
            }
        };
        c.elements().first().and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
    }

    async fn count(&self, table: &str) -> u64 {
        let text = self.clickhouse.query_text(&format!("SELECT count() FROM {}.{table}", self.db)).await.unwrap();
        text.trim().parse().unwrap()
    }
}

/// Waits up to `timeout` for `child` to exit; kills it and panics otherwise.
fn wait_exit(child: &mut Child, timeout: Duration, log: impl Fn() -> String) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("the aggregator did not exit within {timeout:?}:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_clickhouse_is_down_stops_the_aggregator_in_seconds_and_commits_nothing() {
    let mut s = Setup::start("errors_sigterm").await;
    let mut agg = s.aggregator("aggregator", &[], &[]);
    s.wait_for_log("aggregator", "aggregator assigned", Duration::from_secs(60)).await;

    s.clickhouse.kill();
    let offset = s.produce_rated(1).await;
    // The flush is in its back-off loop: a second failure means the first wait was served.
    s.wait_for_log("aggregator", "ClickHouse insert failed; retrying", Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.log("aggregator").matches("ClickHouse insert failed; retrying").count() < 3 {
        assert!(Instant::now() < deadline, "the flush did not retry:\n{}", s.log("aggregator"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let asked = Instant::now();
    sigterm(&agg);
    let status = wait_exit(&mut agg, Duration::from_secs(15), || s.log("aggregator"));
    let took = asked.elapsed();
    eprintln!("aggregator exited {status} {} ms after SIGTERM with ClickHouse down", took.as_millis());
    assert!(took < Duration::from_secs(3), "took {took:?} to stop:\n{}", s.log("aggregator"));
    assert_eq!(status.code(), Some(143), "128 + SIGTERM: stopped on a signal, last flush missing");
    assert!(s.log("aggregator").contains("without its last flush"), "{}", s.log("aggregator"));
    assert!(
        s.committed().is_none_or(|c| c <= offset),
        "committed {:?} past the unwritten record at {offset}",
        s.committed()
    );

    // Nothing was lost: with ClickHouse back, the next aggregator writes the record.
    s.clickhouse.restart().await.unwrap();
    assert_eq!(s.count("rated_usage").await, 0);
    let mut again = s.aggregator("aggregator2", &[], &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.count("monthly_charges").await == 0 {
        assert!(Instant::now() < deadline, "the replay was not written:\n{}", s.log("aggregator2"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(s.count("rated_usage").await, 1);
    sigterm(&again);
    let status = wait_exit(&mut again, Duration::from_secs(30), || s.log("aggregator2"));
    assert!(status.success(), "a stop with everything flushed exits 0, got {status}:\n{}", s.log("aggregator2"));
    assert!(s.committed().is_some_and(|c| c > offset), "offsets committed after the flush: {:?}", s.committed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monthly_charges_table_of_another_schema_stops_the_aggregator_naming_table_and_fix() {
    let s = Setup::start("errors_schema").await;
    let mut migrate = s.aggregator("migrate", &["migrate"], &[]);
    let status = wait_exit(&mut migrate, Duration::from_secs(60), || s.log("migrate"));
    assert!(status.success(), "{}", s.log("migrate"));
    // A table of the same name from another tool or an old layout: it answers the load query
    // (no rows yet) but has none of the columns a flush writes.
    for sql in [
        format!("DROP TABLE {}.monthly_charges", s.db),
        format!(
            "CREATE TABLE {}.monthly_charges (source_partition Int32, version Int64, customer String) ENGINE = MergeTree ORDER BY version",
            s.db
        ),
    ] {
        s.clickhouse.query_text(&sql).await.unwrap();
    }
    let mut agg = s.aggregator("aggregator", &[], &[]);
    s.wait_for_log("aggregator", "aggregator assigned", Duration::from_secs(60)).await;
    s.produce_rated(7).await;
    let status = wait_exit(&mut agg, Duration::from_secs(30), || s.log("aggregator"));
    let log = s.log("aggregator");
    eprintln!("{}", log.lines().find(|l| l.starts_with("Error:")).unwrap_or_default());
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("ClickHouse refused monthly_charges (not retried)"), "{log}");
    assert!(log.contains("aggregator migrate"), "the error says what to do:\n{log}");
    assert!(!log.contains("ClickHouse insert failed; retrying"), "a schema mismatch is not retried:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_clickhouse_credentials_stop_the_aggregator_saying_check_the_password() {
    let s = Setup::start("errors_credentials").await;
    let mut agg = s.aggregator("aggregator", &[], &[("METERLINE__CLICKHOUSE__PASSWORD", "not-the-password")]);
    let status = wait_exit(&mut agg, Duration::from_secs(30), || s.log("aggregator"));
    let log = s.log("aggregator");
    eprintln!("{}", log.lines().find(|l| l.starts_with("Error:")).unwrap_or_default());
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("METERLINE__CLICKHOUSE__PASSWORD"), "the error says what to check:\n{log}");
}
