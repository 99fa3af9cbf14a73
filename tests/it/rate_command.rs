//! Golden tests of the `rate` command: price-book file + usage file → charge lines, through the
//! real binary (the path users script against). Inputs are generated here; each expected output
//! is a file under `tests/golden/`, checked by hand once and compared byte for byte since.
//! `UPDATE_GOLDEN=1 cargo test --test rate_command` rewrites them (then read the diff!).

use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};

const BOOK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/examples/price-book.toml");

fn rate(usage: &str, extra: &[&str]) -> (String, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meterline"))
        .args(["rate", "--price-book", BOOK, "--usage", "-"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(usage.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let v = serde_json::from_str(&text).unwrap();
    (text, v)
}

fn golden(name: &str, text: &str) {
    let path = format!("{}/tests/golden/{name}.json", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).unwrap();
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("missing {path}; run with UPDATE_GOLDEN=1"));
    assert_eq!(text, expected, "output differs from {path}");
}

fn hourly(product: &str, who: (&str, &str), dim: &str, start: &str, hours: i64, q: impl Fn(i64) -> i64) -> String {
    let t0 = common::time::Timestamp::parse_rfc3339(start).unwrap().millis() / 1000;
    (0..hours)
        .map(|h| json!({ "ProductCode": product, who.0: who.1, "Dimension": dim, "Timestamp": t0 + h * 3600 + 60, "Quantity": q(h) }).to_string() + "\n")
        .collect()
}

fn amount(v: &Value, dim: &str) -> String {
    v["charge_lines"].as_array().unwrap().iter().find(|l| l["dimension"] == dim).unwrap()["amount"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn worked_example_3_5_saas_month_is_1011_70() {
    let mut usage =
        hourly("acme-analytics", ("CustomerIdentifier", "cid-alpha"), "users", "2026-11-01T00:00:00Z", 720, |_| 100);
    usage.push_str(&json!({ "ProductCode": "acme-analytics", "CustomerAWSAccountId": "111122223333", "Dimension": "gb_ingest", "Timestamp": "2026-11-12T08:00:00Z", "Quantity": 37 }).to_string());
    let (text, v) = rate(&usage, &[]);
    assert_eq!(amount(&v, "users"), "1008.00");
    assert_eq!(amount(&v, "gb_ingest"), "3.70");
    assert_eq!(v["invoice_totals"][0]["amount"], "1011.70");
    golden("worked_example_3_5", &text);
}

#[test]
fn worked_example_3_4_annual_y_minus_x_is_1080_and_uncovered_types_pay_hourly() {
    // X = 2 annual m5.large; Y = 5 for 720 hours; a c5.xlarge alongside for 10 hours at $0.34.
    let mut usage =
        hourly("acme-vm", ("CustomerAWSAccountId", "111122223333"), "m5_large", "2026-11-01T00:00:00Z", 720, |_| 5);
    usage.push_str(&hourly(
        "acme-vm",
        ("CustomerAWSAccountId", "111122223333"),
        "c5_xlarge",
        "2026-11-03T00:00:00Z",
        10,
        |_| 1,
    ));
    let (text, v) = rate(&usage, &[]);
    assert_eq!(amount(&v, "m5_large"), "1080.00");
    assert_eq!(amount(&v, "c5_xlarge"), "3.40");
    golden("worked_example_3_4", &text);
}

#[test]
fn hours_where_y_is_at_most_x_cost_nothing() {
    // Y cycles 0,1,2,3: only Y = 3 (one hour in four) bills one instance.
    let usage =
        hourly("acme-vm", ("CustomerAWSAccountId", "111122223333"), "m5_large", "2026-11-01T00:00:00Z", 8, |h| h % 4);
    let (_, v) = rate(&usage, &[]);
    let line = &v["charge_lines"][0];
    assert_eq!(
        (line["quantity"].as_str(), line["covered_quantity"].as_str(), line["billable_quantity"].as_str()),
        (Some("12"), Some("10"), Some("2"))
    );
    assert_eq!(line["amount"], "1.00");
}

#[test]
fn month_boundary_tiny_rates_duplicates_and_refusals() {
    let line = |who: (&str, &str), dim: &str, ts: &str, q: i64, product: &str| {
        json!({ "ProductCode": product, who.0: who.1, "Dimension": dim, "Timestamp": ts, "Quantity": q }).to_string()
            + "\n"
    };
    let a = ("CustomerIdentifier", "cid-alpha");
    let mut usage = String::new();
    usage += &line(a, "users", "2026-10-31T23:30:00Z", 10, "acme-analytics"); // October (HR-8)
    usage += &line(a, "users", "2026-11-01T00:00:00Z", 10, "acme-analytics"); // November
    usage += &line(a, "users", "2026-11-01T00:59:59.999Z", 10, "acme-analytics"); // same slot, same quantity: identical
    usage += &line(a, "users", "2026-11-01T00:20:00Z", 11, "acme-analytics"); // same slot, other quantity: DuplicateRecord
    usage +=
        &hourly("globex-db", ("CustomerAWSAccountId", "444455556666"), "requests", "2026-11-01T00:00:00Z", 720, |_| 1);
    usage += &line(("CustomerIdentifier", "cid-gamma"), "users", "2026-10-10T00:00:00Z", 1, "acme-analytics"); // before its agreement
    usage += "{\"ProductCode\": \"acme-analytics\", \"Quantity\": }\n";
    let (text, v) = rate(&usage, &[]);
    let months: Vec<&str> =
        v["charge_lines"].as_array().unwrap().iter().map(|l| l["month"].as_str().unwrap()).collect();
    assert_eq!(months, ["2026-10", "2026-11", "2026-11"]);
    let tiny = v["charge_lines"].as_array().unwrap().iter().find(|l| l["dimension"] == "requests").unwrap();
    assert_eq!((tiny["amount_unrounded"].as_str(), tiny["amount"].as_str()), (Some("0.00000720"), Some("0.00")));
    assert_eq!(v["counts"]["Success (identical resend)"], 1);
    assert_eq!(v["counts"]["DuplicateRecord"], 1);
    let refused: Vec<(u64, &str)> = v["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["line"].as_u64().unwrap(), r["status"].as_str().unwrap()))
        .collect();
    assert_eq!(refused, [(4, "DuplicateRecord"), (725, "TimestampOutOfBounds"), (726, "InvalidRecord")]);
    golden("edge_cases", &text);
}

#[test]
fn acceptance_window_applies_when_now_is_given() {
    let usage =
        hourly("acme-analytics", ("CustomerIdentifier", "cid-alpha"), "users", "2026-11-01T00:00:00Z", 10, |_| 1);
    let (_, v) = rate(&usage, &["--now", "2026-11-01T10:05:00Z"]);
    // Records at 00:01–04:01 are more than 6 h before 10:05; 05:01–09:01 are inside.
    assert_eq!(v["counts"]["Success"], 5);
    assert_eq!(v["counts"]["TimestampOutOfBounds"], 5);
}
