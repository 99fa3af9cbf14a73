//! The operator API (issue 16 items 1, 2, 5) on the embedded server, over loopback with a real
//! client: the catalogue changed while `meterline serve` runs, and metering follows it at once.
//!
//! One server (manual clock) lives through the whole story — a customer created and metered, a
//! price version under the notice rule, an unsubscribe and its final-records grace — with no
//! restart; then one restart shows the catalogue was durable.

use common::catalogue::PriceBook;
use common::time::Timestamp;
use ingest::clock::{Clock, ManualClock};
use meterline::operator::{Credential, Role};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const BOOK: &str = include_str!("../../docs/examples/price-book.toml");
const ACME: &str = "demo-key-acme";
const OPERATOR: &str = "op-key-alice";
const ACME_OPS: &str = "op-key-acme";
const ANALYST: &str = "op-key-ann";

fn credential(name: &str, role: Role, seller: Option<&str>, key: &str) -> Credential {
    Credential {
        name: name.into(),
        role,
        seller: seller.map(str::to_owned),
        api_key_sha256: hex::encode(Sha256::digest(key.as_bytes())),
    }
}

struct Server {
    url: String,
    clock: Arc<ManualClock>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<meterline::pipeline::WriterStats>>,
    http: reqwest::Client,
}

impl Server {
    async fn start(db: &Path, now: &str) -> Server {
        let book = Arc::new(PriceBook::from_toml(BOOK).unwrap());
        let clock = Arc::new(ManualClock::new(Timestamp::parse_rfc3339(now).unwrap()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let opts = meterline::server::ServeOptions {
            operators: vec![
                credential("alice", Role::Operator, None, OPERATOR),
                credential("acme-ops", Role::Seller, Some("acme"), ACME_OPS),
                credential("ann", Role::Analyst, None, ANALYST),
            ],
            ..Default::default()
        };
        let db: PathBuf = db.to_owned();
        let task = tokio::spawn({
            let clock = Arc::clone(&clock) as Arc<dyn Clock>;
            async move {
                meterline::server::serve_with(listener, &db, book, clock, 100_000, opts, async {
                    rx.await.ok();
                })
                .await
            }
        });
        let s = Server { url, clock, stop: Some(tx), task, http: reqwest::Client::new() };
        for _ in 0..100 {
            if s.http.get(format!("{}/health", s.url)).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        s
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).ok();
        self.task.await.unwrap().unwrap();
    }

    fn at(&self, t: &str) {
        self.clock.set(Timestamp::parse_rfc3339(t).unwrap());
    }

    async fn call(&self, method: reqwest::Method, key: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn change(&self, key: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, key, "/v1/catalogue/changes", Some(body)).await
    }

    async fn version(&self) -> String {
        let (status, v) = self.call(reqwest::Method::GET, ANALYST, "/v1/catalogue", None).await;
        assert_eq!(status, 200, "{v}");
        v["version"].as_str().unwrap().to_owned()
    }

    /// One `BatchMeterUsage` record of Acme Analytics; its status (and message when refused).
    async fn meter(&self, customer: &str, dimension: &str, ts: &str) -> (String, String) {
        let body = json!({ "ProductCode": "acme-analytics", "UsageRecords": [
            { "Timestamp": ts, "CustomerIdentifier": customer, "Dimension": dimension, "Quantity": 10 } ] });
        let resp = self
            .http
            .post(format!("{}/v1/BatchMeterUsage", self.url))
            .header("X-Api-Key", ACME)
            .header("X-Meterline-Per-Record", "true")
            .json(&body)
            .send()
            .await
            .unwrap();
        let v: Value = resp.json().await.unwrap();
        let r = &v["Results"][0];
        let status = r["Status"].as_str().unwrap_or_default().to_owned();
        let why = r["Reason"].as_str().or(r["Message"].as_str()).unwrap_or_default().to_owned();
        (if status.is_empty() { v.to_string() } else { status }, why)
    }
}

/// (unit rate, price book version) of the stored `users` line item of `customer` at `usage_hour`.
fn rated(db: &Path, customer: &str, usage_hour: &str) -> (String, String) {
    let conn = meterline::store::Store::open_read_only(db).unwrap();
    conn.query_row(
        "SELECT unit_rate, price_book_version FROM rated_usage WHERE customer = ?1 AND usage_hour = ?2 AND dimension = 'users'",
        [customer, usage_hour],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap_or_else(|e| panic!("no rated item for {customer} at {usage_hour}: {e}"))
}

#[tokio::test]
async fn the_catalogue_changes_while_serving_and_metering_follows_each_change_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meterline.db");
    let s = Server::start(&db, "2026-12-01T10:20:00Z").await;
    assert_eq!(s.version().await, "example-2026-10");

    // 1. A customer created and metered, no restart. Before: refused as not subscribed.
    let (status, _) = s.meter("cid-new", "users", "2026-12-01T10:10:00Z").await;
    assert_ne!(status, "Success");
    let (code, v) = s
        .change(
            OPERATOR,
            json!({ "if_version": "example-2026-10", "changes": [
                { "op": "put_customer", "customer": { "id": "cust-new", "name": "New Co", "customer_identifier": "cid-new" } },
                { "op": "subscribe", "agreement": { "id": "agmnt-new", "customer": "cust-new", "product": "acme-analytics",
                  "offer": "acme-analytics-public", "start": "2026-12-01T10:00:00Z" } },
            ] }),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["version"].as_str(), v["applied"].as_u64()), (Some("example-2026-10+1"), Some(2)));
    assert_eq!(s.meter("cid-new", "users", "2026-12-01T10:11:00Z").await.0, "Success");
    // Each rated record names the catalogue version it was rated with.
    assert_eq!(rated(&db, "cust-new", "2026-12-01T10:00Z"), ("0.014".into(), "example-2026-10+1".into()));

    // 2. A price version, applied per the notice rule (90 days): the change is the notice, so
    // existing subscribers pay it from the first of the month after 2027-03-01.
    let (code, v) = s
        .change(
            ACME_OPS,
            json!({ "changes": [{ "op": "add_price_version", "offer": "acme-analytics-public", "version": {
                "effective_from": "2027-01-01T00:00:00Z",
                "usage": { "users": { "per_unit": "0.020" }, "gb_ingest": { "per_unit": "0.10" } } } }] }),
        )
        .await;
    assert_eq!(code, 200, "{v}");
    s.at("2027-01-01T01:00:00Z");
    assert_eq!(s.meter("cid-alpha", "users", "2027-01-01T00:10:00Z").await.0, "Success");
    assert_eq!(rated(&db, "cust-a", "2027-01-01T00:00Z").0, "0.014", "inside the notice period");
    s.at("2027-03-01T01:00:00Z");
    assert_eq!(s.meter("cid-alpha", "users", "2027-03-01T00:10:00Z").await.0, "Success");
    assert_eq!(rated(&db, "cust-a", "2027-03-01T00:00Z"), ("0.020".into(), "example-2026-10+2".into()));

    // 3. An unsubscribe, then usage inside and after the final-records grace (1 h).
    s.at("2027-03-01T02:00:00Z");
    let (code, v) = s.change(OPERATOR, json!({ "changes": [{ "op": "unsubscribe", "agreement": "agmnt-new" }] })).await;
    assert_eq!(code, 200, "{v}");
    s.at("2027-03-01T02:40:00Z");
    assert_eq!(s.meter("cid-new", "users", "2027-03-01T01:30:00Z").await.0, "Success", "inside the grace");
    let (status, why) = s.meter("cid-new", "gb_ingest", "2027-03-01T02:10:00Z").await;
    assert!(status != "Success" && why.contains("ended"), "usage after the end: {status} {why}");
    s.at("2027-03-01T03:01:00Z");
    let (status, why) = s.meter("cid-new", "gb_ingest", "2027-03-01T01:40:00Z").await;
    assert!(status != "Success" && why.contains("final records were due by"), "after the grace: {status} {why}");

    // 5. Refused changes name the rule and change nothing; roles are enforced; stale versions
    // are refused.
    let before = s.version().await;
    let (code, v) = s
        .change(
            OPERATOR,
            json!({ "changes": [
            { "op": "put_customer", "customer": { "id": "half" } },
            { "op": "unsubscribe", "agreement": "agmnt-none" } ] }),
        )
        .await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("change 1 (unsubscribe): agreement `agmnt-none` does not exist"),
        "{v}"
    );
    let (code, v) =
        s.change(ACME_OPS, json!({ "changes": [{ "op": "unsubscribe", "agreement": "agmnt-b-db" }] })).await;
    assert_eq!(code, 403, "a seller changes only its own products: {v}");
    let (code, _) =
        s.change(ANALYST, json!({ "changes": [{ "op": "put_customer", "customer": { "id": "x" } }] })).await;
    assert_eq!(code, 403);
    let (code, v) = s
        .change(OPERATOR, json!({ "if_version": "example-2026-10+1", "changes": [{ "op": "put_customer", "customer": { "id": "x" } }] }))
        .await;
    assert_eq!(code, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains(&format!("`{before}` is in force")), "{v}");
    let (code, _) = s.change("not-a-key", json!({ "changes": [] })).await;
    assert_eq!(code, 401);
    let (code, _) = s.change(ACME, json!({ "changes": [] })).await;
    assert_eq!(code, 401, "a metering key is not an operator key");
    assert_eq!(s.version().await, before, "refused changes changed nothing");
    let (_, cat) = s.call(reqwest::Method::GET, ANALYST, "/v1/catalogue", None).await;
    assert!(cat["catalogue"]["customers"].as_array().unwrap().iter().all(|c| c["id"] != "half"));
    // A seller's view is its own part of the catalogue.
    let (_, mine) = s.call(reqwest::Method::GET, ACME_OPS, "/v1/catalogue", None).await;
    assert!(mine["catalogue"]["products"].as_array().unwrap().iter().all(|p| p["seller"] == "acme"), "{mine}");

