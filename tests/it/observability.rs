//! What an operator runs Meterline from, tested against real servers:
//!
//! - `prometheus_scrapes_the_embedded_pipeline_and_the_key_series_match_the_input`: a real
//!   Prometheus (Debian's package, started on loopback by `testkit`) scrapes `meterline serve`
//!   while a known input is posted; the key series equal what the input implies, every dashboard
//!   query runs on that Prometheus, every alert rule loads and evaluates healthily, and SIGTERM
//!   drains and exits 0 with logs that trace the rejection by record id and never show the key.
//! - `prometheus_scrapes_the_distributed_binaries_and_sigterm_drains_them`: the same against
//!   `ingest`, `rater` and `aggregator` on a real Apache Kafka and ClickHouse, including
//!   ClickHouse rows, commits and consumer lag, then SIGTERM to each stage.
//! - `dashboards_and_alerts_name_only_metrics_that_exist`: every metric named by a dashboard or an
//!   alert is one of `common::metrics`; every alert has a runbook entry and a unit test.
//! - `compose_file_and_manifests_parse_and_wire_the_stack`: `deploy/compose.yaml` and
//!   `deploy/k8s/*.yaml` parse, and the configuration they carry loads.
//!   (No container engine runs here: the files are parsed and checked, not started.)

use crate::fixtures::{price_book, KEY, RATES};
use ::common::catalogue::PriceBook;
use ::common::config::PipelineConfig;
use ::common::metrics::Metrics;
use ::common::time::{Timestamp, HOUR_MS};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::{Job, Prometheus};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn now() -> Timestamp {
    Timestamp(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64)
}

