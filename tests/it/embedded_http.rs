//! The embedded mode's HTTP API, driven over loopback like seller code drives it.
//!
//! Each test starts the real server (router + SQLite writer) on a free port with a manual clock,
//! posts AWS-shaped JSON with `reqwest`, and checks the answers and the store. The AWS routes
//! answer as AWS by default; tests of per-record isolation send the documented opt-in header.

use common::catalogue::PriceBook;
use common::time::Timestamp;
use ingest::clock::{Clock, ManualClock};
use meterline::server::serve;
use meterline::store::Store;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

const BOOK: &str = include_str!("../../docs/examples/price-book.toml");
const ACME: &str = "demo-key-acme";
const GLOBEX: &str = "demo-key-globex";

struct Server {
    url: String,
    clock: Arc<ManualClock>,
    db: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<meterline::pipeline::WriterStats>>,
    http: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    async fn start(dir: tempfile::TempDir, now: &str) -> Server {
        let db = dir.path().join("meterline.db");
        let mut s = Server::start_at(db, now, 500_000).await;
        s._dir = Some(dir);
        s
    }

    async fn start_at(db: PathBuf, now: &str, max_in_flight: usize) -> Server {
        Server::start_with(db, BOOK, now, max_in_flight).await
    }

    async fn start_with(db: PathBuf, book: &str, now: &str, max_in_flight: usize) -> Server {
        let book = Arc::new(PriceBook::from_toml(book).unwrap());
        let clock = Arc::new(ManualClock::new(Timestamp::parse_rfc3339(now).unwrap()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let (db, clock) = (db.clone(), Arc::clone(&clock) as Arc<dyn Clock>);
            async move {
                serve(listener, &db, book, clock, max_in_flight, async {
                    rx.await.ok();
                })
                .await
            }
        });
        Server { url, clock, db, stop: Some(tx), task, http: reqwest::Client::new(), _dir: None }
    }

    async fn stop(mut self) -> (PathBuf, Option<tempfile::TempDir>) {
        self.stop.take().unwrap().send(()).ok();
        self.task.await.unwrap().unwrap();
        (self.db.clone(), self._dir.take())
    }

    async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .header("Content-Type", "application/x-amz-json-1.1")
            .body(body);
        if let Some(k) = key {
            req = req.header("X-Api-Key", k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), headers)
    }

    async fn batch(&self, key: &str, product: &str, records: Value) -> (u16, Value) {
        let body = json!({ "ProductCode": product, "UsageRecords": records }).to_string();
        let (s, v, _) = self.post("/v1/BatchMeterUsage", Some(key), body).await;
        (s, v)
    }

    /// `BatchMeterUsage` with the per-record opt-in (`X-Meterline-Per-Record: true`).
    async fn batch_per_record(&self, key: &str, product: &str, records: Value) -> (u16, Value) {
        let body = json!({ "ProductCode": product, "UsageRecords": records }).to_string();
        let resp = self
            .http
            .post(format!("{}/v1/BatchMeterUsage", self.url))
            .header("X-Api-Key", key)
            .header("X-Meterline-Per-Record", "true")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }
}

fn statuses(v: &Value) -> Vec<String> {
    v["Results"].as_array().unwrap().iter().map(|r| r["Status"].as_str().unwrap().to_owned()).collect()
}

fn ids(v: &Value) -> Vec<String> {
    v["Results"].as_array().unwrap().iter().map(|r| r["MeteringRecordId"].as_str().unwrap_or("").to_owned()).collect()
}

fn users(ts: &str, q: i64) -> Value {
    json!({ "Timestamp": ts, "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": q })
}

fn lines(db: &std::path::Path) -> Vec<common::rated::ChargeLine> {
    let conn = Store::open_read_only(db).unwrap();
    Store::charge_lines(&conn, None).unwrap()
}

