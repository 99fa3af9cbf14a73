//! The query API (issue 16 item 3) on the embedded server, over loopback with a real client.
//!
//! Each test starts the real server (ingest + query routers over SQLite) on a free port with a
//! manual clock, posts usage through `BatchMeterUsage` as seller code does, and reads it back
//! through the `GET /v1/customers/{customer}/…` routes. The invoice preview is compared with what
//! the `meterline close` command writes afterwards.

use common::catalogue::PriceBook;
use common::time::Timestamp;
use ingest::clock::{Clock, ManualClock};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

const ACME: &str = "demo-key-acme";
const GLOBEX: &str = "demo-key-globex";

/// The example book with a monthly fee on Acme Analytics, so the preview holds a fee line too.
fn book_text() -> String {
    include_str!("../../docs/examples/price-book.toml")
        .replace("id = \"acme-analytics-public\"\n", "id = \"acme-analytics-public\"\nmonthly_fee = \"30.00\"\n")
}

struct Server {
    url: String,
    clock: Arc<ManualClock>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<meterline::pipeline::WriterStats>>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Server {
    async fn start(now: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let text = book_text();
        std::fs::write(dir.path().join("price-book.toml"), &text).unwrap();
        let book = Arc::new(PriceBook::from_toml(&text).unwrap());
        let clock = Arc::new(ManualClock::new(Timestamp::parse_rfc3339(now).unwrap()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let db = dir.path().join("meterline.db");
        let task = tokio::spawn({
            let clock = Arc::clone(&clock) as Arc<dyn Clock>;
            async move {
                meterline::server::serve(listener, &db, book, clock, 100_000, async {
                    rx.await.ok();
                })
                .await
            }
        });
        Server { url, clock, stop: Some(tx), task, http: reqwest::Client::new(), dir }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).ok();
        self.task.await.unwrap().unwrap();
    }

    fn at(&self, t: &str) {
        self.clock.set(Timestamp::parse_rfc3339(t).unwrap());
    }

    /// `BatchMeterUsage`; every record must succeed.
    async fn post(&self, key: &str, product: &str, records: Vec<Value>) {
        for chunk in records.chunks(25) {
            let body = json!({ "ProductCode": product, "UsageRecords": chunk }).to_string();
            let resp = self
                .http
                .post(format!("{}/v1/BatchMeterUsage", self.url))
                .header("X-Api-Key", key)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            let v: Value = resp.json().await.unwrap();
            for r in v["Results"].as_array().unwrap() {
                assert_eq!(r["Status"], "Success", "{r}");
            }
        }
    }

    /// `GET path` with `key`: (status, JSON body).
    async fn get(&self, key: Option<&str>, path: &str) -> (u16, Value) {
        let mut req = self.http.get(format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.header("X-Api-Key", k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

fn users(ts: &str, q: i64) -> Value {
    json!({ "Timestamp": ts, "CustomerIdentifier": "cid-alpha", "Dimension": "users", "Quantity": q })
}

fn gb(ts: &str, q: i64, teams: &[(&str, i64)]) -> Value {
    let mut r = json!({ "Timestamp": ts, "CustomerIdentifier": "cid-alpha", "Dimension": "gb_ingest", "Quantity": q });
    if !teams.is_empty() {
        r["UsageAllocations"] = teams
            .iter()
            .map(|(t, q)| match *t {
                "" => json!({ "AllocatedUsageQuantity": q }),
                t => json!({ "AllocatedUsageQuantity": q, "Tags": [{ "Key": "team", "Value": t }] }),
            })
            .collect();
    }
    r
}

fn d(v: &Value) -> Decimal {
    v.as_str().unwrap_or_else(|| panic!("a decimal string, got {v}")).parse().unwrap()
}

/// Two days of cust-a's Acme usage (users every hour 07–11 on 2 and 3 November, quantity =
/// hour; gb_ingest with team allocations on the 3rd; m5_large above its 2 annual units), and
/// Globex usage of cust-b beside it.
async fn posted() -> Server {
    let s = Server::start("2026-11-02T12:10:00Z").await;
    let day2: Vec<Value> = (7..=11).map(|h| users(&format!("2026-11-02T{h:02}:05:00Z"), h)).collect();
    s.post(ACME, "acme-analytics", day2).await;
    let vm = |h: i64, q: i64| json!({ "Timestamp": format!("2026-11-02T{h:02}:30:00Z"), "CustomerAWSAccountId": "111122223333", "Dimension": "m5_large", "Quantity": q });
    s.post(ACME, "acme-vm", vec![vm(9, 3), vm(10, 5)]).await;
    let db = |h: i64| json!({ "Timestamp": format!("2026-11-02T{h:02}:00:00Z"), "CustomerAWSAccountId": "444455556666", "Dimension": "requests", "Quantity": 1000 });
    s.post(GLOBEX, "globex-db", vec![db(8), db(9)]).await;
    s.at("2026-11-03T12:10:00Z");
    let day3: Vec<Value> = (7..=11).map(|h| users(&format!("2026-11-03T{h:02}:05:00Z"), h)).collect();
    s.post(ACME, "acme-analytics", day3).await;
    s.post(
        ACME,
        "acme-analytics",
        vec![
            gb("2026-11-03T08:00:00Z", 10, &[("blue", 6), ("red", 4)]),
            gb("2026-11-03T09:00:00Z", 7, &[("blue", 5), ("", 2)]),
            gb("2026-11-03T10:00:00Z", 3, &[]),
        ],
    )
    .await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_by_hour_and_by_day_sums_what_was_posted() {
    let s = posted().await;
    let (status, v) = s.get(Some(ACME), "/v1/customers/cust-a/usage?month=2026-11&by=hour&dimension=users").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["customer"].as_str(), v["month"].as_str(), v["by"].as_str()),
        (Some("cust-a"), Some("2026-11"), Some("hour"))
    );
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 10, "five hours on each of two days: {v}");
    assert_eq!(items[0]["period"], "2026-11-02T07:00Z");
    assert_eq!(items[0]["product"], "acme-analytics");
    assert_eq!(items[0]["quantity"], "7");
    assert_eq!(items[0]["amount"], "0.098", "7 × 0.014, exact");
    assert_eq!(items[0]["currency"], "USD");
    assert_eq!(items[0]["records"], 1);
    assert_eq!(items[9]["period"], "2026-11-03T11:00Z");
    assert!(v["next_page_token"].is_null());

    // By day (the default bucket): one item per day and dimension, exact sums.
    let (status, v) = s.get(Some(ACME), "/v1/customers/cust-a/usage?month=2026-11").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["by"], "day");
    let got: Vec<(String, String, String, String, String)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let f = |k: &str| i[k].as_str().unwrap().to_owned();
            (f("period"), f("product"), f("dimension"), f("quantity"), f("billable_quantity"))
        })
        .collect();
    let row = |p: &str, prod: &str, dim: &str, q: &str, b: &str| {
        (p.to_owned(), prod.to_owned(), dim.to_owned(), q.to_owned(), b.to_owned())
    };
    assert_eq!(
        got,
        vec![
            row("2026-11-02", "acme-analytics", "users", "45", "45"),
            // 3 and 5 instances over 2 annual units: 1 + 3 billable.
            row("2026-11-02", "acme-vm", "m5_large", "8", "4"),
            row("2026-11-03", "acme-analytics", "gb_ingest", "20", "20"),
            row("2026-11-03", "acme-analytics", "users", "45", "45"),
        ]
    );
    let (_, v) = s.get(Some(ACME), "/v1/customers/cust-a/usage?month=2026-11&product=acme-vm").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["amount"], "2.00", "4 billable × 0.50");
    // Per agreement.
    let (_, v) = s.get(Some(ACME), "/v1/customers/cust-a/usage?month=2026-11&agreement=agmnt-a-vm").await;
    let dims: Vec<&str> = v["items"].as_array().unwrap().iter().map(|i| i["dimension"].as_str().unwrap()).collect();
    assert_eq!(dims, ["m5_large"]);
    // Another month: nothing yet, but the customer exists.
    let (status, v) = s.get(Some(ACME), "/v1/customers/cust-a/usage?month=2026-10").await;
    assert_eq!((status, v["items"].as_array().unwrap().len()), (200, 0));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_usage_cover_every_row_exactly_once() {
    let s = posted().await;
    let (_, all) = s.get(Some(ACME), "/v1/customers/cust-a/usage?month=2026-11&by=hour&limit=1000").await;
    let all = all["items"].as_array().unwrap().clone();
    assert_eq!(all.len(), 15, "10 users hours, 2 m5_large hours, 3 gb_ingest hours");
    for limit in [1, 4, 7, 15] {
        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut path = format!("/v1/customers/cust-a/usage?month=2026-11&by=hour&limit={limit}");
            if let Some(t) = &token {
                path.push_str(&format!("&page_token={t}"));
            }
            let (status, v) = s.get(Some(ACME), &path).await;
            assert_eq!(status, 200, "{v}");
            let items = v["items"].as_array().unwrap();
            assert!(items.len() <= limit);
            seen.extend(items.iter().cloned());
            pages += 1;
            match v["next_page_token"].as_str() {
                Some(t) => token = Some(t.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, all, "limit {limit}: every item once, in the same order");
        assert_eq!(pages, all.len().div_ceil(limit), "limit {limit}");
    }
    let (status, v) = s.get(Some(ACME), "/v1/customers/cust-a/usage?month=2026-11&page_token=not-a-token").await;
    assert_eq!(status, 400);
    assert!(v["message"].as_str().unwrap().contains("page_token"), "{v}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sellers_key_sees_none_of_this_sellers_data() {
    let s = posted().await;
    for route in ["usage?month=2026-11&by=hour", "usage/tags?month=2026-11&key=team"] {
        let (status, v) = s.get(Some(GLOBEX), &format!("/v1/customers/cust-a/{route}")).await;
        assert_eq!((status, v["items"].as_array().map(Vec::len)), (200, Some(0)), "{route}: {v}");
    }
    let (_, v) = s.get(Some(GLOBEX), "/v1/customers/cust-a/charges?month=2026-11").await;
    assert_eq!((v["lines"].as_array().unwrap().len(), v["totals"].as_array().unwrap().len()), (0, 0), "{v}");
    let (_, v) = s.get(Some(GLOBEX), "/v1/customers/cust-a/invoice-preview?month=2026-11").await;
    assert_eq!(v["lines"].as_array().unwrap().len(), 0, "{v}");
    let (_, v) = s.get(Some(GLOBEX), "/v1/customers/cust-a/entitlements").await;
    assert_eq!(v["agreements"].as_array().unwrap().len(), 0, "{v}");
    // Naming the other seller's product is refused, as ingest refuses it.
    let (status, v) = s.get(Some(GLOBEX), "/v1/customers/cust-a/usage?product=acme-analytics").await;
    assert_eq!((status, v["__type"].as_str()), (403, Some("AccessDeniedException")), "{v}");
    // Globex sees its own customer, and Acme does not see it.
    let (_, v) = s.get(Some(GLOBEX), "/v1/customers/cust-b/usage?month=2026-11").await;
    assert_eq!(v["items"][0]["quantity"], "2000", "{v}");
    let (_, v) = s.get(Some(ACME), "/v1/customers/cust-b/usage?month=2026-11").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 0, "{v}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_key_is_401_and_bad_parameters_are_400_naming_them() {
    let s = Server::start("2026-11-02T12:10:00Z").await;
    let (status, v) = s.get(None, "/v1/customers/cust-a/usage").await;
    assert_eq!((status, v["__type"].as_str()), (401, Some("MissingAuthenticationTokenException")), "{v}");
    let (status, v) = s.get(Some("not-a-key"), "/v1/customers/cust-a/entitlements").await;
    assert_eq!((status, v["__type"].as_str()), (401, Some("UnrecognizedClientException")), "{v}");
    let bad = [
        ("usage?by=week", "`by`", "`hour` or `day`"),
        ("usage?month=2026-13", "`month`", "YYYY-MM"),
        ("usage?limit=0", "`limit`", "1 to 1000"),
        ("usage?limit=1001", "`limit`", "1 to 1000"),
        ("usage?moth=2026-11", "`moth`", "`month`"),
        ("usage/tags?month=2026-11", "`key`", "tag key"),
        ("charges?month=11-2026", "`month`", "YYYY-MM"),
    ];
    for (route, param, accepted) in bad {
        let (status, v) = s.get(Some(ACME), &format!("/v1/customers/cust-a/{route}")).await;
        let m = v["message"].as_str().unwrap_or_default();
        assert_eq!((status, v["__type"].as_str()), (400, Some("ValidationException")), "{route}: {v}");
        assert!(m.contains(param) && m.contains(accepted), "{route}: {m}");
    }
    let (status, v) = s.get(Some(ACME), "/v1/customers/nobody/usage?month=2026-11").await;
    assert_eq!(status, 404, "{v}");
    assert!(v["message"].as_str().unwrap().contains("`nobody`"), "{v}");
    // A customer in the book without usage: 200, empty.
    let (status, v) = s.get(Some(ACME), "/v1/customers/cust-c/usage?month=2026-11").await;
    assert_eq!((status, v["items"].as_array().map(Vec::len)), (200, Some(0)), "{v}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invoice_preview_equals_the_lines_meterline_close_then_writes() {
    let s = posted().await;
    let (status, preview) = s.get(Some(ACME), "/v1/customers/cust-a/invoice-preview?month=2026-11").await;
    assert_eq!(status, 200, "{preview}");
    let lines = preview["lines"].as_array().unwrap().clone();
    let types: Vec<&str> = lines.iter().map(|l| l["charge_type"].as_str().unwrap()).collect();
    assert!(types.contains(&"monthly_fee") && types.contains(&"usage"), "fees and usage: {types:?}");
    assert!(lines.iter().all(|l| l["customer"] == "cust-a"));
    let mut by_currency: BTreeMap<String, Decimal> = BTreeMap::new();
    for l in &lines {
        *by_currency.entry(l["currency"].as_str().unwrap().into()).or_default() += d(&l["customer_billed_amount"]);
    }
    let totals: BTreeMap<String, Decimal> = preview["totals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["currency"].as_str().unwrap().to_owned(), d(&t["amount"])))
        .collect();
    assert_eq!(totals, by_currency);

    // The operator closes November from another process while the server runs.
    let data: PathBuf = s.dir.path().to_owned();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meterline"))
        .args(["close", "--month", "2026-11", "--data-dir"])
        .arg(&data)
        .arg("--price-book")
        .arg(data.join("price-book.toml"))
        .arg("--out-dir")
        .arg(data.join("close"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let closed: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("close/invoice-lines-2026-11.json")).unwrap()).unwrap();
    let acme = ["acme-analytics", "acme-vm"];
    let written: Vec<Value> = closed["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["customer"] == "cust-a" && acme.contains(&l["product"].as_str().unwrap()))
        .cloned()
        .collect();
    assert_eq!(lines, written, "the preview is the close, line for line");
    assert!(closed["lines"].as_array().unwrap().len() > written.len(), "other customers' lines are not in the preview");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tag_breakdown_sums_to_the_customers_usage() {
    let s = posted().await;
    let (status, v) = s.get(Some(ACME), "/v1/customers/cust-a/usage/tags?month=2026-11&key=team").await;
    assert_eq!(status, 200, "{v}");
    let items = v["items"].as_array().unwrap();
    let gb: Vec<(&str, &str)> = items
        .iter()
        .filter(|i| i["dimension"] == "gb_ingest")
        .map(|i| (i["value"].as_str().unwrap(), i["quantity"].as_str().unwrap()))
        .collect();
    assert_eq!(gb, [("(untagged)", "5"), ("blue", "11"), ("red", "4")]);
    // Per product and dimension, the values sum to the usage route's quantities.
    let mut tagged: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for i in items {
        let k = (i["product"].as_str().unwrap().to_owned(), i["dimension"].as_str().unwrap().to_owned());
        *tagged.entry(k).or_default() += d(&i["quantity"]);
    }
    let (_, u) = s.get(Some(ACME), "/v1/customers/cust-a/usage?month=2026-11&limit=1000").await;
    let mut used: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for i in u["items"].as_array().unwrap() {
        let k = (i["product"].as_str().unwrap().to_owned(), i["dimension"].as_str().unwrap().to_owned());
        *used.entry(k).or_default() += d(&i["quantity"]);
    }
    assert_eq!(tagged, used);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_are_month_to_date_with_totals_and_entitlements_list_the_agreements() {
    let s = posted().await;
    let (status, v) = s.get(Some(ACME), "/v1/customers/cust-a/charges?month=2026-11").await;
    assert_eq!(status, 200, "{v}");
    let lines = v["lines"].as_array().unwrap();
    let got: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|l| (l["product"].as_str().unwrap(), l["dimension"].as_str().unwrap(), l["amount"].as_str().unwrap()))
        .collect();
    // users 90 × 0.014 = 1.26; gb 20 × 0.10 = 2.00; m5_large 4 × 0.50 = 2.00.
    assert_eq!(
        got,
        [("acme-analytics", "gb_ingest", "2.00"), ("acme-analytics", "users", "1.26"), ("acme-vm", "m5_large", "2.00")]
    );
    assert_eq!(v["totals"], json!([{ "currency": "USD", "amount": "5.26" }]));

    let (status, v) = s.get(Some(ACME), "/v1/customers/cust-a/entitlements").await;
    assert_eq!(status, 200, "{v}");
    let a = v["agreements"].as_array().unwrap();
    let ids: Vec<&str> = a.iter().map(|a| a["agreement_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["agmnt-a-analytics", "agmnt-a-vm"]);
    assert_eq!(a[0]["dimensions"], json!(["users", "gb_ingest"]));
    assert_eq!(a[0]["active"], true);
    assert_eq!(a[1]["annual"][0]["units"], 2);
    s.stop().await;
}