/// Runs an instant query; returns the result vector.
async fn query(http: &reqwest::Client, prom: &Prometheus, q: &str) -> Result<Vec<Value>, String> {
    let resp = http
        .get(format!("{}/api/v1/query", prom.url()))
        .query(&[("query", q)])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(format!("{q}: {v}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The single value of `q` (a query that sums to one series), once it equals `want` (Prometheus
/// scrapes every second; give it up to 30 s).
async fn eventually(http: &reqwest::Client, prom: &Prometheus, q: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last: String;
    loop {
        match query(http, prom, q).await {
            Ok(r) if r.len() == 1 => {
                let got: f64 = r[0]["value"][1].as_str().unwrap_or("NaN").parse().unwrap_or(f64::NAN);
                // Only the revenue counter is a float of an exact sum; 1e-9 relative is far below a cent.
                if (got - want).abs() <= want.abs() * 1e-9 {
                    return;
                }
                last = format!("{got}");
            }
            Ok(r) => last = format!("{} series: {r:?}", r.len()),
            Err(e) => last = e,
        }
        assert!(Instant::now() < deadline, "`{q}` never became {want}; last: {last}\n{}", prom.log_tail());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every dashboard query, with Grafana's variables replaced by what Prometheus accepts.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo("deploy/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut exprs = Vec::new();
        collect_exprs(&v, &mut exprs);
        assert!(!exprs.is_empty(), "{} has no queries", path.display());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        out.extend(exprs.into_iter().map(|e| (name.clone(), e)));
    }
    out
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// Every alert rule of `deploy/prometheus/alerts.yml`: (name, expr, runbook annotation).
fn alert_rules() -> Vec<(String, String, String)> {
    let y: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap()).unwrap();
    let mut out = Vec::new();
    for g in y["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            out.push((
                r["alert"].as_str().unwrap().to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
                r["annotations"]["runbook"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    out
}

/// `meterline_*` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("meterline_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// Every query a dashboard or alert can run evaluates without error on `prom`.
async fn every_query_runs(http: &reqwest::Client, prom: &Prometheus) {
    let mut queries: Vec<(String, String)> = dashboard_queries();
    queries.extend(alert_rules().into_iter().map(|(n, e, _)| (n, e)));
    for (source, q) in queries {
        let q = q.replace("$__rate_interval", "1m").replace("$seller", ".*");
        if let Err(e) = query(http, prom, &q).await {
            panic!("{source}: query does not run on a real Prometheus: {e}");
        }
    }
}

/// Waits until every alert rule was evaluated and none is unhealthy.
async fn rules_are_healthy(http: &reqwest::Client, prom: &Prometheus) {
    let want = alert_rules().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = http.get(format!("{}/api/v1/rules", prom.url())).send().await.unwrap().json().await.unwrap();
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let bad: Vec<&Value> = rules.iter().filter(|r| r["health"] != "ok").collect();
        if rules.len() == want && bad.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "alert rules not all loaded and healthy: {} of {want}, unhealthy: {bad:?}",
            rules.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A known input and what it must count: two calls covering every (customer, dimension) of one
/// hour, one identical resend, one conflicting record, and three invalid records.
struct Input {
    calls: Vec<Vec<Value>>,
    /// Records of the first covering call (resent identically).
    revenue: Decimal,
    /// Distinct (customer, dimension) slots rated.
    slots: u64,
}

const CUSTOMERS: usize = 10;

fn known_input() -> Input {
    let hour = Timestamp(now().millis() - HOUR_MS).hour().start();
    let ts = (hour.millis() + 10 * 60_000) / 1000;
    let mut records = Vec::new();
    let mut revenue = Decimal::ZERO;
    for c in 0..CUSTOMERS {
        for (i, (dim, rate)) in RATES.iter().enumerate() {
            let q = (c * 7 + i * 3 + 1) as i64;
            revenue += Decimal::from(q) * rate.parse::<Decimal>().unwrap();
            records.push(
                json!({ "Timestamp": ts, "CustomerAWSAccountId": crate::fixtures::account(c), "Dimension": dim, "Quantity": q }),
            );
        }
    }
    let first: Vec<Value> = records[..25].to_vec();
    let second: Vec<Value> = records[25..].to_vec();
    let conflicting = vec![
        json!({ "Timestamp": ts, "CustomerAWSAccountId": crate::fixtures::account(0), "Dimension": "d0", "Quantity": 999_999 }),
    ];
    let invalid = vec![
        json!({ "Timestamp": ts, "CustomerAWSAccountId": crate::fixtures::account(1), "Dimension": "nope", "Quantity": 1 }),
        json!({ "Timestamp": ts, "CustomerAWSAccountId": crate::fixtures::account(2), "Dimension": "nope", "Quantity": 1 }),
        json!({ "Timestamp": ts - 2 * 86_400, "CustomerAWSAccountId": crate::fixtures::account(3), "Dimension": "d1", "Quantity": 1 }),
    ];
    Input {
        calls: vec![first.clone(), second, first, conflicting, invalid],
        revenue,
        slots: (CUSTOMERS * RATES.len()) as u64,
    }
}

/// Posts the input; returns the MeteringRecordId of the conflicting record.
async fn post_input(http: &reqwest::Client, url: &str, input: &Input) -> String {
    let mut conflict_id = String::new();
    for (i, recs) in input.calls.iter().enumerate() {
        let body = json!({ "ProductCode": "p", "UsageRecords": recs }).to_string();
        // The distributed ingest may answer 503 until the broker has the topics: retry.
        let deadline = Instant::now() + Duration::from_secs(60);
        let v: Value = loop {
            // Per-record answers (the documented opt-in): the last call mixes invalid records in.
            let r = http
                .post(format!("{url}/v1/BatchMeterUsage"))
                .header("X-Api-Key", KEY)
                .header("X-Meterline-Per-Record", "true")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            if r.status().is_success() {
                break r.json().await.unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "call {i} refused: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        if i == 3 {
            conflict_id = v["Results"][0]["MeteringRecordId"].as_str().unwrap_or_default().to_owned();
        }
    }
    conflict_id
}

/// The series every mode must show after [`known_input`].
async fn check_key_series(http: &reqwest::Client, prom: &Prometheus, input: &Input, binaries: f64) {
    let rec = |m: &str, stage: &str| format!("sum({m}{{stage=\"{stage}\",seller=\"s1\",product=\"p\"}})");
    let n_calls = input.calls.len() as f64;
    let received: f64 = input.calls.iter().map(|c| c.len() as f64).sum();
    eventually(http, prom, "sum(up)", binaries).await;
    // Ingest: everything received, the three invalid records rejected by reason.
    eventually(http, prom, &rec("meterline_records_received_total", "ingest"), received).await;
    eventually(http, prom, &rec("meterline_records_accepted_total", "ingest"), received - 3.0).await;
    eventually(
        http,
        prom,
        "sum(meterline_records_rejected_total{stage=\"ingest\",reason=\"InvalidUsageDimension\"})",
        2.0,
    )
    .await;
    eventually(
        http,
        prom,
        "sum(meterline_records_rejected_total{stage=\"ingest\",reason=\"TimestampOutOfBounds\"})",
        1.0,
    )
    .await;
    // Rater: each slot rated once, the resend recognised, the conflict refused.
    eventually(http, prom, &rec("meterline_records_received_total", "rater"), received - 3.0).await;
    eventually(http, prom, &rec("meterline_records_accepted_total", "rater"), input.slots as f64).await;
    eventually(http, prom, &rec("meterline_records_duplicate_total", "rater"), 25.0).await;
    eventually(http, prom, &rec("meterline_records_conflicting_total", "rater"), 1.0).await;
    eventually(http, prom, "sum(meterline_records_rejected_total{stage=\"rater\"}) or vector(0)", 0.0).await;
    eventually(
        http,
        prom,
        "sum(meterline_rated_amount_total{currency=\"USD\"})",
        input.revenue.to_string().parse().unwrap(),
    )
    .await;
    eventually(http, prom, "sum(meterline_dedup_keys{stage=\"rater\"})", input.slots as f64).await;
    eventually(
        http,
        prom,
        "sum(meterline_dedup_state_bytes{stage=\"rater\"})",
        (input.slots as i64 * ::common::metrics::DEDUP_BYTES_PER_KEY) as f64,
    )
    .await;
    // Every call answered 200, each observed once by the ack-latency histogram.
    eventually(
        http,
        prom,
        "sum(meterline_http_request_duration_seconds_count{path=\"/v1/BatchMeterUsage\",code=\"200\"})",
        n_calls,
    )
    .await;
    eventually(http, prom, "sum(meterline_ingest_in_flight_records)", 0.0).await;
    eventually(http, prom, "count(meterline_build_info == 1)", binaries).await;
    // Latency histograms saw every decided record.
    eventually(http, prom, "sum(meterline_received_to_rated_seconds_count{stage=\"rater\"})", received - 3.0).await;
}

fn start_serve(book: &Path, data: &Path, log: &Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meterline"))
        .args(["serve", "--listen", "127.0.0.1:0", "--price-book"])
        .arg(book)
        .arg("--data-dir")
        .arg(data)
        // Debug: the per-rejection lines must carry record ids and never the API key.
        .env("RUST_LOG", "warn,meterline=debug,ingest=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("starting meterline serve");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the first line names the address")
        .to_owned();
    (child, url)
}

/// Sends SIGTERM to `child` and waits (bounded) for a clean exit.
fn sigterm_and_wait(child: &mut Child, name: &str, log: &str) {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{name} exited with {status} after SIGTERM:\n{log}");
            return;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("{name} did not exit within 30 s of SIGTERM:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_embedded_pipeline_and_the_key_series_match_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let book_path = dir.path().join("price-book.toml");
    std::fs::write(&book_path, PriceBook::new(price_book(CUSTOMERS)).unwrap().to_toml().unwrap()).unwrap();
    let log = dir.path().join("serve.log");
    let (mut child, url) = start_serve(&book_path, &dir.path().join("data"), &log);
    let addr = url.trim_start_matches("http://").to_owned();
    let prom = Prometheus::start(
        &[Job { name: "meterline".into(), targets: vec![addr] }],
        &[repo("deploy/prometheus/alerts.yml")],
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    for probe in ["/health", "/ready", "/metrics"] {
        assert_eq!(http.get(format!("{url}{probe}")).send().await.unwrap().status(), 200, "{probe}");
    }

    let input = known_input();
    let conflict_id = post_input(&http, &url, &input).await;
    check_key_series(&http, &prom, &input, 1.0).await;
    eventually(
        &http,
        &prom,
        "sum(meterline_batch_records_sum{stage=\"rater\"})",
        input.calls.iter().map(|c| c.len() as f64).sum(),
    )
    .await;
    eventually(&http, &prom, "sum(meterline_commits_total{kind=\"sqlite_group_commit\"}) >= bool 1", 1.0).await;
    eventually(&http, &prom, "sum(meterline_commit_failures_total) or vector(0)", 0.0).await;
    every_query_runs(&http, &prom).await;
    rules_are_healthy(&http, &prom).await;

    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    sigterm_and_wait(&mut child, "meterline serve", &text());
    let logs = text();
    assert!(logs.contains("shutdown requested"), "{logs}");
    assert!(!conflict_id.is_empty());
    assert!(
        logs.lines().any(|l| l.contains("record refused") && l.contains(&conflict_id)),
        "the conflicting record's refusal is logged with its id {conflict_id}:\n{logs}"
    );
    assert!(logs.lines().filter(|l| l.contains("group commit")).count() >= 1, "one line per group commit:\n{logs}");
    assert!(!logs.contains(KEY), "the API key reached a log line");
}

#[test]
fn dashboards_and_alerts_name_only_metrics_that_exist() {
    let m = Metrics::new("test");
    let known: BTreeSet<String> = m.names().iter().cloned().collect();
    let exists = |name: &str| {
        known.contains(name)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|base| known.contains(base)))
    };
    let mut used = BTreeSet::new();
    for (source, expr) in dashboard_queries().into_iter().chain(alert_rules().into_iter().map(|(n, e, _)| (n, e))) {
        let names = metric_names(&expr);
        assert!(!names.is_empty() || expr.contains("up{"), "{source}: `{expr}` names no Meterline metric");
        for n in names {
            assert!(exists(&n), "{source}: `{n}` is not a Meterline metric (common/src/metrics.rs)");
            used.insert(n);
        }
    }
    // The dashboards use the provisioned datasource.
    let ds: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/provisioning/datasources/prometheus.yml")).unwrap(),
    )
    .unwrap();
    let uid = ds["datasources"][0]["uid"].as_str().unwrap();
    for entry in std::fs::read_dir(repo("deploy/grafana/dashboards")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(text.contains(&format!("\"uid\": \"{uid}\"")));
    }
    // Every alert has a runbook entry and a unit test.
    let runbook = std::fs::read_to_string(repo("docs/runbook.md")).unwrap().to_lowercase();
    let tests = std::fs::read_to_string(repo("deploy/prometheus/alerts.test.yml")).unwrap();
    for (name, _, link) in alert_rules() {
        assert_eq!(link, format!("docs/runbook.md#{}", name.to_lowercase()), "{name}'s runbook link");
        assert!(runbook.contains(&format!("## {}", name.to_lowercase())), "docs/runbook.md has no `## {name}` entry");
        assert!(tests.contains(&format!("alertname: {name}")), "alerts.test.yml does not test {name}");
    }
    eprintln!("{} metric families, {} used by dashboards and alerts", known.len(), used.len());
}

#[test]
fn compose_file_and_manifests_parse_and_wire_the_stack() {
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo("deploy/compose.yaml")).unwrap()).unwrap();
    let services = compose["services"].as_mapping().unwrap();
    for s in ["kafka", "clickhouse", "prometheus", "grafana", "ingest", "rater", "aggregator"] {
        assert!(services.contains_key(s), "compose has no `{s}` service");
    }
    let kafka_env = serde_yaml::to_string(&compose["services"]["kafka"]["environment"]).unwrap();
    assert!(
        kafka_env.contains("KAFKA_PROCESS_ROLES") && kafka_env.contains("controller"),
        "Kafka runs in KRaft mode: {kafka_env}"
    );
    assert!(!kafka_env.contains("ZOOKEEPER"), "no ZooKeeper");
    // The compose broker takes the test broker's settings: every key of deploy/kafka/broker.properties
    // appears as KAFKA_<KEY> with the same value, and the image is the version testkit runs.
    let env = compose["services"]["kafka"]["environment"].as_mapping().unwrap();
    for line in testkit::broker::SHARED_SETTINGS.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (key, value) = line.split_once('=').unwrap();
        let var = format!("KAFKA_{}", key.replace('.', "_").to_uppercase());
        let got = env.get(serde_yaml::Value::from(var.as_str())).map(|v| match v {
            serde_yaml::Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
        });
        assert_eq!(
            got.as_deref(),
            Some(value),
            "compose's kafka sets {var} as deploy/kafka/broker.properties sets {key}"
        );
    }
    let image = compose["services"]["kafka"]["image"].as_str().unwrap();
    assert_eq!(image, format!("apache/kafka:{}", testkit::bins::KAFKA_VERSION), "compose runs the Kafka the tests run");
    let grafana = serde_yaml::to_string(&compose["services"]["grafana"]["volumes"]).unwrap();
    assert!(grafana.contains("grafana/dashboards") && grafana.contains("grafana/provisioning"), "{grafana}");
    // The configuration the compose stack and the manifests mount loads and serves metrics
    // where Prometheus scrapes them.
    let compose_cfg =
        PipelineConfig::from_toml(&std::fs::read_to_string(repo("deploy/compose/meterline.toml")).unwrap()).unwrap();
    let prom_cfg = std::fs::read_to_string(repo("deploy/prometheus/prometheus.yml")).unwrap();
    assert!(prom_cfg.contains(&format!("\"ingest:{}\"", compose_cfg.ingest.listen.rsplit(':').next().unwrap())));
    for listen in [&compose_cfg.rater.metrics_listen, &compose_cfg.aggregator.metrics_listen] {
        let port = listen.as_deref().expect("metrics_listen set").rsplit(':').next().unwrap();
        assert!(prom_cfg.contains(&format!(":{port}\"")), "prometheus.yml scrapes port {port}");
    }

    let mut deployments = BTreeSet::new();
    for entry in std::fs::read_dir(repo("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let kind = v["kind"].as_str().unwrap_or_default();
            if kind == "ConfigMap" {
                if let Some(toml) = v["data"]["meterline.toml"].as_str() {
                    let cfg = PipelineConfig::from_toml(toml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert!(cfg.rater.metrics_listen.is_some() && cfg.aggregator.metrics_listen.is_some());
                }
            }
            if kind == "Deployment" {
                let name = v["metadata"]["name"].as_str().unwrap().to_owned();
                let pod = &v["spec"]["template"]["spec"];
                assert!(
                    pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(0) >= 30,
                    "{name}: time to finish a batch"
                );
                let c = &pod["containers"][0];
                for probe in ["livenessProbe", "readinessProbe"] {
                    assert!(c[probe]["httpGet"]["path"].is_string(), "{name} has no {probe}");
                }
                assert!(
                    c["resources"]["requests"]["cpu"].is_string() && c["resources"]["requests"]["memory"].is_string(),
                    "{name} requests"
                );
                assert!(
                    v["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true",
                    "{name} is scraped"
                );
                deployments.insert(name);
            }
        }
    }
    assert_eq!(
        deployments,
        ["meterline-aggregator", "meterline-ingest", "meterline-rater"].map(String::from).into_iter().collect()
    );
}

/// The distributed binaries' path (built by `cargo build --workspace --all-features`).
fn stage_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the distributed binaries first (cargo build --workspace --all-features)",
        p.display()
    );
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_distributed_binaries_and_sigterm_drains_them() {
    let dir = tempfile::tempdir().unwrap();
    let broker = testkit::Broker::start().await.unwrap();
    let clickhouse = testkit::ClickHouse::start().await.unwrap();
    let (db, _) = clickhouse.database("obs").await.unwrap();
    let book_path = dir.path().join("price-book.toml");
    std::fs::write(&book_path, PriceBook::new(price_book(CUSTOMERS)).unwrap().to_toml().unwrap()).unwrap();
    let (ingest_port, rater_port, aggregator_port) = (testkit::free_port(), testkit::free_port(), testkit::free_port());
    let config = dir.path().join("meterline.toml");
    std::fs::write(
        &config,
        format!(
            r#"price_book = "{book}"
[kafka]
bootstrap = "{bootstrap}"
partitions = 4
session_timeout_ms = 6000
[kafka.topics]
raw = "{raw}"
rated = "{rated}"
rejected = "{rejected}"
dead_letter = "{dead}"
decisions = "{decisions}"
closed_months = "{closed}"
[clickhouse]
url = "{ch}"
database = "{db}"
[ingest]
listen = "127.0.0.1:{ingest_port}"
[rater]
group = "{rg}"
linger_ms = 100
metrics_listen = "127.0.0.1:{rater_port}"
[aggregator]
group = "{ag}"
flush_interval_ms = 300
metrics_listen = "127.0.0.1:{aggregator_port}"
"#,
            book = book_path.display(),
            bootstrap = broker.bootstrap(),
            raw = broker.topic("raw"),
            rated = broker.topic("rated"),
            rejected = broker.topic("rejected"),
            dead = broker.topic("dead"),
            decisions = broker.topic("decisions"),
            closed = broker.topic("closed"),
            ch = clickhouse.url(),
            rg = broker.group("rater"),
            ag = broker.group("aggregator"),
        ),
    )
    .unwrap();
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let mut procs: Vec<(&str, Child)> = Vec::new();
    for (name, args) in [("ingest", vec![]), ("rater", vec![]), ("aggregator", vec!["run"])] {
        let child = Command::new(stage_bin(name))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", format!("warn,{name}=info"))
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log(name)).unwrap())
            .spawn()
            .unwrap();
        procs.push((name, child));
    }
    let text = |name: &str| std::fs::read_to_string(log(name)).unwrap_or_default();
    let http = reqwest::Client::new();
    // Every stage answers its probes once it works.
    for (name, port) in [("ingest", ingest_port), ("rater", rater_port), ("aggregator", aggregator_port)] {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ok =
                matches!(http.get(format!("http://127.0.0.1:{port}/ready")).send().await, Ok(r) if r.status() == 200);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "{name} never became ready:\n{}", text(name));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(http.get(format!("http://127.0.0.1:{port}/health")).send().await.unwrap().status(), 200);
    }
    let jobs: Vec<Job> =
        [("meterline-ingest", ingest_port), ("meterline-rater", rater_port), ("meterline-aggregator", aggregator_port)]
            .iter()
            .map(|(n, p)| Job { name: (*n).into(), targets: vec![format!("127.0.0.1:{p}")] })
            .collect();
    let prom = Prometheus::start(&jobs, &[repo("deploy/prometheus/alerts.yml")]).await.unwrap();

    let input = known_input();
    post_input(&http, &format!("http://127.0.0.1:{ingest_port}"), &input).await;
    check_key_series(&http, &prom, &input, 3.0).await;
    let slots = input.slots as f64;
    // The aggregator folded each slot once and wrote it; the rejections reached their table.
    eventually(&http, &prom, "sum(meterline_records_accepted_total{stage=\"aggregator\"})", slots).await;
    eventually(&http, &prom, "sum(meterline_clickhouse_rows_written_total{table=\"rated_usage\"})", slots).await;
    eventually(&http, &prom, "sum(meterline_clickhouse_rows_written_total{table=\"rejected_records\"})", 4.0).await;
    eventually(&http, &prom, "sum(meterline_clickhouse_rows_written_total{table=\"monthly_charges\"}) >= bool 40", 1.0)
        .await;
    eventually(&http, &prom, "sum(meterline_rated_to_clickhouse_seconds_count)", slots).await;
    eventually(
        &http,
        &prom,
        "sum(meterline_clickhouse_insert_duration_seconds_count{table=\"rated_usage\"}) >= bool 1",
        1.0,
    )
    .await;
    eventually(&http, &prom, "sum(meterline_clickhouse_insert_errors_total) or vector(0)", 0.0).await;
    // Commits of each kind happened; none failed.
    for (stage, kind) in
        [("rater", "kafka_transaction"), ("aggregator", "clickhouse_flush"), ("aggregator", "kafka_offsets")]
    {
        eventually(
            &http,
            &prom,
            &format!("sum(meterline_commits_total{{stage=\"{stage}\",kind=\"{kind}\"}}) >= bool 1"),
            1.0,
        )
        .await;
    }
    eventually(&http, &prom, "sum(meterline_commit_failures_total) or vector(0)", 0.0).await;
    eventually(&http, &prom, "sum(meterline_kafka_delivery_errors_total) or vector(0)", 0.0).await;
    eventually(&http, &prom, "count(meterline_kafka_producer_queue_messages)", 2.0).await;
    eventually(
        &http,
        &prom,
        "sum(meterline_batch_records_sum{stage=\"rater\"})",
        input.calls.iter().map(|c| c.len() as f64).sum::<f64>() - 3.0,
    )
    .await;
    // Consumer lag is reported per partition and drains to zero once everything is committed.
    eventually(&http, &prom, "count(meterline_consumer_lag_records{stage=\"rater\"})", 4.0).await;
    eventually(&http, &prom, "sum(meterline_consumer_lag_records{stage=\"rater\"})", 0.0).await;
    eventually(&http, &prom, "count(meterline_consumer_lag_records{stage=\"aggregator\"})", 4.0).await;
    eventually(&http, &prom, "sum(meterline_consumer_lag_records{stage=\"aggregator\"})", 0.0).await;
    every_query_runs(&http, &prom).await;
    rules_are_healthy(&http, &prom).await;

    // SIGTERM the rater while a burst arrives: it finishes its batch, commits and exits 0. A new
    // rater then decides only what the old one had not: nothing is decided twice. The burst's
    // calls wait for their decisions meanwhile (distributed ingest answers with the rater's).
    let burst = burst_input();
    let burst_len = burst.len() as u64;
    let url = format!("http://127.0.0.1:{ingest_port}");
    let poster = tokio::spawn({
        let http = http.clone();
        async move { post_calls(&http, &url, &burst).await }
    });
    // Stop it once it is deciding the burst (its batches linger 100 ms: most likely mid-batch).
    let already = (input.calls.iter().map(|c| c.len()).sum::<usize>() - 3) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rater_received(&http, rater_port).await <= already {
        assert!(Instant::now() < deadline, "the rater never started on the burst:\n{}", text("rater"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rater = procs.iter_mut().find(|(n, _)| *n == "rater").unwrap();
    sigterm_and_wait(&mut rater.1, "rater", &text("rater"));
    let first = text("rater");
    assert!(first.contains("rater stopped: last batch committed"), "{first}");
    let decided_before = decided_in(&first);
    rater.1 = Command::new(stage_bin("rater"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn,rater=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log("rater2")).unwrap())
        .spawn()
        .unwrap();
    // The burst's calls are answered once a rater decides their records: the new one does.
    poster.await.unwrap();
    let total = input.slots + burst_len;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let q = format!("SELECT sum(records) FROM {db}.monthly_charges FINAL");
        let n: u64 = clickhouse.query_text(&q).await.unwrap().trim().parse().unwrap_or(0);
        if n == total {
            break;
        }
        assert!(
            n < total && Instant::now() < deadline,
            "{n} of {total} records folded:\n{}\n{}",
            text("rater2"),
            text("aggregator")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let decided_after = rater_received(&http, rater_port).await;
    let raw_records = input.calls.iter().map(|c| c.len() as u64).sum::<u64>() - 3 + burst_len;
    eprintln!("rater decided {decided_before} records before SIGTERM, its successor {decided_after}, of {raw_records}");
    assert_eq!(
        decided_before + decided_after,
        raw_records,
        "a gracefully stopped rater left nothing decided uncommitted"
    );

    // SIGTERM: each stage finishes its work, commits and exits 0.
    for (name, child) in procs.iter_mut().rev() {
        sigterm_and_wait(child, name, &text(name));
    }
    assert!(text("rater2").contains("rater stopped: last batch committed"), "{}", text("rater2"));
    assert!(text("aggregator").contains("everything read is in ClickHouse"), "{}", text("aggregator"));
    assert!(text("ingest").contains("ingest stopped: producer flushed"), "{}", text("ingest"));
    assert!(text("rater").contains("batch committed"), "one line per batch:\n{}", text("rater"));
    assert!(text("aggregator").contains("flushed to ClickHouse"), "one line per flush:\n{}", text("aggregator"));
    for name in ["ingest", "rater", "aggregator"] {
        assert!(!text(name).contains(KEY), "the API key reached {name}'s log");
    }
}

/// Records of the 2nd to 5th hour before this one, one per (customer, dimension) and hour.
fn burst_input() -> Vec<Value> {
    let mut out = Vec::new();
    for h in 2..=5 {
        let ts = (Timestamp(now().millis() - h * HOUR_MS).hour().start().millis() + 10 * 60_000) / 1000;
        for c in 0..CUSTOMERS {
            for (dim, _) in RATES {
                out.push(json!({ "Timestamp": ts, "CustomerAWSAccountId": crate::fixtures::account(c), "Dimension": dim, "Quantity": 2 }));
            }
        }
    }
    out
}

/// Posts `records` in calls of 10, 50 ms apart (a trickle that keeps the rater mid-batch), each
/// until it is answered 200.
async fn post_calls(http: &reqwest::Client, url: &str, records: &[Value]) {
    for chunk in records.chunks(10) {
        post_input(http, url, &Input { calls: vec![chunk.to_vec()], revenue: Decimal::ZERO, slots: 0 }).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `meterline_records_received_total` of the rater listening on `port`, read from its /metrics.
async fn rater_received(http: &reqwest::Client, port: u16) -> u64 {
    let Ok(r) = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await else { return 0 };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("meterline_records_received_total{") && l.contains("stage=\"rater\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// `decided` of the rater's last `rater stopped` line.
fn decided_in(log: &str) -> u64 {
    let line = log.lines().rev().find(|l| l.contains("rater stopped")).expect("a `rater stopped` line");
    let tail = &line[line.find("decided: ").expect("stats with `decided`") + 9..];
    tail[..tail.find(|c: char| !c.is_ascii_digit()).unwrap()].parse().unwrap()
}