const NOW: &str = "2026-11-02T12:10:00Z";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_results_are_per_record_with_the_opt_in_and_resends_are_idempotent() {
    let s = Server::start(tempfile::tempdir().unwrap(), NOW).await;
    let records = json!([
        users("2026-11-02T11:05:00Z", 100),
        { "Timestamp": 1793617200, "CustomerAWSAccountId": "111122223333", "Dimension": "gb_ingest", "Quantity": 37 },
        { "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "Users", "Quantity": 1 },
        { "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": "ten" },
        { "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": 42, "Dimension": "users" },
    ]);
    // By default the call answers as AWS: the first bad record's exception, nothing stored.
    let (code, aws) = s.batch(ACME, "acme-analytics", records.clone()).await;
    assert_eq!((code, aws["__type"].as_str().unwrap()), (400, "InvalidUsageDimensionException"), "{aws}");
    assert!(aws["message"].as_str().unwrap().starts_with("UsageRecords[2]: "), "{aws}");
    let (code, first) = s.batch_per_record(ACME, "acme-analytics", records.clone()).await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(statuses(&first), ["Success", "Success", "InvalidUsageDimension", "InvalidQuantity", "InvalidRecord"]);
    assert!(first["Results"][2]["Reason"].as_str().unwrap().contains("did you mean `users`"));
    assert_eq!(first["Results"][0]["UsageRecord"], records[0], "the record is echoed as sent");
    assert_eq!(first["UnprocessedRecords"], json!([]));

    // Identical resend of the whole call: same ids, nothing new charged.
    let (_, again) = s.batch_per_record(ACME, "acme-analytics", records.clone()).await;
    assert_eq!(statuses(&again)[..2], ["Success", "Success"]);
    assert_eq!(ids(&again)[..2], ids(&first)[..2]);
    // Same slot later in the hour with the same quantity: the same record.
    let (_, later) = s.batch(ACME, "acme-analytics", json!([users("2026-11-02T11:55:00Z", 100)])).await;
    assert_eq!(ids(&later)[0], ids(&first)[0]);
    // Same slot, other quantity: DuplicateRecord, the first stands.
    let (_, conflict) = s.batch(ACME, "acme-analytics", json!([users("2026-11-02T11:30:00Z", 90)])).await;
    assert_eq!(statuses(&conflict), ["DuplicateRecord"]);
    assert!(conflict["Results"][0]["Reason"].as_str().unwrap().contains(&ids(&first)[0]));

    let (db, _dir) = s.stop().await;
    let l = lines(&db);
    assert_eq!(l.len(), 2);
    let users_line = l.iter().find(|l| l.dimension == "users").unwrap();
    assert_eq!((users_line.quantity.to_string(), users_line.amount.to_string()), ("100".into(), "1.40".into()));
    let conn = Store::open_read_only(&db).unwrap();
    let counts: std::collections::BTreeMap<String, u64> = Store::status_counts(&conn).unwrap().into_iter().collect();
    assert_eq!(counts["Success"], 2);
    assert_eq!(counts["Success (identical resend)"], 3);
    assert_eq!(counts["DuplicateRecord"], 1);
    let rejected: i64 = conn.query_row("SELECT count(*) FROM rejected_records", [], |r| r.get(0)).unwrap();
    assert_eq!(rejected, 7, "3 invalid records twice, and the conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_state_and_totals_survive_a_restart() {
    let s = Server::start(tempfile::tempdir().unwrap(), NOW).await;
    let (_, first) = s.batch(ACME, "acme-analytics", json!([users("2026-11-02T11:05:00Z", 100)])).await;
    let (db, dir) = s.stop().await;

    let s = Server::start_at(db.clone(), NOW, 500_000).await;
    let (_, resend) = s.batch(ACME, "acme-analytics", json!([users("2026-11-02T11:05:00Z", 100)])).await;
    assert_eq!(statuses(&resend), ["Success"]);
    assert_eq!(ids(&resend), ids(&first));
    let (_, conflict) = s.batch(ACME, "acme-analytics", json!([users("2026-11-02T11:06:00Z", 7)])).await;
    assert_eq!(statuses(&conflict), ["DuplicateRecord"]);
    let (_, next) = s.batch(ACME, "acme-analytics", json!([users("2026-11-02T12:01:00Z", 50)])).await;
    assert_eq!(statuses(&next), ["Success"]);
    s.stop().await;
    let l = lines(&db);
    assert_eq!(l[0].amount_unrounded.to_string(), "2.100");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_through_http_reproduces_the_worked_examples_to_the_cent() {
    let s = Server::start(tempfile::tempdir().unwrap(), "2026-11-01T00:10:00Z").await;
    // §3.5: 100 users every hour for 720 h at $0.014, 37 GB once at $0.10.
    // §3.4: X = 2 annual m5.large, Y = 5 running every hour at $0.50.
    let start = Timestamp::parse_rfc3339("2026-11-01T00:00:00Z").unwrap();
    for h in 0..720i64 {
        let t = start.plus_millis(h * 3_600_000);
        s.clock.set(t.plus_millis(600_000));
        let ts = t.millis() / 1000;
        let mut recs =
            vec![json!({ "Timestamp": ts, "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": 100 })];
        if h == 5 {
            recs.push(
                json!({ "Timestamp": ts, "CustomerIdentifier": "cid-alpha", "Dimension": "gb_ingest", "Quantity": 37 }),
            );
        }
        let (code, r) = s.batch(ACME, "acme-analytics", Value::Array(recs)).await;
        assert_eq!(code, 200);
        assert!(statuses(&r).iter().all(|x| x == "Success"), "{r}");
        let vm = json!([{ "Timestamp": ts, "CustomerAWSAccountId": "111122223333", "Dimension": "m5_large", "Quantity": 5 }]);
        let (code, _) = s.batch(ACME, "acme-vm", vm).await;
        assert_eq!(code, 200);
    }
    let (db, _dir) = s.stop().await;
    let l = lines(&db);
    let amount = |dim: &str| l.iter().find(|x| x.dimension == dim).unwrap().amount.to_string();
    assert_eq!(amount("users"), "1008.00");
    assert_eq!(amount("gb_ingest"), "3.70");
    assert_eq!(amount("m5_large"), "1080.00");
    let m5 = l.iter().find(|x| x.dimension == "m5_large").unwrap();
    assert_eq!(
        (m5.quantity.to_string(), m5.covered_quantity.to_string(), m5.billable_quantity.to_string()),
        ("3600".into(), "1440".into(), "2160".into())
    );
    let totals = aggregator::invoice::invoice_totals(&l);
    assert_eq!(totals.len(), 1);
    assert_eq!(totals[0].amount.to_string(), "2091.70");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_call_failures_are_named_and_store_nothing() {
    let s = Server::start(tempfile::tempdir().unwrap(), NOW).await;
    let good = json!([users("2026-11-02T11:05:00Z", 1)]);
    let body = json!({ "ProductCode": "acme-analytics", "UsageRecords": good }).to_string();

    let (code, v, _) = s.post("/v1/BatchMeterUsage", None, body.clone()).await;
    assert_eq!((code, v["__type"].as_str().unwrap()), (401, "MissingAuthenticationTokenException"));
    let (code, v, _) = s.post("/v1/BatchMeterUsage", Some("not-a-key"), body.clone()).await;
    assert_eq!((code, v["__type"].as_str().unwrap()), (401, "UnrecognizedClientException"));
    assert!(!v.to_string().contains("not-a-key"), "keys are never echoed");
    // Another seller's product is AWS's InvalidProductCodeException on the AWS routes (403
    // AccessDeniedException with the per-record opt-in and on the bulk route).
    let (code, v, h) = s.post("/v1/BatchMeterUsage", Some(GLOBEX), body.clone()).await;
    assert_eq!((code, v["__type"].as_str().unwrap()), (400, "InvalidProductCodeException"));
    assert!(h.contains_key("x-amzn-requestid"), "errors carry a request id too");
    let unknown = json!({ "ProductCode": "nope", "UsageRecords": good }).to_string();
    let (code, v, _) = s.post("/v1/BatchMeterUsage", Some(ACME), unknown).await;
    assert_eq!(
        (code, v["__type"].as_str().unwrap()),
        (400, "InvalidProductCodeException"),
        "unknown products answer like foreign ones"
    );
    let (code, v, _) = s.post("/v1/BatchMeterUsage", Some(ACME), r#"{"ProductCode":"acme-analytics"}"#).await;
    assert_eq!((code, v["__type"].as_str().unwrap()), (400, "ValidationException"), "UsageRecords is required: {v}");
    let (code, v, _) =
        s.post("/v1/BatchMeterUsage", Some(ACME), r#"{"ProductCode":"acme-analytics","usageRecords":[]}"#).await;
    assert_eq!((code, v["__type"].as_str().unwrap()), (400, "ValidationException"), "{v}");
    // Every whole-call exception AWS models for a bad record, and nothing of the call stored.
    let good_one = users("2026-11-02T11:05:00Z", 5);
    let cases = [
        (
            json!({ "Timestamp": "2026-11-02T05:00:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": 1 }),
            "TimestampOutOfBoundsException",
        ),
        (
            json!({ "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "seats", "Quantity": 1 }),
            "InvalidUsageDimensionException",
        ),
        (
            json!({ "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "CustomerAWSAccountId": "111122223333", "Dimension": "users", "Quantity": 1 }),
            "InvalidCustomerIdentifierException",
        ),
        (
            json!({ "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": 3, "UsageAllocations": [{ "AllocatedUsageQuantity": 2 }] }),
            "InvalidUsageAllocationsException",
        ),
        (
            json!({ "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": 3, "UsageAllocations": [{ "AllocatedUsageQuantity": 3, "Tags": [{ "Key": "a#", "Value": "b" }] }] }),
            "InvalidTagException",
        ),
        (
            json!({ "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users", "LicenseArn": "arn:aws:license-manager::1:license:l-nope", "Quantity": 1 }),
            "InvalidLicenseException",
        ),
        (
            json!({ "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": null }),
            "ValidationException",
        ),
        (
            json!({ "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users", "quantity": 250 }),
            "ValidationException",
        ),
        (
            json!({ "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users" }),
            "ValidationException",
        ),
        (
            json!({ "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": 4, "QuantityAsDecimal": "5" }),
            "ValidationException",
        ),
    ];
    for (bad, kind) in cases {
        let (code, v) = s.batch(ACME, "acme-analytics", json!([good_one.clone(), bad])).await;
        assert_eq!((code, v["__type"].as_str().unwrap()), (400, kind), "{v}");
        assert!(v["message"].as_str().unwrap().starts_with("UsageRecords[1]: "), "{v}");
    }

    let (code, v, _) =
        s.post("/v1/BatchMeterUsage", Some(ACME), "{\"ProductCode\": \"acme-analytics\", \"UsageRecords\": [").await;
    assert_eq!((code, v["__type"].as_str().unwrap()), (400, "SerializationException"));
    assert!(v["message"].as_str().unwrap().contains("EOF"), "{v}");

    let many: Vec<Value> = (0..26).map(|i| json!({ "Timestamp": "2026-11-02T11:05:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": i })).collect();
    let (code, v) = s.batch(ACME, "acme-analytics", Value::Array(many)).await;
    assert_eq!((code, v["__type"].as_str().unwrap()), (400, "ValidationException"));

    let huge =
        format!("{{\"ProductCode\":\"acme-analytics\",\"UsageRecords\":[],\"pad\":\"{}\"}}", "x".repeat(1_100_000));
    let (code, _, _) = s.post("/v1/BatchMeterUsage", Some(ACME), huge).await;
    assert_eq!(code, 413);

    let resp = s
        .http
        .post(format!("{}/v1/BatchMeterUsage", s.url))
        .header("X-Api-Key", ACME)
        .header("Content-Type", "text/html")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);

    let (db, _dir) = s.stop().await;
    assert!(lines(&db).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_json_protocol_meter_usage_and_bulk_routes_work() {
    let s = Server::start(tempfile::tempdir().unwrap(), NOW).await;
    // The AWS SDK shape: POST / with X-Amz-Target.
    let body =
        json!({ "ProductCode": "acme-analytics", "UsageRecords": [users("2026-11-02T11:05:00Z", 3)] }).to_string();
    let resp = s
        .http
        .post(&s.url)
        .header("X-Api-Key", ACME)
        .header("X-Amz-Target", "AWSMPMeteringService.BatchMeterUsage")
        .header("Content-Type", "application/x-amz-json-1.1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(statuses(&v), ["Success"]);

    // MeterUsage: one record; a second one for the slot with another quantity is refused.
    let mu = |q: i64| {
        json!({ "ProductCode": "acme-vm", "Timestamp": "2026-11-02T11:20:00Z", "UsageDimension": "c5_xlarge", "UsageQuantity": q, "CustomerAWSAccountId": "111122223333" }).to_string()
    };
    let (code, v, _) = s.post("/v1/MeterUsage", Some(ACME), mu(2)).await;
    assert_eq!(code, 200, "{v}");
    let id = v["MeteringRecordId"].as_str().unwrap().to_owned();
    let (code, v, _) = s.post("/v1/MeterUsage", Some(ACME), mu(2)).await;
    assert_eq!((code, v["MeteringRecordId"].as_str().unwrap()), (200, id.as_str()));
    let (code, v, _) = s.post("/v1/MeterUsage", Some(ACME), mu(3)).await;
    assert_eq!((code, v["__type"].as_str().unwrap()), (400, "DuplicateRequestException"));

    // Native bulk: no 25-record limit, per-line results.
    let mut body = String::new();
    for c in 0..300 {
        let dim = if c % 2 == 0 { "users" } else { "gb_ingest" };
        let hour = 6 + c / 2 % 6;
        body.push_str(&json!({ "ProductCode": "acme-analytics", "Timestamp": format!("2026-11-02T{hour:02}:30:00Z"), "CustomerIdentifier": "cid-alpha", "Dimension": dim, "Quantity": c }).to_string());
        body.push('\n');
    }
    body.push_str("{not json}\n");
    let (code, v, _) = s.post("/v1/usage", Some(ACME), body).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["Results"].as_array().unwrap().len(), 301);
    assert_eq!(v["Results"][300]["Status"], "InvalidRecord");
    assert_eq!(v["Results"][300]["Line"], 301);
    // 12 distinct slots (2 dims × 6 hours); the rest are conflicting resends of them, and the
    // users slot of hour 11 was taken by the first call above (quantity 3), so 11 are new.
    let ok = v["Results"].as_array().unwrap().iter().filter(|r| r["Status"] == "Success").count();
    let dup = v["Results"].as_array().unwrap().iter().filter(|r| r["Status"] == "DuplicateRecord").count();
    assert_eq!((ok, dup), (11, 289));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_429_with_retry_after_and_stores_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    // An in-flight bound of one record: a second concurrent call is refused, not queued.
    let s = Server::start_at(dir.path().join("meterline.db"), NOW, 1).await;
    let mut calls = Vec::new();
    for i in 0..40 {
        let body = json!({ "ProductCode": "acme-analytics", "UsageRecords": [users(&format!("2026-11-02T{:02}:05:00Z", 7 + i % 5), i)] }).to_string();
        let (http, url) = (s.http.clone(), format!("{}/v1/BatchMeterUsage", s.url));
        calls.push(tokio::spawn(async move {
            let r = http.post(url).header("X-Api-Key", ACME).body(body).send().await.unwrap();
            (r.status().as_u16(), r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()))
        }));
    }
    let mut seen = std::collections::BTreeMap::new();
    for c in calls {
        let (code, retry) = c.await.unwrap();
        if code == 429 {
            assert_eq!(retry.as_deref(), Some("1"));
        }
        *seen.entry(code).or_insert(0) += 1;
    }
    assert!(seen.keys().all(|c| *c == 200 || *c == 429), "{seen:?}");
    let (db, _) = s.stop().await;
    let conn = Store::open_read_only(&db).unwrap();
    let answered: i64 =
        conn.query_row("SELECT coalesce(sum(records), 0) FROM ingest_counts", [], |r| r.get(0)).unwrap();
    assert_eq!(answered, *seen.get(&200).unwrap_or(&0) as i64, "only calls answered 200 left a trace");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stale_record_in_25_refuses_only_itself_and_a_subset_resend_is_idempotent() {
    let s = Server::start(tempfile::tempdir().unwrap(), NOW).await;
    // 24 good records (24 distinct hours would leave the window, so 12 hours × 2 dimensions)
    // and one stale record (domain-rules §6 item 4: AWS would refuse the whole batch; we refuse one).
    let mut recs: Vec<Value> = (0..24)
        .map(|i| {
            let dim = if i % 2 == 0 { "users" } else { "gb_ingest" };
            json!({ "Timestamp": format!("2026-11-02T{:02}:10:00Z", 7 + (i / 2) % 5), "CustomerIdentifier": "cid-alpha", "Dimension": dim, "Quantity": i / 10 })
        })
        .collect();
    recs.dedup_by(|a, b| a["Timestamp"] == b["Timestamp"] && a["Dimension"] == b["Dimension"]);
    recs.push(json!({ "Timestamp": "2026-11-02T05:00:00Z", "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": 1 }));
    // As AWS by default: the stale record fails the whole batch and nothing is stored.
    let (code, aws) = s.batch(ACME, "acme-analytics", Value::Array(recs.clone())).await;
    assert_eq!((code, aws["__type"].as_str().unwrap()), (400, "TimestampOutOfBoundsException"), "{aws}");
    assert!(aws["message"].as_str().unwrap().starts_with(&format!("UsageRecords[{}]: ", recs.len() - 1)), "{aws}");
    // With the opt-in, the stale record refuses only itself.
    let (_, v) = s.batch_per_record(ACME, "acme-analytics", Value::Array(recs.clone())).await;
    let st = statuses(&v);
    assert_eq!(st.last().unwrap(), "TimestampOutOfBounds");
    assert!(st[..st.len() - 1].iter().all(|x| x == "Success" || x == "DuplicateRecord"), "{st:?}");
    // Resending any subset answers the same ids.
    let subset = Value::Array(recs.iter().step_by(3).cloned().collect());
    let (_, again) = s.batch_per_record(ACME, "acme-analytics", subset).await;
    let first_ids = ids(&v);
    let again_ids = ids(&again);
    for (i, id) in again_ids.iter().enumerate() {
        assert_eq!(id, &first_ids[i * 3]);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_on_one_slot_charge_it_once() {
    // §6 item 27: many callers at once on the same (product, customer, dimension, hour) with
    // different quantities: exactly one Success-with-a-new-id wins; every other is either an
    // identical resend of the winner or a DuplicateRecord.
    let s = Server::start(tempfile::tempdir().unwrap(), NOW).await;
    let mut calls = Vec::new();
    for q in 0..32 {
        let body = json!({ "ProductCode": "acme-analytics", "UsageRecords": [users("2026-11-02T11:30:00Z", q % 4)] })
            .to_string();
        let (http, url) = (s.http.clone(), format!("{}/v1/BatchMeterUsage", s.url));
        calls.push(tokio::spawn(async move {
            let v: Value =
                http.post(url).header("X-Api-Key", ACME).body(body).send().await.unwrap().json().await.unwrap();
            (
                v["Results"][0]["Status"].as_str().unwrap().to_owned(),
                v["Results"][0]["MeteringRecordId"].as_str().unwrap().to_owned(),
            )
        }));
    }
    let mut winners = std::collections::BTreeSet::new();
    for c in calls {
        let (status, id) = c.await.unwrap();
        if status == "Success" {
            winners.insert(id);
        } else {
            assert_eq!(status, "DuplicateRecord");
        }
    }
    assert_eq!(winners.len(), 1, "one record id stands for the slot");
    let (db, _dir) = s.stop().await;
    let l = lines(&db);
    assert_eq!((l.len(), l[0].records), (1, 1));
}

#[tokio::test]
async fn month_close_writes_invoice_lines_and_late_usage_becomes_a_correction_edge_34() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meterline.db");
    let own = BOOK.replace("late_usage = \"refuse\"", "late_usage = \"correction_next_month\"");
    let s = Server::start_with(db.clone(), &own, "2026-10-31T23:30:00Z", 500_000).await;
    let rec = |dim: &str, ts: &str| json!([{ "Timestamp": ts, "CustomerIdentifier": "cid-alpha", "Dimension": dim, "Quantity": 100 }]);
    let (status, v) = s.batch(ACME, "acme-analytics", rec("users", "2026-10-31T23:10:00Z")).await;
    assert_eq!((status, statuses(&v)), (200, vec!["Success".to_owned()]));

    // Close October while the server runs (as an operator would, from another process).
    let book = PriceBook::from_toml(&own).unwrap();
    let oct = common::time::Month::parse("2026-10").unwrap();
    // Inside October's window, so only on the operator's word; the close says what it cut off.
    let early = meterline::close::CloseOptions { draft: false, cut_off_late_usage: true };
    let closed = meterline::close::close(&db, &book, oct, &dir.path().join("close"), s.clock.now(), early).unwrap();
    assert!(matches!(closed.timing, meterline::close::Timing::Early(_)), "{:?}", closed.timing);
    assert_eq!(closed.close.lines.len(), 1);
    assert_eq!(closed.close.lines[0].customer_billed_amount.to_string(), "1.40");
    assert_eq!(closed.close.lines[0].listing_fee.to_string(), "0.04");
    let csv = std::fs::read_to_string(&closed.csv).unwrap();
    assert_eq!(csv.lines().count(), 2);

    // Still inside the window, but October is closed: booked on November as a correction.
    let (status, v) = s.batch(ACME, "acme-analytics", rec("gb_ingest", "2026-10-31T23:20:00Z")).await;
    assert_eq!((status, statuses(&v)), (200, vec!["Success".to_owned()]));
    let (db, _dir) = s.stop().await;
    let conn = Store::open_read_only(&db).unwrap();
    let oct_lines = Store::charge_lines(&conn, Some("2026-10")).unwrap();
    assert_eq!(oct_lines.len(), 1, "a closed month's lines do not change");
    let nov = Store::charge_lines(&conn, Some("2026-11")).unwrap();
    assert_eq!(nov.len(), 1);
    assert_eq!((nov[0].charge_type.as_str(), nov[0].amount.to_string()), ("adjustment", "10.00".to_owned()));
    let stored: i64 =
        conn.query_row("SELECT count(*) FROM invoice_lines WHERE billing_month = '2026-10'", [], |r| r.get(0)).unwrap();
    assert_eq!(stored, 1);
}

/// Issue 16 item 4: a month can't be closed for good while its usage may still arrive; a draft
/// can, any time, and the close for good that follows bills what the last draft showed, once.
#[tokio::test]
async fn a_month_is_not_closed_inside_its_window_and_the_final_close_matches_its_draft() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meterline.db");
    let s = Server::start_with(db.clone(), BOOK, "2026-10-31T23:30:00Z", 500_000).await;
    let rec = |dim: &str, ts: &str| json!([{ "Timestamp": ts, "CustomerIdentifier": "cid-alpha", "Dimension": dim, "Quantity": 100 }]);
    let (status, v) = s.batch(ACME, "acme-analytics", rec("users", "2026-10-31T23:10:00Z")).await;
    assert_eq!((status, statuses(&v)), (200, vec!["Success".to_owned()]));
    let book = PriceBook::from_toml(BOOK).unwrap();
    let oct = common::time::Month::parse("2026-10").unwrap();
    let out = dir.path().join("close");
    let at = |t: &str| Timestamp::parse_rfc3339(t).unwrap();
    let final_close = meterline::close::CloseOptions::default();
    let draft = meterline::close::CloseOptions { draft: true, cut_off_late_usage: false };

    // The next morning, inside the acceptance window: refused, naming until when and what to do.
    s.clock.set(at("2026-11-01T01:00:00Z"));
    let refused = meterline::close::close(&db, &book, oct, &out, s.clock.now(), final_close).unwrap_err().to_string();
    assert!(refused.contains("can't be closed for good before 2026-11-01T07:00:00Z"), "{refused}");
    assert!(refused.contains("--draft") && refused.contains("--cut-off-late-usage"), "{refused}");
    let conn = Store::open_read_only(&db).unwrap();
    assert!(Store::closed_months(&conn).unwrap().is_empty(), "a refused close writes nothing");
    drop(conn);
    // A draft now says what it would bill and that it is not closable yet; nothing is closed.
    let first = meterline::close::close(&db, &book, oct, &out, s.clock.now(), draft).unwrap();
    assert!(first.draft && first.json.ends_with("invoice-lines-2026-10.draft.json"));
    assert!(matches!(first.timing, meterline::close::Timing::Draft(Err(_))), "{:?}", first.timing);
    assert!(meterline::close::summary(&first).contains("Nothing is closed"));

    // Usage sent in time after the draft still counts: October is open.
    s.clock.set(at("2026-11-01T04:00:00Z"));
    let (status, v) = s.batch(ACME, "acme-analytics", rec("gb_ingest", "2026-10-31T23:50:00Z")).await;
    assert_eq!((status, statuses(&v)), (200, vec!["Success".to_owned()]));
    let second = meterline::close::close(&db, &book, oct, &out, s.clock.now(), draft).unwrap();
    assert_eq!(second.close.lines.len(), first.close.lines.len() + 1, "the re-run draft has the new usage");

    // After the window: the close for good bills exactly what the last draft showed.
    s.clock.set(at("2026-11-01T07:00:00Z"));
    let last_draft = meterline::close::close(&db, &book, oct, &out, s.clock.now(), draft).unwrap();
    assert!(matches!(last_draft.timing, meterline::close::Timing::Draft(Ok(()))));
    let closed = meterline::close::close(&db, &book, oct, &out, s.clock.now(), final_close).unwrap();
    assert!(matches!(closed.timing, meterline::close::Timing::Regular));
    assert_eq!(
        serde_json::to_value(&closed.close.lines).unwrap(),
        serde_json::to_value(&last_draft.close.lines).unwrap()
    );
    // Once: a second close, forced or not, is refused and the invoice lines stay as they were.
    for cut_off_late_usage in [false, true] {
        let again = meterline::close::CloseOptions { draft: false, cut_off_late_usage };
        let e = meterline::close::close(&db, &book, oct, &out, s.clock.now(), again).unwrap_err().to_string();
        assert!(e.contains("was closed for good at 2026-11-01T07:00:00Z"), "{e}");
    }
    let (db, _dir) = s.stop().await;
    let conn = Store::open_read_only(&db).unwrap();
    let stored: i64 =
        conn.query_row("SELECT count(*) FROM invoice_lines WHERE billing_month = '2026-10'", [], |r| r.get(0)).unwrap();
    assert_eq!(stored as usize, closed.close.lines.len());
}

/// The same rule through the command operators run, on the real clock: the current month is
/// always inside its window.
#[test]
fn meterline_close_of_the_current_month_is_refused_unless_drafted_or_cut_off_on_purpose() {
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("price-book.toml");
    std::fs::write(&book, BOOK).unwrap();
    drop(Store::open(&dir.path().join("meterline.db")).unwrap());
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meterline"))
            .args(["close", "--month", &month, "--data-dir"])
            .arg(dir.path())
            .arg("--price-book")
            .arg(&book)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run(&[]);
    assert!(!ok && err.contains("can't be closed for good before") && err.contains("--cut-off-late-usage"), "{err}");
    let (ok, out, err) = run(&["--draft"]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("Draft of {month}")) && out.contains("Not closable for good now"), "{out}");
    let (ok, out, err) = run(&["--cut-off-late-usage"]);
    assert!(ok, "{err}");
    assert!(out.contains("for good") && out.contains("before its window ended"), "{out}");
    let (ok, _, err) = run(&["--cut-off-late-usage"]);
    assert!(!ok && err.contains("was closed for good"), "{err}");
}