    // The audit log holds every applied change: who, when, what.
    let (code, log) = s.call(reqwest::Method::GET, ANALYST, "/v1/catalogue/audit", None).await;
    assert_eq!(code, 200, "{log}");
    let entries = log["entries"].as_array().unwrap();
    let summary: Vec<(String, String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["version"].as_str().unwrap().into(),
                e["actor"].as_str().unwrap().into(),
                e["changes"][0]["op"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("example-2026-10+1".into(), "alice".into(), "put_customer".into()),
            ("example-2026-10+2".into(), "acme-ops".into(), "add_price_version".into()),
            ("example-2026-10+3".into(), "alice".into(), "unsubscribe".into()),
        ]
    );
    assert_eq!(entries[2]["at"], "2027-03-01T02:00:00.000Z");
    // The export is a price book `check-price-book` accepts, with the changes in it.
    let text = s.http.get(format!("{}/v1/catalogue/export", s.url)).bearer_auth(OPERATOR).send().await.unwrap();
    let exported = PriceBook::from_toml(&text.text().await.unwrap()).unwrap();
    assert_eq!(exported.version(), "example-2026-10+3");
    assert!(exported.customer("cust-new").is_some());
    s.stop().await;

    // Durable: a restart with the original file keeps the catalogue in force.
    let s = Server::start(&db, "2027-03-01T03:10:00Z").await;
    assert_eq!(s.version().await, "example-2026-10+3");
    let (status, why) = s.meter("cid-new", "users", "2027-03-01T01:50:00Z").await;
    assert!(status != "Success" && why.contains("final records were due by"), "{status} {why}");
    s.stop().await;
}
