//! Distributed mode against real servers: Apache Kafka (KRaft; one node, or three for the fault
//! test) and Debian's ClickHouse, started on loopback by `testkit`, and the real `ingest`, `rater`
//! and `aggregator` binaries as separate processes.
//!
//! - `end_to_end_equals_ground_truth_and_the_embedded_answer`: HTTP → ingest → rater →
//!   aggregator → ClickHouse equals totals computed here, and equals the embedded cores' answer
//!   (the `rate` path) line for line.
//! - `crashes_rebalances_outages_and_poison_leave_totals_exact`: while usage flows, SIGKILL the
//!   rater and the aggregator several times, let a second rater join and die, restart ClickHouse
//!   and one node of a three-node Kafka cluster, and put undecodable messages on the raw and rated
//!   topics; the totals still equal the ground truth to the cent, and the poison is in
//!   `dead_letters`.
//! - `a_paused_rater_is_fenced_and_nothing_it_produced_after_is_visible`: a rater stopped
//!   (SIGSTOP) past its session timeout while its batch's transaction is open, then resumed after
//!   another rater took its partitions: its transaction is aborted, and the rated topic read
//!   `read_committed` holds every record id exactly once (without transactions the zombie's
//!   records would land twice and only the aggregator's dedup would hide them).
//! - `a_rater_joining_under_load_moves_only_its_partitions_and_the_others_keep_committing`: a
//!   second rater joins while usage flows; the cooperative-sticky rebalance revokes from the first
//!   rater exactly the partitions the second is assigned (a strict subset of the 4), the first
//!   keeps committing on the rest with no gap over 5 s and rebuilds none of them, and every
//!   acknowledged record is charged exactly once.
//! - `a_lagging_raters_batches_grow_past_the_linger`: with a backlog on the raw topic
//!   before the rater starts and a 1 ms linger, the rater's committed batches average hundreds of
//!   records, up to `max_batch` (cut at the linger they would hold a millisecond's worth).
//!
//! The binaries must be built first (`scripts/test.sh` does: `cargo build --workspace
//! --all-features`).

use crate::fixtures::{account, price_book, tiered_price, KEY, RATES, TIERED};
use ::common::money::round_to_minor;
use ::common::time::{Timestamp, HOUR_MS};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

struct Cluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    broker: Broker,
    clickhouse: ClickHouse,
    db: String,
    ingest_url: String,
    procs: BTreeMap<String, Child>,
    restarts: BTreeMap<String, u32>,
}

impl Cluster {
    async fn start(test: &str, customers: usize) -> Cluster {
        Self::start_on(test, customers, Broker::start().await.unwrap()).await
    }

    async fn start_on(test: &str, customers: usize, broker: Broker) -> Cluster {
        Self::start_with_operators(test, customers, broker, None, |_| {}).await
    }

    /// [`Cluster::start_on`], with `operators` (an operators file's TOML) turning on ingest's
    /// operator API, and the test's price book changed by `tweak`.
    async fn start_with_operators(
        test: &str,
        customers: usize,
        broker: Broker,
        operators: Option<&str>,
        tweak: impl FnOnce(&mut ::common::catalogue::PriceBookDoc),
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let operators_line = match operators {
            Some(text) => {
                let path = dir.path().join("operators.toml");
                std::fs::write(&path, text).unwrap();
                format!("operators = \"{}\"", path.display())
            }
            None => String::new(),
        };
        let clickhouse = ClickHouse::start().await.unwrap();
        let (db, _) = clickhouse.database(test).await.unwrap();
        let mut doc = price_book(customers);
        tweak(&mut doc);
        let book = ::common::catalogue::PriceBook::new(doc).unwrap();
        let book_path = dir.path().join("price-book.toml");
        std::fs::write(&book_path, book.to_toml().unwrap()).unwrap();
        let port = testkit::free_port();
        let config = dir.path().join("meterline.toml");
        std::fs::write(
            &config,
            format!(
                r#"price_book = "{book}"
[kafka]
bootstrap = "{bootstrap}"
partitions = 4
replication = {replication}
# Kafka's smallest allowed session timeout: a killed rater's partitions move after 6 s.
session_timeout_ms = 6000
[kafka.topics]
raw = "{raw}"
rated = "{rated}"
rejected = "{rejected}"
dead_letter = "{dead}"
decisions = "{decisions}"
closed_months = "{closed}"
catalogue = "{catalogue}"
[clickhouse]
url = "{ch}"
database = "{db}"
[ingest]
listen = "127.0.0.1:{port}"
delivery_timeout_ms = 8000
{operators_line}
[rater]
group = "{rg}"
max_batch = 2000
linger_ms = 100
# A killed rater's open transaction holds back read_committed readers of its rated partitions
# until the broker aborts it (a restart under the same instance id aborts it at once).
transaction_timeout_ms = 10000
[aggregator]
group = "{ag}"
flush_max_records = 5000
flush_interval_ms = 300
"#,
                book = book_path.display(),
                bootstrap = broker.bootstrap(),
                replication = broker.replication(),
                raw = broker.topic("raw"),
                rated = broker.topic("rated"),
                rejected = broker.topic("rejected"),
                dead = broker.topic("dead"),
                decisions = broker.topic("decisions"),
                closed = broker.topic("closed"),
                catalogue = broker.topic("catalogue"),
                ch = clickhouse.url(),
                rg = broker.group("rater"),
                ag = broker.group("aggregator"),
            ),
        )
        .unwrap();
        let mut c = Cluster {
            dir,
            config,
            broker,
            clickhouse,
            db,
            ingest_url: format!("http://127.0.0.1:{port}"),
            procs: BTreeMap::new(),
            restarts: BTreeMap::new(),
        };
        c.spawn("ingest", "ingest");
        // Ready when /health answers.
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while http.get(format!("{}/health", c.ingest_url)).send().await.is_err() {
            assert!(Instant::now() < deadline, "ingest did not start:\n{}", c.log("ingest"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c
    }

    /// Starts process `name` running binary `bin_name`; a rater is instance `name`, so a restart
    /// under the same name fences its predecessor's open transaction.
    fn spawn(&mut self, name: &str, bin_name: &str) {
        self.spawn_with(name, bin_name, &[]);
    }

    /// [`Cluster::spawn`] with extra environment (config overrides).
    fn spawn_with(&mut self, name: &str, bin_name: &str, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap();
        let child = Command::new(bin(bin_name))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn,rater=info,aggregator=info,ingest=info")
            .env("METERLINE__RATER__INSTANCE_ID", name)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.insert(name.to_owned(), child);
    }

    fn kill(&mut self, name: &str) {
        if let Some(mut c) = self.procs.remove(name) {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// Like a supervisor: restarts any stage process that exited on its own.
    fn supervise(&mut self) {
        let exited: Vec<String> =
            self.procs.iter_mut().filter_map(|(n, c)| c.try_wait().ok().flatten().map(|_| n.clone())).collect();
        for n in exited {
            let b = if n.starts_with("rater") { "rater" } else { n.as_str() }.to_owned();
            *self.restarts.entry(n.clone()).or_default() += 1;
            self.spawn(&n, &b);
        }
    }

    /// Why stages stopped by themselves: each stage log's `Error:` lines (the binaries print
    /// their final error so); a stage the test killed prints none.
    fn exit_reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        for name in ["ingest", "rater", "rater2", "aggregator"] {
            let s = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
            for l in s.lines().filter(|l| l.starts_with("Error: ")) {
                out.push(format!("{name}: {}", l.chars().take(300).collect::<String>()));
            }
        }
        out
    }

    fn log(&self, name: &str) -> String {
        let s = std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default();
        if s.is_empty() {
            return String::new();
        }
        s.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    async fn query(&self, sql: &str) -> String {
        self.clickhouse.query_text(&sql.replace("{db}", &self.db)).await.unwrap_or_default()
    }

    /// (customer, dimension) → (amount_unrounded, customer_billed_amount, records).
    async fn charges(&self) -> BTreeMap<(String, String), (Decimal, Decimal, u64)> {
        let text = self
            .query("SELECT customer, dimension, toString(amount_unrounded), toString(customer_billed_amount), records FROM {db}.monthly_charges FINAL FORMAT TabSeparated")
            .await;
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                let d = |s: &str| Decimal::from_str(s).unwrap().normalize();
                ((f[0].to_owned(), f[1].to_owned()), (d(f[2]), d(f[3]), f[4].parse().unwrap()))
            })
            .collect()
    }

    /// Waits until the folded record count reaches `expected` (or fails with the logs).
    async fn wait_for_records(&mut self, expected: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.supervise();
            let n: u64 =
                self.query("SELECT sum(records) FROM {db}.monthly_charges FINAL").await.trim().parse().unwrap_or(0);
            if n == expected {
                return;
            }
            assert!(n <= expected, "more records folded ({n}) than accepted ({expected}): a double charge");
            if Instant::now() > deadline {
                let msg = format!(
                    "{n} of {expected} records folded after {timeout:?}\nrater:\n{}\naggregator:\n{}\ningest:\n{}",
                    self.log("rater"),
                    self.log("aggregator"),
                    self.log("ingest")
                );
                let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
                panic!("{msg}\nlogs and data kept in {}", kept.display());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let names: Vec<String> = self.procs.keys().cloned().collect();
        for n in names {
            self.kill(&n);
        }
    }
}

/// Waits for `task` while supervising the stages: a distributed call is answered only once a
/// rater decides it, so a stage that stopped by itself meanwhile must be restarted, as a
/// supervisor would, or the sender waits for a rater nobody runs.
/// If the task fails, panics with the stages' last log lines and keeps their directory.
async fn until_done_supervised<T>(c: &mut Cluster, task: tokio::task::JoinHandle<T>) -> T {
    while !task.is_finished() {
        c.supervise();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    match task.await {
        Ok(r) => r,
        Err(e) => {
            let logs: Vec<String> = ["ingest", "rater", "rater2", "aggregator"]
                .iter()
                .map(|n| format!("{n} (restarted {} times):\n{}", c.restarts.get(*n).unwrap_or(&0), c.log(n)))
                .collect();
            let kept = std::mem::replace(&mut c.dir, tempfile::tempdir().unwrap()).keep();
            panic!("the sender failed: {e}\n{}\nlogs and data kept in {}", logs.join("\n"), kept.display());
        }
    }
}

fn rater2_took_partitions(c: &Cluster) -> bool {
    std::fs::read_to_string(c.dir.path().join("rater2.log")).unwrap_or_default().contains("partition state rebuilt")
}

/// The records to send, in order, and the ground truth of what they must charge.
struct Workload {
    batches: Vec<Vec<Value>>,
    /// (customer, dimension) → (exact amount, records).
    truth: BTreeMap<(String, String), (Decimal, u64)>,
    accepted: u64,
    conflicts: u64,
    invalid: u64,
}

fn workload(customers: usize, seed: u64) -> Workload {
    workload_over(customers, seed, 3)
}

/// [`workload`] over the last `hours` hours (at most 5: the acceptance window is 6 h).
fn workload_over(customers: usize, seed: u64, hours: i64) -> Workload {
    let now_hour =
        Timestamp(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64)
            .hour()
            .start();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut truth: BTreeMap<(String, String), (Decimal, u64)> = BTreeMap::new();
    let mut records = Vec::new();
    let mut extra = Vec::new();
    let (mut conflicts, mut invalid) = (0, 0);
    let mut tiered_quantity: BTreeMap<String, i64> = BTreeMap::new();
    for h in 1..=hours {
        let t = now_hour.plus_millis(-h * HOUR_MS + rng.gen_range(0..HOUR_MS)).millis() / 1000;
        for c in 0..customers {
            for (dim, rate) in RATES {
                let q: i64 = rng.gen_range(0..10_000);
                let e = truth.entry((format!("c{c:04}"), dim.to_owned())).or_insert((Decimal::ZERO, 0));
                e.0 += Decimal::from(q) * Decimal::from_str(rate).unwrap();
                e.1 += 1;
                let rec =
                    json!({ "Timestamp": t, "CustomerAWSAccountId": account(c), "Dimension": dim, "Quantity": q });
                if rng.gen_bool(0.02) {
                    let mut conflict = rec.clone();
                    conflict["Quantity"] = json!(q + 1);
                    extra.push(conflict);
                    conflicts += 1;
                }
                records.push(rec);
            }
            // Graduated tiers: the truth is the month's total priced once, whatever the order.
            let q: i64 = rng.gen_range(0..4_000);
            *tiered_quantity.entry(format!("c{c:04}")).or_default() += q;
            records.push(
                json!({ "Timestamp": t, "CustomerAWSAccountId": account(c), "Dimension": TIERED, "Quantity": q }),
            );
            if rng.gen_bool(0.02) {
                extra.push(
                    json!({ "Timestamp": t, "CustomerAWSAccountId": account(c), "Dimension": "D0", "Quantity": 1 }),
                );
                invalid += 1;
            }
        }
    }
    for (customer, q) in tiered_quantity {
        let amount = tiered_price().month_amount(Decimal::from(q)).unwrap();
        truth.insert((customer, TIERED.to_owned()), (amount, hours as u64));
    }
    let accepted = records.len() as u64;
    let mut batches: Vec<Vec<Value>> = records.chunks(25).map(<[Value]>::to_vec).collect();
    // Identical resends of a tenth of the batches, then conflicts and invalid records, last.
    let resends: Vec<Vec<Value>> = batches.iter().step_by(10).cloned().collect();
    batches.extend(resends);
    batches.extend(extra.chunks(25).map(<[Value]>::to_vec));
    Workload { batches, truth, accepted, conflicts, invalid }
}

/// Posts every batch in order, retrying 429/503/connection errors (as seller code must).
/// `pace` is the pause between batches while `hold` is set; the last tenth of the batches also
/// waits for `hold` to clear, so usage is still flowing whenever a fault is injected.
async fn send(url: String, batches: Vec<Vec<Value>>, pace: Duration, hold: Arc<AtomicBool>) -> u64 {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let mut retries = 0;
    let n = batches.len();
    for (i, b) in batches.into_iter().enumerate() {
        while hold.load(Ordering::SeqCst) && i >= n * 9 / 10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let body = json!({ "ProductCode": "p", "UsageRecords": b }).to_string();
        let first_try = Instant::now();
        let mut last = String::new();
        loop {
            // Bounded: a pipeline that stays down this long has failed the test.
            assert!(
                first_try.elapsed() < Duration::from_secs(180),
                "batch {i} not acknowledged within 180 s ({retries} retries so far; last answer: {last})"
            );
            // Per-record answers (the documented opt-in): the workload mixes invalid records in.
            let req = http
                .post(format!("{url}/v1/BatchMeterUsage"))
                .header("X-Api-Key", KEY)
                .header("X-Meterline-Per-Record", "true");
            match req.header("Content-Type", "application/json").body(body.clone()).send().await {
                Ok(r) if r.status().is_success() => break,
                Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {
                    last =
                        format!("{} at {:?}: {}", r.status(), first_try.elapsed(), r.text().await.unwrap_or_default());
                }
                Ok(r) => panic!("ingest answered {}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => last = format!("{e} at {:?}", first_try.elapsed()),
            }
            retries += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if hold.load(Ordering::SeqCst) {
            tokio::time::sleep(pace).await;
        }
    }
    retries
}

fn assert_charges_equal_truth(
    got: &BTreeMap<(String, String), (Decimal, Decimal, u64)>,
    truth: &BTreeMap<(String, String), (Decimal, u64)>,
) {
    assert_eq!(got.len(), truth.len(), "number of invoice lines");
    for (k, (amount, n)) in truth {
        let (unrounded, billed, records) = got.get(k).unwrap_or_else(|| panic!("missing line {k:?}"));
        assert_eq!(*unrounded, amount.normalize(), "{k:?} exact amount");
        assert_eq!(*billed, round_to_minor(*amount, 2).normalize(), "{k:?} billed amount");
        assert_eq!(records, n, "{k:?} records");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_equals_ground_truth_and_the_embedded_answer() {
    const CUSTOMERS: usize = 60;
    let mut c = Cluster::start("e2e", CUSTOMERS).await;
    let w = workload(CUSTOMERS, 11);
    c.spawn("rater", "rater");
    c.spawn("aggregator", "aggregator");
    send(c.ingest_url.clone(), w.batches.clone(), Duration::ZERO, Arc::new(AtomicBool::new(false))).await;
    c.wait_for_records(w.accepted, Duration::from_secs(120)).await;
    let got = c.charges().await;
    assert_charges_equal_truth(&got, &w.truth);

    // The embedded cores on the same input, in the same order, give the same lines.
    let book = ::common::catalogue::PriceBook::new(price_book(CUSTOMERS)).unwrap();
    let lines: String = w
        .batches
        .iter()
        .flatten()
        .map(|r| {
            let mut r = r.clone();
            r["ProductCode"] = json!("p");
            r.to_string() + "\n"
        })
        .collect();
    let embedded = meterline::rate::rate_lines(&book, &lines, &Default::default()).unwrap();
    assert_eq!(embedded.charge_lines.len(), got.len());
    for l in &embedded.charge_lines {
        let (unrounded, billed, records) = got[&(l.customer.clone(), l.dimension.clone())];
        assert_eq!(
            (unrounded, billed, records),
            (l.amount_unrounded.normalize(), l.amount.normalize(), l.records),
            "{} {}",
            l.customer,
            l.dimension
        );
    }

    // Conflicts and invalid records are in rejected_records with their reasons.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = c.query("SELECT reason, count() FROM {db}.rejected_records FINAL GROUP BY reason ORDER BY reason FORMAT TabSeparated").await;
        let counts: BTreeMap<String, u64> =
            text.lines().filter_map(|l| l.split_once('\t')).map(|(a, b)| (a.to_owned(), b.parse().unwrap())).collect();
        if counts.get("DuplicateRecord") == Some(&w.conflicts)
            && counts.get("InvalidUsageDimension") == Some(&w.invalid)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rejections {counts:?}, expected {} conflicts and {} invalid\nrater:\n{}\naggregator:\n{}",
            w.conflicts,
            w.invalid,
            c.log("rater"),
            c.log("aggregator")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let items: u64 = c.query("SELECT count() FROM {db}.rated_usage FINAL").await.trim().parse().unwrap();
    assert_eq!(items, w.accepted, "one line item per accepted record");

    // Month close over ClickHouse equals the embedded close of the same records, line for line.
    let month = embedded.charge_lines[0].month.clone();
    let local = meterline::rate::rate_lines(
        &book,
        &lines,
        &meterline::rate::RateOptions { month: Some(&month), close: true, ..Default::default() },
    )
    .unwrap();
    let expected = local.month_close.unwrap().lines;
    let aggregator_close = |extra: &[&str], out_dir: &std::path::Path| {
        Command::new(bin("aggregator"))
            .args(["--config", c.config.to_str().unwrap(), "close", "--month", &month])
            .args(extra)
            .arg("--out-dir")
            .arg(out_dir)
            .output()
            .unwrap()
    };
    // A draft writes nothing and can be run again; then the close for good (early if the
    // month is still open), which happens once; its lines are the draft's.
    for _ in 0..2 {
        let out = aggregator_close(&["--draft"], c.dir.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("nothing closed"));
    }
    let drafted = c.query("SELECT count() FROM {db}.invoice_lines").await;
    assert_eq!(drafted.trim(), "0", "a draft writes no invoice lines");
    let out = aggregator_close(&["--cut-off-late-usage"], c.dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = aggregator_close(&["--cut-off-late-usage"], c.dir.path());
    let refusal = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && refusal.contains("was closed for good"), "{refusal}");
    let read = |kind: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(c.dir.path().join(format!("invoice-lines-{month}{kind}.json"))).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["lines"].clone()
    };
    assert_eq!(read(".draft"), read(""), "the draft's lines are the final close's");
    let text = c
        .query(
            "SELECT customer, dimension, charge_type, toString(customer_billed_amount), toString(listing_fee), toString(seller_net)
             FROM {db}.invoice_lines_current ORDER BY customer, dimension FORMAT TabSeparated",
        )
        .await;
    let stored: Vec<Vec<String>> = text.lines().map(|l| l.split('\t').map(str::to_owned).collect()).collect();
    let norm = |d: rust_decimal::Decimal| d.normalize().to_string();
    let mut want: Vec<Vec<String>> = expected
        .iter()
        .map(|l| {
            vec![
                l.customer.clone(),
                l.dimension.clone(),
                l.charge_type.as_str().to_owned(),
                norm(l.customer_billed_amount),
                norm(l.listing_fee),
                norm(l.seller_net),
            ]
        })
        .collect();
    want.sort();
    let stored: Vec<Vec<String>> = stored
        .into_iter()
        .map(|mut r| {
            for v in &mut r[3..] {
                *v = norm(v.parse().unwrap());
            }
            r
        })
        .collect();
    assert_eq!(stored, want);
    let csv = std::fs::read_to_string(c.dir.path().join(format!("invoice-lines-{month}.csv"))).unwrap();
    assert_eq!(csv.lines().count(), expected.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_rebalances_outages_and_poison_leave_totals_exact() {
    const CUSTOMERS: usize = 200;
    let mut c = Cluster::start_on("faults", CUSTOMERS, Broker::start_cluster().await.unwrap()).await;
    let w = workload(CUSTOMERS, 23);
    c.spawn("rater", "rater");
    c.spawn("aggregator", "aggregator");
    // Paced so that usage keeps flowing through every fault below.
    let hold = Arc::new(AtomicBool::new(true));
    let sender =
        tokio::spawn(send(c.ingest_url.clone(), w.batches.clone(), Duration::from_millis(150), Arc::clone(&hold)));

    // Poison: undecodable messages on the raw and the rated topic.
    let producer: rdkafka::producer::FutureProducer = c.broker.client_config().create().unwrap();
    let cfg = ::common::config::PipelineConfig::load(&c.config).unwrap();
    for (topic, payload) in [
        (&cfg.kafka.topics.raw, b"\x01garbage".as_slice()),
        (&cfg.kafka.topics.rated, b"\x09not-a-rated-record".as_slice()),
    ] {
        producer
            .send(
                rdkafka::producer::FutureRecord::<[u8], [u8]>::to(topic).key(b"poison".as_slice()).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    let mut rng = SmallRng::seed_from_u64(5);
    let mut kills: BTreeMap<&str, u32> = BTreeMap::new();
    let mut under_load = 0;
    let steps = [
        "rater",
        "aggregator",
        "clickhouse",
        "rater",
        "rater2-join",
        "aggregator",
        "kafka-node",
        "rater2-kill",
        "rater",
        "aggregator",
    ];
    for step in steps {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(800..2000))).await;
        c.supervise();
        match step {
            "rater" | "aggregator" => {
                c.kill(step);
                c.spawn(step, step);
            }
            "rater2-join" => {
                // Give the second rater time to take over partitions before it dies; whether it
                // did is reported below.
                c.spawn("rater2", "rater");
                let deadline = Instant::now() + Duration::from_secs(20);
                while !rater2_took_partitions(&c) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            "rater2-kill" => c.kill("rater2"),
            "clickhouse" => {
                c.clickhouse.kill();
                tokio::time::sleep(Duration::from_secs(2)).await;
                c.clickhouse.restart().await.unwrap();
            }
            "kafka-node" => {
                // One of three nodes (replication 3, min.insync.replicas 2): the pipeline goes on.
                let node = rng.gen_range(0..c.broker.nodes());
                c.broker.kill_node(node);
                tokio::time::sleep(Duration::from_secs(3)).await;
                c.broker.restart_node(node).await.unwrap();
            }
            _ => unreachable!(),
        }
        *kills.entry(step).or_default() += 1;
        if !sender.is_finished() {
            under_load += 1;
        }
    }
    hold.store(false, Ordering::SeqCst);
    assert_eq!(under_load, steps.len(), "every fault happened while usage was flowing");
    let rater2_rebuilt = rater2_took_partitions(&c);
    let retries = until_done_supervised(&mut c, sender).await;
    c.wait_for_records(w.accepted, Duration::from_secs(240)).await;
    assert_charges_equal_truth(&c.charges().await, &w.truth);
    let dead = c
        .query("SELECT stage, count() FROM {db}.dead_letters FINAL GROUP BY stage ORDER BY stage FORMAT TabSeparated")
        .await;
    assert_eq!(dead.trim(), "aggregator\t1\nrater\t1", "each poison message dead-lettered once");
    eprintln!(
        "faults: {kills:?} ({under_load} under load; second rater took partitions: {rater2_rebuilt}); supervisor restarts {:?} ({:?}); sender retries {retries}; {} records, {} lines checked",
        c.restarts,
        c.exit_reasons(),
        w.accepted,
        w.truth.len()
    );
}

/// Every rated record id on `topic` as a `read_committed` consumer sees them, with its count.
fn committed_rated_ids(bootstrap: &str, topic: &str, partitions: i32) -> BTreeMap<String, u32> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "committed-rated-reader")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut ids: BTreeMap<String, u32> = BTreeMap::new();
    let mut at_end = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while at_end.len() < partitions as usize {
        assert!(Instant::now() < deadline, "reading {topic} to its end took over 60 s");
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let r: ::common::rated::RatedRecord = ::common::codec::decode(m.payload().unwrap()).unwrap();
                *ids.entry(r.record_id.to_string()).or_default() += 1;
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_rater_is_fenced_and_nothing_it_produced_after_is_visible() {
    const CUSTOMERS: usize = 200;
    let mut c = Cluster::start("zombie", CUSTOMERS).await;
    let w = workload(CUSTOMERS, 31);
    // The zombie-to-be keeps each batch's transaction open for 3 s, so the pause lands inside one.
    c.spawn_with(
        "rater",
        "rater",
        &[("METERLINE__RATER__LINGER_MS", "3000"), ("METERLINE__RATER__MAX_BATCH", "1000000")],
    );
    c.spawn("rater2", "rater");
    c.spawn("aggregator", "aggregator");
    let hold = Arc::new(AtomicBool::new(true));
    // Paced so that usage flows through the pause and after it (about 20 s of sending).
    let sender =
        tokio::spawn(send(c.ingest_url.clone(), w.batches.clone(), Duration::from_millis(150), Arc::clone(&hold)));
    // Both raters own partitions before the pause.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(c.log("rater").contains("partition state rebuilt") && rater2_took_partitions(&c)) {
        assert!(
            Instant::now() < deadline,
            "both raters should own partitions:\n{}\n{}",
            c.log("rater"),
            c.log("rater2")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = c.procs["rater"].id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    // Past the 6 s session timeout: rater2 takes every partition and goes on.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    hold.store(false, Ordering::SeqCst);
    sender.await.unwrap();
    c.wait_for_records(w.accepted, Duration::from_secs(180)).await;
    assert_charges_equal_truth(&c.charges().await, &w.truth);

    let log = std::fs::read_to_string(c.dir.path().join("rater.log")).unwrap_or_default();
    let fenced =
        log.contains("batch transaction aborted") || c.restarts.contains_key("rater") || log.contains("fenced");
    assert!(fenced, "the resumed rater should have had its transaction aborted or been fenced:\n{}", c.log("rater"));
    let cfg = ::common::config::PipelineConfig::load(&c.config).unwrap();
    let (bootstrap, topic) = (c.broker.bootstrap(), cfg.kafka.topics.rated.clone());
    let ids = tokio::task::spawn_blocking(move || committed_rated_ids(&bootstrap, &topic, 4)).await.unwrap();
    let twice: Vec<(&String, &u32)> = ids.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "record ids committed more than once on the rated topic: {twice:?}");
    assert_eq!(ids.len() as u64, w.accepted, "every accepted record rated once");
    eprintln!(
        "zombie: rater log shows an aborted transaction: {}; restarts {:?}",
        log.contains("batch transaction aborted"),
        c.restarts
    );
}

/// One rater log line: its RFC3339 timestamp (ms since the epoch) and its text, ANSI colour
/// codes removed.
fn log_lines(c: &Cluster, name: &str) -> Vec<(i64, String)> {
    let raw = std::fs::read_to_string(c.dir.path().join(format!("{name}.log"))).unwrap_or_default();
    let mut out = Vec::new();
    for line in raw.lines() {
        // Strip `ESC [ … final-byte` sequences.
        let mut text = String::with_capacity(line.len());
        let mut chars = line.chars();
        while let Some(ch) = chars.next() {
            if ch == '\x1b' {
                for e in chars.by_ref() {
                    if ('@'..='~').contains(&e) && e != '[' {
                        break;
                    }
                }
            } else {
                text.push(ch);
            }
        }
        let at = text.split_whitespace().next().and_then(|t| Timestamp::parse_rfc3339(t).ok());
        if let Some(at) = at {
            out.push((at.millis(), text));
        }
    }
    out
}

/// The `partitions=[..]` field of a log line.
fn partitions_field(line: &str) -> BTreeSet<i32> {
    let Some(start) = line.find(" partitions=[") else { return BTreeSet::new() };
    let rest = &line[start + " partitions=[".len()..];
    let list = &rest[..rest.find(']').unwrap_or(rest.len())];
    list.split(',').filter_map(|p| p.trim().parse().ok()).collect()
}

/// The union of the `partitions=[..]` of the lines saying `message` within `[from, to]`.
fn partitions_logged(lines: &[(i64, String)], message: &str, from: i64, to: i64) -> BTreeSet<i32> {
    lines
        .iter()
        .filter(|(at, l)| (from..=to).contains(at) && l.contains(message))
        .flat_map(|(_, l)| partitions_field(l))
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rater_joining_under_load_moves_only_its_partitions_and_the_others_keep_committing() {
    const CUSTOMERS: usize = 200;
    let mut c = Cluster::start("join", CUSTOMERS).await;
    let w = workload(CUSTOMERS, 41);
    c.spawn("rater", "rater");
    c.spawn("aggregator", "aggregator");
    let hold = Arc::new(AtomicBool::new(true));
    // Paced (about 25 s of sending) so that usage flows before, during and after the join.
    let sender =
        tokio::spawn(send(c.ingest_url.clone(), w.batches.clone(), Duration::from_millis(150), Arc::clone(&hold)));
    let all: BTreeSet<i32> = (0..4).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while partitions_logged(&log_lines(&c, "rater"), "batch committed", i64::MIN, i64::MAX) != all {
        assert!(
            Instant::now() < deadline && !sender.is_finished(),
            "the first rater should commit batches on all 4 partitions while usage flows:\n{}",
            c.log("rater")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let joined_at = now_ms();
    c.spawn("rater2", "rater");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rater2_took_partitions(&c) {
        assert!(
            Instant::now() < deadline,
            "the second rater should take partitions within 60 s:\n{}\n{}",
            c.log("rater"),
            c.log("rater2")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Usage still flows after the join, on both raters.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!sender.is_finished(), "usage should still be flowing after the join");
    let settled_at = now_ms();
    hold.store(false, Ordering::SeqCst);
    let retries = until_done_supervised(&mut c, sender).await;
    c.wait_for_records(w.accepted, Duration::from_secs(120)).await;

    let (first, second) = (log_lines(&c, "rater"), log_lines(&c, "rater2"));
    let dump = || format!("rater:\n{}\nrater2:\n{}", c.log("rater"), c.log("rater2"));
    // (1) Cooperative-sticky: the first rater gives up exactly what the second one gets, and keeps
    // the rest (an eager rebalance would revoke all 4 and hand some back).
    let revoked = partitions_logged(&first, "partitions revoked", joined_at, settled_at);
    let taken = partitions_logged(&second, "partitions assigned", joined_at, settled_at);
    assert_eq!(revoked, taken, "the first rater's revoked partitions are the second's assigned ones\n{}", dump());
    assert!(!revoked.is_empty() && revoked.len() < all.len(), "a strict subset moved: {revoked:?}\n{}", dump());
    let kept: BTreeSet<i32> = all.difference(&revoked).copied().collect();
    // The kept partitions keep their dedup state: nothing the first rater kept is rebuilt.
    let rebuilt_again: Vec<&String> = first
        .iter()
        .filter(|(at, l)| {
            *at >= joined_at
                && l.contains("rebuilding the partition's dedup state")
                && kept.iter().any(|p| l.ends_with(&format!("partition={p}")))
        })
        .map(|(_, l)| l)
        .collect();
    assert!(rebuilt_again.is_empty(), "kept partitions were rebuilt: {rebuilt_again:?}");

    // (2) From the second rater's start until it has rebuilt its first partition, and for the 2 s
    // after (a commit begun inside the join may end outside it), the first rater keeps committing
    // batches on the partitions it kept. Unstalled, a batch commits every ~0.15-0.4 s (150 ms pace,
    // 100 ms linger). Measured on a 2-core machine: the one transactional offset commit that meets
    // the second cooperative round waits for the group to settle, ~3 s without a batch on the kept
    // partitions (the rater's loop is one task). 5 s leaves margin for a machine shared with the
    // JVM broker, ClickHouse and the second rater's start-up and replay, yet stays under the 6 s
    // session timeout, the least a rebalance waiting out a member would take.
    let rebuilt_at = second
        .iter()
        .find(|(at, l)| *at >= joined_at && l.contains("partition state rebuilt"))
        .map(|(at, _)| *at)
        .unwrap_or_else(|| panic!("no rebuild in the second rater's log\n{}", dump()));
    let mut points = vec![joined_at];
    points.extend(
        first
            .iter()
            .filter(|(at, l)| {
                (joined_at..=settled_at).contains(at)
                    && l.contains("batch committed")
                    && !partitions_field(l).is_disjoint(&kept)
            })
            .map(|(at, _)| *at),
    );
    points.push(settled_at);
    let (gap_from, longest) =
        points.windows(2).map(|p| (p[0] - joined_at, p[1] - p[0])).max_by_key(|(_, gap)| *gap).unwrap_or((0, 0));
    assert!(
        longest <= 5_000,
        "the first rater stopped committing its kept partitions {kept:?} for {longest} ms during the join \
         (commits at {points:?}; rater2 started at {joined_at}, rebuilt at {rebuilt_at})\n{}",
        dump()
    );

    // (3) Every acknowledged record charged exactly once.
    assert_charges_equal_truth(&c.charges().await, &w.truth);
    eprintln!(
        "join: moved {revoked:?}, kept {kept:?}; rater2 rebuilt its first partition {} ms after it started; \
         {} commits on kept partitions in the {} ms window, longest gap {longest} ms from +{gap_from} ms; \
         restarts {:?}; sender retries {retries}",
        rebuilt_at - joined_at,
        points.len() - 2,
        settled_at - joined_at,
        c.restarts
    );
}

/// A chaos knob from the environment, or its CI default.
fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Posts `batches` with `workers` concurrent sellers, each retrying until acknowledged (as seller
/// code must), `pace` between a worker's calls; the last tenth waits for `hold` to clear.
async fn send_concurrently(
    url: String,
    batches: Vec<Vec<Value>>,
    workers: usize,
    pace: Duration,
    hold: Arc<AtomicBool>,
) -> u64 {
    let mut streams: Vec<Vec<Vec<Value>>> = vec![Vec::new(); workers];
    for (i, b) in batches.into_iter().enumerate() {
        streams[i % workers].push(b);
    }
    let tasks: Vec<_> =
        streams.into_iter().map(|s| tokio::spawn(send(url.clone(), s, pace, Arc::clone(&hold)))).collect();
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    retries
}

/// The chaos run (issue 13): usage flows through the three binaries on a three-node Kafka while
/// random `kill -9`s hit the raters, the aggregator, ingest, one Kafka node at a time and
/// ClickHouse; afterwards every acknowledged record is charged exactly once, to the cent, against
/// a ground truth computed here from the generated records. CI runs a short version; the full
/// one is `scripts/chaos.sh` (≥ 1 M records, ≥ 20 kills).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kills_leave_every_acknowledged_record_charged_exactly_once() {
    let customers = knob("METERLINE_CHAOS_CUSTOMERS", 300) as usize;
    let hours = knob("METERLINE_CHAOS_HOURS", 3) as i64;
    let kills_wanted = knob("METERLINE_CHAOS_KILLS", 12);
    let pace = Duration::from_millis(knob("METERLINE_CHAOS_PACE_MS", 40));
    let started = Instant::now();
    let mut c = Cluster::start_on("chaos", customers, Broker::start_cluster().await.unwrap()).await;
    let w = workload_over(customers, 47, hours);
    c.spawn("rater", "rater");
    c.spawn("rater2", "rater");
    c.spawn("aggregator", "aggregator");
    let hold = Arc::new(AtomicBool::new(true));
    let sender = tokio::spawn(send_concurrently(c.ingest_url.clone(), w.batches.clone(), 4, pace, Arc::clone(&hold)));

    let mut rng = SmallRng::seed_from_u64(knob("METERLINE_CHAOS_SEED", 7));
    let targets = ["rater", "rater2", "aggregator", "ingest", "kafka-node", "clickhouse"];
    let mut kills: BTreeMap<&str, u32> = BTreeMap::new();
    let mut under_load = 0;
    for _ in 0..kills_wanted {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(1000..3000))).await;
        c.supervise();
        let target = targets[rng.gen_range(0..targets.len())];
        match target {
            "kafka-node" => {
                let node = rng.gen_range(0..c.broker.nodes());
                c.broker.kill_node(node);
                tokio::time::sleep(Duration::from_secs(2)).await;
                c.broker.restart_node(node).await.unwrap();
            }
            "clickhouse" => {
                c.clickhouse.kill();
                tokio::time::sleep(Duration::from_secs(1)).await;
                c.clickhouse.restart().await.unwrap();
            }
            stage => {
                let bin_name = if stage.starts_with("rater") { "rater" } else { stage };
                c.kill(stage);
                c.spawn(stage, bin_name);
            }
        }
        *kills.entry(target).or_default() += 1;
        if !sender.is_finished() {
            under_load += 1;
        }
    }
    hold.store(false, Ordering::SeqCst);
    let retries = until_done_supervised(&mut c, sender).await;
    c.wait_for_records(w.accepted, Duration::from_secs(knob("METERLINE_CHAOS_DRAIN_SECS", 240))).await;
    let got = c.charges().await;
    assert_charges_equal_truth(&got, &w.truth);
    let billed: Decimal = got.values().map(|(_, b, _)| *b).sum();
    let truth: Decimal = w.truth.values().map(|(a, _)| round_to_minor(*a, 2)).sum();
    eprintln!(
        "chaos: {} records acknowledged ({} calls incl. resends, conflicts, invalid), {} kill -9s ({under_load} under load): {kills:?}; \
         supervisor restarts {:?} ({:?}); sender retries {retries}; {} invoice lines, billed {billed} = truth {truth}, 0 cents lost or doubled; {:?}",
        w.accepted,
        w.batches.len(),
        kills.values().sum::<u32>(),
        c.restarts,
        c.exit_reasons(),
        got.len(),
        started.elapsed()
    );
    assert_eq!(billed, truth);
}

/// One API call of the conformance suite and what both modes must answer.
struct Case {
    name: &'static str,
    product: &'static str,
    records: Value,
    /// Send `X-Meterline-Per-Record: true` (else AWS's whole-call answers).
    per_record: bool,
    /// HTTP status and, for a 200, each record's `Status`.
    expect: (u16, &'static [&'static str]),
}

/// An answer reduced to what a seller reads: HTTP status, the error type of a whole-call error,
/// and per record its status, id and reason.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    code: u16,
    error_type: Option<String>,
    records: Vec<(String, String, String)>,
}

async fn post_case(http: &reqwest::Client, url: &str, case: &Case) -> Answer {
    let body = json!({ "ProductCode": case.product, "UsageRecords": case.records }).to_string();
    let mut req = http.post(format!("{url}/v1/BatchMeterUsage")).header("X-Api-Key", KEY);
    if case.per_record {
        req = req.header("X-Meterline-Per-Record", "true");
    }
    // A 503 here would be the rater not having its partitions yet: retry it, as a seller would.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = req.try_clone().unwrap().header("Content-Type", "application/json").body(body.clone()).send().await;
        let r = r.unwrap();
        let code = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if code == 503 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        let text = |x: &Value| x.as_str().unwrap_or("").to_owned();
        // A window refusal names the instant it was judged at: the two calls are milliseconds apart.
        let reason = |x: &Value| {
            let r = text(x);
            r.find(" (now ").map_or(r.clone(), |i| r[..i].to_owned())
        };
        let records = v["Results"]
            .as_array()
            .map(|rs| {
                rs.iter().map(|r| (text(&r["Status"]), text(&r["MeteringRecordId"]), reason(&r["Reason"]))).collect()
            })
            .unwrap_or_default();
        return Answer { code, error_type: v["__type"].as_str().map(str::to_owned), records };
    }
}

/// Issue 14's conformance suite: the same API cases — every status, identical and conflicting
/// resends, window edges, allocations, unknown product / customer / dimension, whole-call AWS
/// answers — sent to `meterline serve` (embedded) and to the distributed binaries over one price
/// book, in one order. Every answer must be equal, record by record (status, record id, reason),
/// and equal the expected statuses. No case passes in one mode only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_both_modes_answer_every_case_alike() {
    let mut c = Cluster::start("conformance", 8).await;
    c.spawn("rater", "rater");
    let query_listen = format!("127.0.0.1:{}", testkit::free_port());
    c.spawn_with("aggregator", "aggregator", &[("METERLINE__AGGREGATOR__QUERY_LISTEN", query_listen.as_str())]);
    let port = testkit::free_port();
    let data = c.dir.path().join("embedded");
    let serve_log = std::fs::File::create(c.dir.path().join("serve.log")).unwrap();
    let serve = Command::new(bin("meterline"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--price-book"])
        .arg(c.dir.path().join("price-book.toml"))
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(serve_log)
        .spawn()
        .unwrap();
    c.procs.insert("serve".into(), serve);
    let embedded = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{embedded}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "meterline serve did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let now = Timestamp(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64);
    // Two hours ago, on the hour plus ten minutes: well inside the six-hour acceptance window.
    let t = now.plus_millis(-2 * HOUR_MS).hour().start().plus_millis(10 * 60_000).millis() / 1000;
    let rec = |c: usize, dim: &str, q: i64, ts: i64| json!({ "Timestamp": ts, "CustomerAWSAccountId": account(c), "Dimension": dim, "Quantity": q });
    let tags = |q: [i64; 2]| {
        json!([
            { "AllocatedUsageQuantity": q[0], "Tags": [{ "Key": "team", "Value": "blue" }] },
            { "AllocatedUsageQuantity": q[1], "Tags": [{ "Key": "team", "Value": "red" }] },
        ])
    };
    let mut allocated = rec(3, "d2", 5, t);
    allocated["UsageAllocations"] = tags([3, 2]);
    let mut allocated_wrong = rec(4, "d2", 5, t);
    allocated_wrong["UsageAllocations"] = tags([3, 1]);
    const S: &str = "Success";
    let cases = vec![
        Case {
            name: "new records",
            product: "p",
            records: json!([rec(0, "d1", 5, t), rec(1, "d1", 7, t), rec(2, "t0", 1500, t)]),
            per_record: true,
            expect: (200, &[S, S, S]),
        },
        Case {
            name: "identical resend of the whole call",
            product: "p",
            records: json!([rec(0, "d1", 5, t), rec(1, "d1", 7, t), rec(2, "t0", 1500, t)]),
            per_record: true,
            expect: (200, &[S, S, S]),
        },
        Case {
            name: "same slot later in the hour, same quantity: the same record",
            product: "p",
            records: json!([rec(0, "d1", 5, t + 40 * 60)]),
            per_record: true,
            expect: (200, &[S]),
        },
        Case {
            name: "conflicting resend: the first stands",
            product: "p",
            records: json!([rec(0, "d1", 6, t)]),
            per_record: true,
            expect: (200, &["DuplicateRecord"]),
        },
        Case {
            name: "a conflict inside one call",
            product: "p",
            records: json!([rec(5, "d0", 1, t), rec(5, "d0", 2, t)]),
            per_record: true,
            expect: (200, &[S, "DuplicateRecord"]),
        },
        Case {
            name: "the next hour is another slot",
            product: "p",
            records: json!([rec(0, "d1", 6, t + 3600)]),
            per_record: true,
            expect: (200, &[S]),
        },
        Case {
            name: "allocations that sum to the quantity",
            product: "p",
            records: json!([allocated]),
            per_record: true,
            expect: (200, &[S]),
        },
        Case {
            name: "allocations that do not sum to the quantity",
            product: "p",
            records: json!([allocated_wrong]),
            per_record: true,
            expect: (200, &["InvalidUsageAllocations"]),
        },
        Case {
            name: "unknown dimension, negative quantity, unknown customer, outside the window",
            product: "p",
            records: json!([
                rec(6, "dx", 1, t),
                rec(6, "d0", -1, t),
                rec(999, "d0", 1, t),
                rec(6, "d0", 1, t - 5 * 3600),
                rec(6, "d0", 1, now.millis() / 1000 + 2 * 3600),
            ]),
            per_record: true,
            expect: (
                200,
                &[
                    "InvalidUsageDimension",
                    "InvalidQuantity",
                    "CustomerNotSubscribed",
                    "TimestampOutOfBounds",
                    "TimestampOutOfBounds",
                ],
            ),
        },
        Case {
            name: "AWS answers: a conflicting resend is a per-record DuplicateRecord",
            product: "p",
            records: json!([rec(1, "d1", 8, t), rec(7, "d3", 1, t)]),
            per_record: false,
            expect: (200, &["DuplicateRecord", S]),
        },
        Case {
            name: "AWS answers: an invalid record fails the whole call, nothing stored",
            product: "p",
            records: json!([rec(7, "d0", 1, t), rec(7, "dx", 1, t)]),
            per_record: false,
            expect: (400, &[]),
        },
        Case {
            name: "AWS answers: unknown product",
            product: "no-such-product",
            records: json!([rec(0, "d0", 1, t)]),
            per_record: false,
            expect: (400, &[]),
        },
    ];
    let mut first_ids: Option<Vec<String>> = None;
    for case in &cases {
        let distributed = post_case(&http, &c.ingest_url, case).await;
        let local = post_case(&http, &embedded, case).await;
        assert_eq!(distributed, local, "case `{}`: distributed (left) and embedded (right) differ", case.name);
        let statuses: Vec<&str> = local.records.iter().map(|(s, _, _)| s.as_str()).collect();
        assert_eq!((local.code, statuses.as_slice()), case.expect, "case `{}`: {local:?}", case.name);
        let ids: Vec<String> = local.records.iter().map(|(_, id, _)| id.clone()).collect();
        match &first_ids {
            None => first_ids = Some(ids),
            Some(first) if case.name.starts_with("identical") => assert_eq!(&ids, first, "same ids on a resend"),
            Some(first) if case.name.starts_with("same slot") => assert_eq!(ids[0], first[0], "the same record"),
            Some(_) => {}
        }
    }
    // Both modes charged the same records: 3 + 1 (conflict in one call) + 1 (next hour) +
    // 1 (allocations) + 1 (d3 beside the conflict) = 7 records.
    c.wait_for_records(7, Duration::from_secs(60)).await;

    // The query API answers alike in both modes: `meterline serve` over SQLite, `aggregator`
    // (query_listen) over ClickHouse, the same routes, keys and JSON.
    let month = Timestamp::from_millis(t * 1000).month().to_string();
    let distributed_queries = format!("http://{query_listen}");
    let get = |base: String, path: String| {
        let http = http.clone();
        async move {
            let r = http.get(format!("{base}{path}")).header("X-Api-Key", KEY).send().await.unwrap();
            let code = r.status().as_u16();
            (code, r.json::<Value>().await.unwrap_or_default())
        }
    };
    for customer in ["c0000", "c0001", "c0002", "c0003", "c0005", "c0007"] {
        for route in [
            format!("/v1/customers/{customer}/usage?month={month}&by=hour"),
            format!("/v1/customers/{customer}/usage?month={month}&by=day&dimension=d1"),
            format!("/v1/customers/{customer}/usage/tags?month={month}&key=team"),
            format!("/v1/customers/{customer}/charges?month={month}"),
            format!("/v1/customers/{customer}/invoice-preview?month={month}"),
            format!("/v1/customers/{customer}/entitlements"),
        ] {
            let (dcode, d) = get(distributed_queries.clone(), route.clone()).await;
            let (ecode, e) = get(embedded.clone(), route.clone()).await;
            assert_eq!((dcode, &d), (ecode, &e), "{route}: distributed (left) and embedded (right) differ");
            assert_eq!(dcode, 200, "{route}: {d}");
        }
    }
    // The allocated record's tags travelled to ClickHouse: 3 blue, 2 red.
    let (_, v) = get(distributed_queries, format!("/v1/customers/c0003/usage/tags?month={month}&key=team")).await;
    let split: Vec<(&str, &str)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["value"].as_str().unwrap(), i["quantity"].as_str().unwrap()))
        .collect();
    assert_eq!(split, [("blue", "3"), ("red", "2")], "{v}");
}

/// Starts `meterline serve` over the cluster's price book with its own data directory; returns its
/// URL once `/health` answers.
async fn serve_embedded(c: &mut Cluster) -> String {
    let port = testkit::free_port();
    let serve_log = std::fs::File::create(c.dir.path().join("serve.log")).unwrap();
    let serve = Command::new(bin("meterline"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--price-book"])
        .arg(c.dir.path().join("price-book.toml"))
        .arg("--data-dir")
        .arg(c.dir.path().join("embedded"))
        .stdout(Stdio::null())
        .stderr(serve_log)
        .spawn()
        .unwrap();
    c.procs.insert("serve".into(), serve);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{url}/health")).await.is_err() {
        assert!(Instant::now() < deadline, "meterline serve did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    url
}

/// Closes `month` in both modes: `aggregator close` (distributed) and `meterline close` (embedded,
/// beside the running `meterline serve`). Returns the aggregator's output.
fn close_both_modes(c: &Cluster, month: &str) -> String {
    let out = Command::new(bin("aggregator"))
        .arg("--config")
        .arg(&c.config)
        // The month is the current one: an early close, on the operator's word.
        .args(["close", "--month", month, "--cut-off-late-usage", "--out-dir"])
        .arg(c.dir.path().join("close-distributed"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "aggregator close failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let embedded = Command::new(bin("meterline"))
        .args(["close", "--month", month, "--cut-off-late-usage", "--data-dir"])
        .arg(c.dir.path().join("embedded"))
        .arg("--price-book")
        .arg(c.dir.path().join("price-book.toml"))
        .arg("--out-dir")
        .arg(c.dir.path().join("close-embedded"))
        .output()
        .unwrap();
    assert!(embedded.status.success(), "meterline close failed: {}", String::from_utf8_lossy(&embedded.stderr));
    text
}

/// This month, and a record time inside it and inside the acceptance window: ten minutes ago, or
/// the month's first instant when the month is younger than that.
fn this_month_and_a_time_in_it() -> (::common::time::Month, i64) {
    let now = Timestamp(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64);
    let month = now.month();
    (month, now.plus_millis(-10 * 60_000).millis().max(month.start().millis()) / 1000)
}

/// Sends `case` to both modes; both answers must be equal and as expected. Returns the answer.
async fn answer_alike(http: &reqwest::Client, distributed_url: &str, embedded_url: &str, case: &Case) -> Answer {
    let distributed = post_case(http, distributed_url, case).await;
    let local = post_case(http, embedded_url, case).await;
    assert_eq!(distributed, local, "case `{}`: distributed (left) and embedded (right) differ", case.name);
    let statuses: Vec<&str> = local.records.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!((local.code, statuses.as_slice()), case.expect, "case `{}`: {local:?}", case.name);
    local
}

/// Issue 14 item 3: after `aggregator close --month <this month>` the distributed raters refuse a
/// record of this month as late usage (the test book's AWS profile refuses it), exactly as
/// `meterline serve` does after `meterline close --month`: the same status, id and reason. A
/// record before the close is charged in both; a rater restarted after the close still refuses;
/// the close is in ClickHouse `closed_months`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_month_refuses_late_usage_alike_in_both_modes() {
    let mut c = Cluster::start("closed", 4).await;
    c.spawn("rater", "rater");
    c.spawn("aggregator", "aggregator");
    let embedded = serve_embedded(&mut c).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let (month, t) = this_month_and_a_time_in_it();
    let rec =
        |c: usize| json!([{ "Timestamp": t, "CustomerAWSAccountId": account(c), "Dimension": "d1", "Quantity": 5 }]);
    let case = |name, c, status| Case { name, product: "p", records: rec(c), per_record: true, expect: (200, status) };
    let before = case("before the close: charged", 0, &["Success"]);
    let first = answer_alike(&http, &c.ingest_url, &embedded, &before).await;

    let started = Instant::now();
    let out = close_both_modes(&c, &month.to_string());
    // The test config's settle: 100 ms follower poll + 100 ms linger + 300 ms flush + 1 s margin.
    assert!(started.elapsed() >= Duration::from_millis(1_500), "the close read lines before the settle time");
    assert!(out.contains(&format!("closed {month}")), "{out}");

    let late = case("after the close: late usage for a closed month", 1, &["TimestampOutOfBounds"]);
    let refused = answer_alike(&http, &c.ingest_url, &embedded, &late).await;
    assert!(refused.records[0].2.contains("a closed month"), "{refused:?}");
    // Dedup comes before rating: the record charged before the close is still an identical resend.
    let resend = case("after the close: the record charged before, sent again", 0, &["Success"]);
    assert_eq!(answer_alike(&http, &c.ingest_url, &embedded, &resend).await, first);
    // A rater started after the close knows it before its first decision: it reads the
    // closed-months topic to its end at startup.
    c.kill("rater");
    c.spawn("rater", "rater");
    let after_restart = case("after a rater restart: still a closed month", 2, &["TimestampOutOfBounds"]);
    let refused_again = answer_alike(&http, &c.ingest_url, &embedded, &after_restart).await;
    assert!(refused_again.records[0].2.contains("a closed month"), "{refused_again:?}");

    let closed = c.query("SELECT toString(billing_month) FROM {db}.closed_months FORMAT TabSeparated").await;
    assert_eq!(closed.trim(), format!("{month}-01"));
    c.wait_for_records(1, Duration::from_secs(60)).await;
}

/// Issue 14 item 3, second policy: with a `correction_next_month` profile, a record of this month
/// sent after `aggregator close --month <this month>` is accepted in both modes alike and the
/// distributed aggregator books it as an `adjustment` on next month in `monthly_charges`: 5 units
/// of `d1` at $0.50 = $2.50, one record; this month keeps only the record charged before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_months_late_usage_is_booked_on_the_next_month_when_the_profile_corrects() {
    let mut c = Cluster::start("closed-correct", 4).await;
    // The raters, the aggregator and `meterline serve` read the book when they start; ingest
    // (already running) does not apply the late-usage policy.
    let mut doc = price_book(4);
    doc.marketplace.late_usage = Some(::common::catalogue::LateUsage::CorrectionNextMonth);
    let book = ::common::catalogue::PriceBook::new(doc).unwrap();
    std::fs::write(c.dir.path().join("price-book.toml"), book.to_toml().unwrap()).unwrap();
    c.spawn("rater", "rater");
    c.spawn("aggregator", "aggregator");
    let embedded = serve_embedded(&mut c).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let (month, t) = this_month_and_a_time_in_it();
    let rec =
        |c: usize| json!([{ "Timestamp": t, "CustomerAWSAccountId": account(c), "Dimension": "d1", "Quantity": 5 }]);
    let case = |name, c| Case { name, product: "p", records: rec(c), per_record: true, expect: (200, &["Success"]) };
    answer_alike(&http, &c.ingest_url, &embedded, &case("before the close", 0)).await;
    close_both_modes(&c, &month.to_string());
    answer_alike(&http, &c.ingest_url, &embedded, &case("after the close: a correction", 1)).await;
    c.wait_for_records(2, Duration::from_secs(60)).await;
    let lines = c
        .query(
            "SELECT toString(month), charge_type, toString(customer_billed_amount), records \
             FROM {db}.monthly_charges FINAL ORDER BY month FORMAT TabSeparated",
        )
        .await;
    let expected = format!("{month}-01\tusage\t2.5\t1\n{}-01\tadjustment\t2.5\t1\n", month.next());
    assert_eq!(lines.replace(".500000000", ".5"), expected);
}

/// A call no rater decides in time gets 503 with `Retry-After`; its records are durable and
/// decided once a rater runs, and the seller's identical resend is answered with the same id,
/// charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_no_rater_decides_in_time_gets_503_and_its_resend_the_decision() {
    let mut c = Cluster::start("undecided", 2).await;
    c.kill("ingest");
    c.spawn_with("ingest", "ingest", &[("METERLINE__INGEST__DECISION_TIMEOUT_MS", "1500")]);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{}/health", c.ingest_url)).send().await.is_err() {
        assert!(Instant::now() < deadline, "ingest did not restart:\n{}", c.log("ingest"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.spawn("aggregator", "aggregator");
    let t = Timestamp(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64)
        .plus_millis(-HOUR_MS)
        .millis()
        / 1000;
    let body = json!({ "ProductCode": "p", "UsageRecords": [
        { "Timestamp": t, "CustomerAWSAccountId": account(0), "Dimension": "d1", "Quantity": 4 }
    ] })
    .to_string();
    let url = format!("{}/v1/BatchMeterUsage", c.ingest_url);
    let call = || {
        http.post(&url).header("X-Api-Key", KEY).header("Content-Type", "application/json").body(body.clone()).send()
    };
    // No rater: the broker takes the record, nobody decides it.
    let started = Instant::now();
    let r = call().await.unwrap();
    assert_eq!(r.status().as_u16(), 503, "{}", r.text().await.unwrap());
    assert!(started.elapsed() >= Duration::from_millis(1500), "answered before the decision timeout");
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("resend the same call"), "{v}");

    c.spawn("rater", "rater");
    let deadline = Instant::now() + Duration::from_secs(90);
    let first = loop {
        let r = call().await.unwrap();
        if r.status().is_success() {
            break r.json::<Value>().await.unwrap();
        }
        assert_eq!(r.status().as_u16(), 503);
        assert!(Instant::now() < deadline, "never decided:\n{}", c.log("rater"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(first["Results"][0]["Status"], "Success", "{first}");
    let again: Value = call().await.unwrap().json().await.unwrap();
    assert_eq!(again["Results"][0]["MeteringRecordId"], first["Results"][0]["MeteringRecordId"]);
    // Three sends of one record (the undecided one included): charged once.
    c.wait_for_records(1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.wait_for_records(1, Duration::from_secs(5)).await;
}

/// The `records=N` field of a log line.
fn records_field(line: &str) -> Option<u64> {
    let start = line.find(" records=")? + " records=".len();
    line[start..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Issue 15: a rater that lags lets its batches grow past the linger. 20 000 records wait on the
/// raw topic (`loadtest kafka`, encoded as ingest does) before the rater starts, with a 1 ms
/// linger: cut at the linger, a batch would hold the millisecond's worth of records a debug build
/// decides (tens), one serial transaction each; grown, batches fill to `max_batch` (2 000 in this
/// config) or their 500 ms age. Every record is in some committed batch, none is in two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_raters_batches_grow_past_the_linger() {
    const RECORDS: u64 = 20_000;
    let mut c = Cluster::start("backlog", 4).await;
    let out = Command::new(bin("loadtest"))
        .arg("kafka")
        .arg("--config")
        .arg(&c.config)
        // The scenario holds ~22 records per customer over its four hours: 2 000 customers cover
        // the 20 000.
        .args(["--customers", "2000", "--records", &RECORDS.to_string(), "--max-seconds", "120"])
        .output()
        .unwrap();
    assert!(out.status.success(), "loadtest kafka failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let produced: Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = produced["records"].as_u64().unwrap();
    assert!(records >= RECORDS * 9 / 10, "the backlog was not produced: {produced}");

    c.spawn_with("rater", "rater", &[("METERLINE__RATER__LINGER_MS", "1")]);
    let deadline = Instant::now() + Duration::from_secs(180);
    let batches = loop {
        let batches: Vec<u64> = log_lines(&c, "rater")
            .iter()
            .filter(|(_, l)| l.contains("batch committed"))
            .filter_map(|(_, l)| records_field(l))
            .collect();
        if batches.iter().sum::<u64>() >= records {
            break batches;
        }
        assert!(Instant::now() < deadline, "the backlog was not decided in 180 s:\n{}", c.log("rater"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let total: u64 = batches.iter().sum();
    let mean = total / batches.len() as u64;
    let max = batches.iter().copied().max().unwrap_or(0);
    eprintln!("backlog: {total} records in {} batches, mean {mean}, max {max}", batches.len());
    assert_eq!(total, records, "every record in exactly one committed batch: {batches:?}");
    assert!(max <= 2_000, "a batch exceeded max_batch: {batches:?}");
    // Tens of records per batch when cut at the linger; the bound leaves room for a debug build
    // on a loaded machine reaching a batch's 500 ms age before max_batch.
    assert!(mean >= 200, "batches stayed near the 1 ms linger's size (mean {mean}): {batches:?}");
}

/// The operator key of the catalogue test.
const OPERATOR_KEY: &str = "op-key-distributed";

/// One `BatchMeterUsage` record of product `p` for customer `cid-new` on `dimension` at `ts`
/// (seconds), sent with `key`: the HTTP status, the record's status and its message.
async fn meter_one(http: &reqwest::Client, url: &str, key: &str, dimension: &str, ts: i64) -> (u16, String, String) {
    let body = json!({ "ProductCode": "p", "UsageRecords": [
        { "Timestamp": ts, "CustomerIdentifier": "cid-new", "Dimension": dimension, "Quantity": 4 } ] });
    let r = http
        .post(format!("{url}/v1/BatchMeterUsage"))
        .header("X-Api-Key", key)
        .header("X-Meterline-Per-Record", "true")
        .json(&body)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or_default();
    let res = &v["Results"][0];
    let status = res["Status"].as_str().unwrap_or_default().to_owned();
    let why = res["Reason"].as_str().or(res["Message"].as_str()).or(v["message"].as_str()).unwrap_or_default();
    (code, status, why.to_owned())
}

async fn catalogue_change(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r =
        http.post(format!("{url}/v1/catalogue/changes")).bearer_auth(OPERATOR_KEY).json(&body).send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or_default())
}

/// Issue 16 in distributed mode: the catalogue changed through `ingest`'s operator API while the
/// three binaries run. Every stage follows the catalogue topic, with no restart: a customer
/// created is metered, rated and charged at once (its rated line names the new version), a key
/// added meters at once, a stale `if_version` is refused, an unsubscribe ends usage and its
/// final-records grace (5 s here) then ends the final records. (A price version applies from the
/// first hour starting at or after it: with a real clock that is up to an hour away, so the
/// notice rule is shown on the embedded server's manual clock, `operator_api`.) A restarted rater and a second ingest start from the topic, not the file; the
/// invoice preview served by the aggregator equals the close's draft; the audit log says who
/// changed what, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_changes_through_ingest_and_every_stage_follows_it_without_a_restart() {
    let operators = format!(
        "[[operators]]\nname = \"ops\"\nrole = \"operator\"\napi_key_sha256 = \"{}\"\n",
        hex::encode(sha2::Sha256::digest(OPERATOR_KEY.as_bytes()))
    );
    let grace_secs = 5;
    let mut c =
        Cluster::start_with_operators("catalogue", 2, Broker::start().await.unwrap(), Some(&operators), |doc| {
            doc.marketplace.final_records_grace = format!("{grace_secs}s");
        })
        .await;
    c.spawn("rater", "rater");
    let query_listen = format!("127.0.0.1:{}", testkit::free_port());
    c.spawn_with("aggregator", "aggregator", &[("METERLINE__AGGREGATOR__QUERY_LISTEN", query_listen.as_str())]);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let url = c.ingest_url.clone();
    let now_secs = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let hour_start = Timestamp::from_millis(now_secs() * 1000).hour().start();
    // Usage of this hour, `back` seconds ago (each dimension once: one hour slot each).
    let ts = |back: i64| (now_secs() - back).max(hour_start.millis() / 1000);

    // Before: the customer does not exist, ingest refuses its usage by name.
    let (_, status, why) = meter_one(&http, &url, KEY, "d1", ts(1)).await;
    assert_ne!(status, "Success", "{why}");

    // A customer and its agreement, from the top of this hour: in force at once in every stage.
    let (code, v) = catalogue_change(
        &http,
        &url,
        json!({ "if_version": "crash-test", "changes": [
            { "op": "put_customer", "customer": { "id": "c-new", "name": "New Co", "customer_identifier": "cid-new" } },
            { "op": "subscribe", "agreement": { "id": "a-new", "customer": "c-new", "product": "p", "offer": "o",
              "start": hour_start.to_string() } },
        ] }),
    )
    .await;
    assert_eq!(code, 200, "{v}\n{}", c.log("ingest"));
    assert_eq!(v["version"], "crash-test+1", "{v}");
    // The call is answered once the rater decided it: the rater knew the customer.
    let (code, status, why) = meter_one(&http, &url, KEY, "d1", ts(1)).await;
    assert_eq!((code, status.as_str()), (200, "Success"), "{why}\nrater:\n{}", c.log("rater"));
    c.wait_for_records(1, Duration::from_secs(60)).await;
    let rated = c.query("SELECT customer, price_book_version FROM {db}.rated_usage FINAL FORMAT TabSeparated").await;
    assert_eq!(rated.trim(), "c-new\tcrash-test+1", "each rated record names the catalogue version it was rated with");

    // A stale version is refused and changes nothing.
    let (code, v) = catalogue_change(
        &http,
        &url,
        json!({ "if_version": "crash-test", "changes": [
            { "op": "put_customer", "customer": { "id": "c-stale", "name": "Stale" } } ] }),
    )
    .await;
    assert_eq!(code, 409, "{v}");

    // A key added through the API meters at once (ingest rebuilt its keys from the new book).
    let new_key = "crash-test-key-2";
    let (code, v) = catalogue_change(
        &http,
        &url,
        json!({ "changes": [{ "op": "add_api_key", "seller": "s1",
            "api_key_sha256": hex::encode(sha2::Sha256::digest(new_key.as_bytes())) }] }),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let (code, status, why) = meter_one(&http, &url, new_key, "d2", ts(1)).await;
    assert_eq!((code, status.as_str()), (200, "Success"), "{why}");
    c.wait_for_records(2, Duration::from_secs(60)).await;

    // A restarted rater and a second ingest read the catalogue from the topic, not the file:
    // the new customer's usage is still taken and rated.
    c.kill("rater");
    c.spawn("rater", "rater");
    let port2 = testkit::free_port();
    let listen = format!("127.0.0.1:{port2}");
    c.spawn_with("ingest2", "ingest", &[("METERLINE__INGEST__LISTEN", listen.as_str())]);
    let url2 = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{url2}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "ingest2 did not start:\n{}", c.log("ingest2"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, status, why) = meter_one(&http, &url2, new_key, "d3", ts(1)).await;
    assert_eq!((code, status.as_str()), (200, "Success"), "{why}\nrater:\n{}", c.log("rater"));
    c.wait_for_records(3, Duration::from_secs(60)).await;

    // An unsubscribe through the second ingest, 2 s from now: in force in the first one too.
    let end = now_secs() + 2;
    let (code, v) = catalogue_change(
        &http,
        &url2,
        json!({ "changes": [{ "op": "unsubscribe", "agreement": "a-new",
            "at": Timestamp::from_millis(end * 1000).to_string() }] }),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    while now_secs() <= end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Inside the grace: a final record from before the end is taken.
    let (_, status, why) = meter_one(&http, &url, KEY, "t0", end - 1).await;
    assert_eq!(status, "Success", "a final record inside the grace: {why}");
    // Usage after the end is refused, naming why.
    let (_, status, why) = meter_one(&http, &url, KEY, "d0", end + 1).await;
    assert!(status != "Success" && why.contains("ended"), "usage after the end: {status} {why}");
    // After the grace, a final record is refused too, naming the deadline.
    while now_secs() <= end + grace_secs {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, status, why) = meter_one(&http, &url, KEY, "d0", end - 1).await;
    assert!(status != "Success" && why.contains("final records were due by"), "after the grace: {status} {why}");
    c.wait_for_records(4, Duration::from_secs(60)).await;

    // The invoice preview the aggregator serves is the close's draft, line for line.
    let month = Timestamp::from_millis(end * 1000).month().to_string();
    let preview: Value = http
        .get(format!("http://{query_listen}/v1/customers/c-new/invoice-preview?month={month}"))
        .header("X-Api-Key", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let out = Command::new(bin("aggregator"))
        .args(["--config", c.config.to_str().unwrap(), "close", "--month", &month, "--draft", "--out-dir"])
        .arg(c.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let draft: Value = serde_json::from_str(
        &std::fs::read_to_string(c.dir.path().join(format!("invoice-lines-{month}.draft.json"))).unwrap(),
    )
    .unwrap();
    let drafted: Vec<&Value> = draft["lines"].as_array().unwrap().iter().filter(|l| l["customer"] == "c-new").collect();
    let previewed: Vec<&Value> = preview["lines"].as_array().unwrap().iter().collect();
    assert!(!previewed.is_empty(), "{preview}");
    assert_eq!(previewed, drafted, "the preview is the close's draft");

    // The audit log: every change, in order, with who made it.
    let audit: Value = http
        .get(format!("{url}/v1/catalogue/audit"))
        .bearer_auth(OPERATOR_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = audit["entries"].as_array().unwrap();
    let versions: Vec<&str> = entries.iter().map(|e| e["version"].as_str().unwrap()).collect();
    assert_eq!(versions, ["crash-test+1", "crash-test+2", "crash-test+3"], "{audit}");
    assert!(entries.iter().all(|e| e["actor"] == "ops"), "{audit}");
}
