//! Every pricing model of domain-rules §3, through the `rate --close` command users run: the
//! price book `docs/examples/price-models.toml` plus usage records in, charge lines and the closed
//! month's invoice lines out. Each test names the worked example or §6 edge case it proves.
//! The full November close is also a golden file (`UPDATE_GOLDEN=1` rewrites it; read the diff).

use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};

const MODELS: &str = include_str!("../../docs/examples/price-models.toml");

/// Runs `meterline rate` on `book` text and `usage`; Ok(stdout JSON) or Err(stderr).
fn run(book: &str, usage: &str, args: &[&str]) -> Result<(String, Value), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("book.toml");
    std::fs::write(&path, book).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_meterline"))
        .args(["rate", "--price-book", path.to_str().unwrap(), "--usage", "-"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(usage.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let v = serde_json::from_str(&text).unwrap();
    Ok((text, v))
}

fn close(usage: &str, month: &str) -> Value {
    run(MODELS, usage, &["--month", month, "--close"]).unwrap().1
}

/// The error a modified price book is refused with.
fn refused(edit: impl Fn(&str) -> String) -> String {
    let book = edit(MODELS);
    assert_ne!(book, MODELS, "the edit changed nothing");
    run(&book, "", &[]).expect_err("the price book should be refused")
}

fn rec(product: &str, account: &str, dim: &str, ts: &str, q: i64) -> String {
    json!({ "ProductCode": product, "CustomerAWSAccountId": account, "Dimension": dim, "Timestamp": ts, "Quantity": q })
        .to_string()
        + "\n"
}

/// `n` hourly records from `start`.
fn hourly(product: &str, account: &str, dim: &str, start: &str, n: i64, q: i64) -> String {
    let t0 = common::time::Timestamp::parse_rfc3339(start).unwrap().millis() / 1000;
    (0..n)
        .map(|h| {
            json!({ "ProductCode": product, "CustomerAWSAccountId": account, "Dimension": dim, "Timestamp": t0 + h * 3600, "Quantity": q })
                .to_string()
                + "\n"
        })
        .collect()
}

/// Invoice lines of the close matching every (field, value).
fn lines<'a>(v: &'a Value, filter: &[(&str, &str)]) -> Vec<&'a Value> {
    v["month_close"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| filter.iter().all(|(k, want)| l[*k].as_str() == Some(*want)))
        .collect()
}

fn one<'a>(v: &'a Value, filter: &[(&str, &str)]) -> &'a Value {
    let found = lines(v, filter);
    assert_eq!(found.len(), 1, "expected one line for {filter:?}, got {found:#?}");
    found[0]
}

fn billed(v: &Value, filter: &[(&str, &str)]) -> String {
    one(v, filter)["customer_billed_amount"].as_str().unwrap().to_owned()
}

#[test]
fn graduated_volume_package_and_per_unit_price_the_month_in_any_order() {
    let mut usage = hourly("saas-tiers", "100000000001", "api_calls", "2026-11-01T00:00:00Z", 30, 100);
    usage += &rec("saas-tiers", "100000000001", "storage_gb", "2026-11-02T00:00:00Z", 1000);
    usage += &hourly("saas-tiers", "100000000001", "events", "2026-11-03T00:00:00Z", 5, 500);
    usage += &hourly("saas-tiers", "100000000001", "seats", "2026-11-01T00:00:00Z", 720, 100);
    let v = close(&usage, "2026-11");
    let tier = |dim| billed(&v, &[("customer", "tierco"), ("dimension", dim)]);
    assert_eq!(tier("api_calls"), "200.00"); // 1,000 × 0.10 + 2,000 × 0.05
    assert_eq!(tier("storage_gb"), "400.00"); // volume: all 1,000 GB at the 0.40 tier (up_to is inclusive)
    assert_eq!(tier("events"), "6.00"); // 2,500 events → 3 blocks of 1,000 × $2
    assert_eq!(tier("seats"), "1008.00"); // §3.5: 72,000 × 0.014
    assert_eq!(one(&v, &[("dimension", "api_calls")])["pricing_model"], "graduated");
    // Reversed input: the same invoice.
    let reversed: String = usage.lines().rev().map(|l| format!("{l}\n")).collect();
    assert_eq!(close(&reversed, "2026-11")["month_close"], v["month_close"]);
}

#[test]
fn ami_partial_hours_round_up_per_record_edge_36() {
    // 10 full hours and 5 minutes → 11 billable hours × $0.12 = $1.32; an instance stopped and
    // started within one hour (20 + 15 minutes) is one hour.
    let mut usage = hourly("vm-seconds", "100000000004", "m5_large", "2026-11-01T00:00:00Z", 10, 3600);
    usage += &rec("vm-seconds", "100000000004", "m5_large", "2026-11-01T10:00:00Z", 300);
    usage += &rec("vm-seconds", "100000000004", "m5_large", "2026-11-02T10:00:00Z", 2100);
    let v = close(&usage, "2026-11");
    let line = one(&v, &[("customer", "secco")]);
    assert_eq!(line["customer_billed_amount"], "1.44");
    assert_eq!(line["quantity"], "43200"); // 12 hours in seconds
}

#[test]
fn container_per_second_with_a_one_minute_minimum_edge_37() {
    let usage = rec("container-app", "100000000005", "task_seconds", "2026-11-03T10:00:00Z", 1230)
        + &rec("container-app", "100000000005", "task_seconds", "2026-11-03T11:00:00Z", 30);
    let v = close(&usage, "2026-11");
    // 20 m 30 s at $6/h = $2.05; 30 s → 60 s = $0.10.
    assert_eq!(billed(&v, &[("customer", "boxco"), ("dimension", "task_seconds")]), "2.15");
}

#[test]
fn annual_coverage_expiry_and_amendments_edge_39() {
    let a = "100000000002";
    let usage = [
        rec("vm-hourly", a, "m5_large", "2026-11-14T23:00:00Z", 3), // X = 2 → 1 billable
        rec("vm-hourly", a, "m5_large", "2026-11-15T00:00:00Z", 3), // type changed: X = 0 → 3
        rec("vm-hourly", a, "m5_xlarge", "2026-11-16T00:00:00Z", 3), // X = 2 → 1
        rec("vm-hourly", a, "m5_xlarge", "2026-11-20T00:00:00Z", 3), // units added: X = 3 → 0
        rec("vm-hourly", a, "c5_xlarge", "2026-11-10T09:00:00Z", 1), // covered until 10:00
        rec("vm-hourly", a, "c5_xlarge", "2026-11-10T10:00:00Z", 1), // expired: hourly from then
    ]
    .concat();
    let v = close(&usage, "2026-11");
    let b = |dim| billed(&v, &[("customer", "vmco"), ("dimension", dim)]);
    assert_eq!(b("m5_large"), "2.00");
    assert_eq!(b("m5_xlarge"), "1.00");
    assert_eq!(b("c5_xlarge"), "0.34");
    // Public server offer: the 20 % listing fee.
    assert_eq!(one(&v, &[("customer", "vmco"), ("dimension", "m5_large")])["listing_fee"], "0.40");
}

#[test]
fn container_contract_units_net_usage_and_price_changes_follow_the_notice_rule_edges_42_44() {
    let usage = rec("container-app", "100000000005", "vcpu_hours", "2026-11-02T00:00:00Z", 10)
        + &rec("container-app", "100000000006", "vcpu_hours", "2026-11-02T00:00:00Z", 10)
        + &rec("container-app", "100000000005", "vcpu_hours", "2026-08-02T00:00:00Z", 10);
    let v = close(&usage, "2026-11");
    // boxco: 2 contract units cover 2 of 10 → 8 billable; the September decrease reached it at
    // once (0.80), the October increase only on 1 Jan 2027: 8 × 0.80.
    assert_eq!(billed(&v, &[("customer", "boxco"), ("dimension", "vcpu_hours")]), "6.40");
    // newbox subscribed after the increase took effect: a new subscriber pays 1.20 at once.
    assert_eq!(billed(&v, &[("customer", "newbox"), ("dimension", "vcpu_hours")]), "12.00");
    // August, before the decrease: 8 × 1.00.
    let aug = close(&usage, "2026-08");
    assert_eq!(billed(&aug, &[("customer", "boxco"), ("dimension", "vcpu_hours")]), "8.00");
}

#[test]
fn price_increase_reaches_existing_subscribers_on_the_first_of_the_month_after_90_days_edge_43() {
    let usage = rec("pricechange", "100000000016", "users", "2026-06-30T23:00:00Z", 100)
        + &rec("pricechange", "100000000016", "users", "2026-07-01T00:00:00Z", 100)
        + &rec("pricechange", "100000000017", "users", "2026-04-02T00:00:00Z", 100);
    let june = close(&usage, "2026-06");
    assert_eq!(billed(&june, &[("customer", "oldco")]), "10.00"); // still 0.10 on 30 Jun
    let july = close(&usage, "2026-07");
    assert_eq!(billed(&july, &[("customer", "oldco")]), "12.00"); // 16 Mar + 90 d → 1 Jul
    let april = close(&usage, "2026-04");
    assert_eq!(billed(&april, &[("customer", "newco")]), "12.00"); // new subscriber: at once
}

/// The same increase notified on `day` of March (effective for new subscribers that day).
fn notified_in_march(day: &str) -> String {
    let from = "effective_from = \"2026-03-16T00:00:00Z\"\nnotified_at = \"2026-03-16T00:00:00Z\"";
    assert_eq!(MODELS.matches(from).count(), 1);
    MODELS.replace(from, &from.replace("03-16", &format!("03-{day}")))
}

#[test]
fn price_increase_notified_3_march_reaches_existing_subscribers_1_june_not_1_july_edge_43() {
    // Corrected rule (domain-rules §3.10): the 90-day period starts on the notice day, so
    // 2 Mar → last 30 May and 3 Mar → last 31 May both give 1 Jun; 4 Mar → last 1 Jun → 1 Jul.
    // oldco (signed 1 Feb), 100 users: 10.00 at 0.10, 12.00 at 0.12.
    let usage = rec("pricechange", "100000000016", "users", "2026-05-31T23:00:00Z", 100)
        + &rec("pricechange", "100000000016", "users", "2026-06-01T00:00:00Z", 100);
    for (day, may, june) in [("02", "10.00", "12.00"), ("03", "10.00", "12.00"), ("04", "10.00", "10.00")] {
        let book = notified_in_march(day);
        let month = |m| run(&book, &usage, &["--month", m, "--close"]).unwrap().1;
        assert_eq!(billed(&month("2026-05"), &[("customer", "oldco")]), may, "notice {day} Mar, May");
        assert_eq!(billed(&month("2026-06"), &[("customer", "oldco")]), june, "notice {day} Mar, June");
    }
}

#[test]
fn private_offer_ends_and_the_public_price_applies_from_its_end_edge_46() {
    let usage = rec("pricechange", "100000000018", "users", "2026-11-14T23:00:00Z", 100)
        + &rec("pricechange", "100000000018", "users", "2026-11-15T00:00:00Z", 100);
    let v = close(&usage, "2026-11");
    assert_eq!(billed(&v, &[("agreement_id", "agmnt-priv")]), "5.00");
    assert_eq!(billed(&v, &[("agreement_id", "agmnt-priv-public")]), "12.00");
    assert_eq!(one(&v, &[("agreement_id", "agmnt-priv")])["offer_visibility"], "private");
}

#[test]
fn monthly_fee_is_prorated_by_one_thirtieth_per_day_edge_38() {
    let nov = close("", "2026-11");
    // Subscribed for the last 10 days: 10/30 × $99 = $33.00 (§3.3).
    assert_eq!(billed(&nov, &[("customer", "monthco"), ("charge_type", "monthly_fee")]), "33.00");
    // A whole month is the whole fee, whatever its length (28, 30 or 31 days).
    for month in ["2027-02", "2026-12", "2027-04"] {
        let v = close("", month);
        assert_eq!(billed(&v, &[("customer", "monthco"), ("charge_type", "monthly_fee")]), "99.00", "{month}");
    }
    // Cancelled on 8 Feb 2027 (7 days used in a 28-day month): 7/30 × 99 = 23.10.
    let book = MODELS.replace(
        "id = \"agmnt-monthly\"\ncustomer = \"monthco\"\nproduct = \"container-app\"\noffer = \"container-monthly\"\nstart = \"2026-11-21T00:00:00Z\"",
        "id = \"agmnt-monthly\"\ncustomer = \"monthco\"\nproduct = \"container-app\"\noffer = \"container-monthly\"\nstart = \"2026-11-21T00:00:00Z\"\nend = \"2027-02-08T00:00:00Z\"",
    );
    let (_, feb) = run(&book, "", &["--month", "2027-02", "--close"]).unwrap();
    assert_eq!(billed(&feb, &[("customer", "monthco"), ("charge_type", "monthly_fee")]), "23.10");
    let (_, mar) = run(&book, "", &["--month", "2027-03", "--close"]).unwrap();
    assert!(lines(&mar, &[("customer", "monthco")]).is_empty());
}

#[test]
fn ami_free_trial_makes_one_instance_of_the_most_expensive_type_free_edge_40() {
    let a = "100000000003";
    // Trial 10–24 Nov. 12 Nov 10:00: m5.large ($0.50) + m5.xlarge ($1.00) → the xlarge is free.
    // 25 Nov 10:00: after the trial, both are charged.
    let usage = [
        rec("vm-hourly", a, "m5_large", "2026-11-12T10:00:00Z", 1),
        rec("vm-hourly", a, "m5_xlarge", "2026-11-12T10:00:00Z", 1),
        rec("vm-hourly", a, "m5_large", "2026-11-25T10:00:00Z", 1),
        rec("vm-hourly", a, "m5_xlarge", "2026-11-25T10:00:00Z", 1),
    ]
    .concat();
    let v = close(&usage, "2026-11");
    let credit = one(&v, &[("customer", "trialco"), ("charge_type", "credit")]);
    assert_eq!(credit["dimension"], "m5_xlarge");
    assert_eq!(credit["customer_billed_amount"], "-1.00");
    let total: rust_decimal::Decimal = lines(&v, &[("customer", "trialco")])
        .iter()
        .map(|l| l["customer_billed_amount"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    assert_eq!(total.to_string(), "2.00"); // 0.50 in the trial hour + 1.50 after it
}

#[test]
fn saas_free_trial_usage_is_not_charged() {
    let usage = rec("saas-tiers", "100000000015", "seats", "2026-11-12T10:00:00Z", 100)
        + &rec("saas-tiers", "100000000015", "seats", "2026-11-20T10:00:00Z", 100);
    let v = close(&usage, "2026-11");
    let line = one(&v, &[("customer", "saastrial")]);
    assert_eq!(line["customer_billed_amount"], "1.40"); // only the 20 Nov hour
}

#[test]
fn contracts_upfront_upgrade_credit_and_overage_sections_3_6_3_7_edge_41() {
    let mut usage = hourly("saas-contract", "100000000008", "extra_hosts", "2026-11-01T00:00:00Z", 720, 5);
    usage += &rec("data-contract", "100000000009", "overage_gb", "2026-11-12T00:00:00Z", 37);
    let v = close(&usage, "2026-11");
    // §3.6: 500 GB × $16.00 at acceptance.
    let upfront = one(&v, &[("customer", "dataco"), ("charge_type", "contract_upfront")]);
    assert_eq!(upfront["customer_billed_amount"], "8000.00");
    assert_eq!(upfront["invoice_date"], "2026-11-05");
    assert_eq!(billed(&v, &[("customer", "dataco"), ("dimension", "overage_gb")]), "1.85");
    // Upgrade Basic → Standard on 16 Nov: Standard upfront, and the unused 197 of 365 Basic days
    // credited: 1,000 × 197/365 = 539.726… → −539.73.
    assert_eq!(billed(&v, &[("agreement_id", "agmnt-standard"), ("charge_type", "contract_upfront")]), "2000.00");
    assert_eq!(billed(&v, &[("agreement_id", "agmnt-basic"), ("charge_type", "credit")]), "-539.73");
    // §3.7: 5 extra hosts all month at $0.10 → $360.00, across the two agreements.
    let hosts: rust_decimal::Decimal = lines(&v, &[("customer", "standardco"), ("dimension", "extra_hosts")])
        .iter()
        .map(|l| l["customer_billed_amount"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    assert_eq!(hosts.to_string(), "360.00");
}

#[test]
fn future_dated_agreement_invoices_before_its_start_and_refuses_earlier_usage_edge_48() {
    let usage = rec("data-contract", "100000000010", "overage_gb", "2026-12-15T00:00:00Z", 5)
        + &rec("data-contract", "100000000010", "overage_gb", "2027-01-01T00:00:00Z", 5);
    let (_, v) = run(MODELS, &usage, &["--month", "2026-11", "--close"]).unwrap();
    // §3.11: $100,000 on acceptance (15 Nov), although the entitlement starts 1 Jan.
    let first = one(&v, &[("customer", "bigco"), ("charge_type", "installment")]);
    assert_eq!(first["customer_billed_amount"], "100000.00");
    assert_eq!(first["invoice_date"], "2026-11-15");
    // Usage before the start date is refused; from 1 Jan it is priced.
    assert_eq!(v["refused"][0]["line"], 1);
    assert_eq!(v["counts"]["Success"], 1);
    let later = close("", "2027-11");
    assert_eq!(billed(&later, &[("customer", "bigco"), ("charge_type", "installment")]), "100000.00");
}

#[test]
fn cppo_and_dsor_split_the_money_between_partner_and_manufacturer_edge_57() {
    let usage = hourly("suite", "100000000011", "api_calls", "2026-11-02T00:00:00Z", 10, 100_000)
        + &hourly("suite", "100000000012", "api_calls", "2026-11-02T00:00:00Z", 10, 100_000);
    let v = close(&usage, "2026-11");
    // §3.12: list $100,000, 20 % off → wholesale $80,000; the partner bills $90,000; fee 3.5 %
    // on each party's own share.
    let c = one(&v, &[("customer", "retailco"), ("charge_type", "contract_upfront")]);
    assert_eq!(
        [&c["seller_of_record"], &c["manufacturer"], &c["channel"]],
        [&json!("channelco"), &json!("acme"), &json!("cppo")]
    );
    assert_eq!(c["customer_billed_amount"], "90000.00");
    assert_eq!(c["cost_of_goods"], "80000.00");
    assert_eq!(c["listing_fee_rate"], "0.035");
    assert_eq!(c["listing_fee"], "350.00");
    assert_eq!(c["seller_net"], "9650.00");
    assert_eq!(c["manufacturer_listing_fee"], "2800.00");
    assert_eq!(c["manufacturer_net"], "77200.00");
    // Usage: buyer $0.0024, wholesale = list $0.0025 × 0.8 = $0.0020 per call.
    let u = one(&v, &[("customer", "retailco"), ("dimension", "api_calls")]);
    assert_eq!((u["customer_billed_amount"].as_str(), u["cost_of_goods"].as_str()), (Some("2400.00"), Some("2000.00")));
    // DSOR with a custom wholesale card.
    let g = one(&v, &[("customer", "govco"), ("charge_type", "contract_upfront")]);
    assert_eq!((g["channel"].as_str(), g["seller_of_record"].as_str()), (Some("dsor"), Some("dsorco")));
    assert_eq!(
        (g["customer_billed_amount"].as_str(), g["cost_of_goods"].as_str()),
        (Some("95000.00"), Some("85000.00"))
    );
    // Every party's net plus the fees adds up to what the buyers pay.
    let sum = |field: &str| -> rust_decimal::Decimal {
        lines(&v, &[])
            .iter()
            .filter(|l| l["currency"] == "USD")
            .map(|l| l[field].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
            .sum()
    };
    assert_eq!(
        sum("customer_billed_amount"),
        sum("seller_net") + sum("manufacturer_net") + sum("listing_fee") + sum("manufacturer_listing_fee")
    );
}

#[test]
fn currencies_are_invoiced_apart_and_converted_for_reporting_only_edge_53() {
    let usage = rec("saas-tiers", "100000000013", "seats", "2026-11-20T00:00:00Z", 100);
    let v = close(&usage, "2026-11");
    let eur = one(&v, &[("customer", "eurco"), ("currency", "EUR")]);
    assert_eq!(eur["customer_billed_amount"], "50000.00");
    assert_eq!(eur["reporting_amount"], "54000.00"); // 1 Nov: 1.08 USD per EUR
    let invoices: Vec<(String, String)> = v["close_totals"]["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i[0] == "eurco")
        .map(|i| (i[1].as_str().unwrap().to_owned(), i[2].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(invoices, [("EUR".to_owned(), "50000.00".to_owned()), ("USD".to_owned(), "1.40".to_owned())]);
}

#[test]
fn byol_is_metered_for_reporting_and_never_charged() {
    let usage = hourly("byol-agent", "100000000014", "nodes", "2026-11-01T00:00:00Z", 24, 10);
    let v = close(&usage, "2026-11");
    let line = one(&v, &[("customer", "byolco")]);
    assert_eq!((line["quantity"].as_str(), line["customer_billed_amount"].as_str()), (Some("240"), Some("0.00")));
    assert_eq!(line["pricing_model"], "byol");
}

#[test]
fn listing_fee_on_the_saas_usage_example_section_3_14() {
    // §3.14: public SaaS usage of $1,011.70 → fee $30.35 (3 %, per line) → net $981.35.
    let mut usage = hourly("saas-tiers", "100000000001", "seats", "2026-11-01T00:00:00Z", 720, 100);
    usage += &rec("saas-tiers", "100000000001", "api_calls", "2026-11-02T00:00:00Z", 37);
    let v = close(&usage, "2026-11");
    let fee: rust_decimal::Decimal = lines(&v, &[("customer", "tierco")])
        .iter()
        .map(|l| l["listing_fee"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    let net: rust_decimal::Decimal = lines(&v, &[("customer", "tierco")])
        .iter()
        .map(|l| l["seller_net"].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    assert_eq!((fee.to_string(), net.to_string()), ("30.35".into(), "981.35".into()));
}

#[test]
fn a_profile_without_listing_fees_cannot_close_edge_59() {
    let book = MODELS.replace("[marketplace.listing_fees]", "[unused_fees]").replace("[unused_fees]\n", "");
    let book = book
        .lines()
        .filter(|l| {
            !l.starts_with("public_")
                && !l.starts_with("private")
                && !l.starts_with("tier_")
                && !l.starts_with("renewal =")
                && !l.starts_with("channel_uplift")
        })
        .collect::<Vec<_>>()
        .join("\n");
    let err = run(&book, "", &["--month", "2026-11", "--close"]).unwrap_err();
    assert!(err.contains("sets no listing_fees"), "{err}");
}

#[test]
fn catalogue_mistakes_are_refused_with_the_reason_edges_46_47_49_50() {
    let cases: Vec<(&str, String)> = vec![
        (
            "contract rates allow at most 3",
            refused(|b| b.replace("dimension = \"gb\", rate = \"16.00\"", "dimension = \"gb\", rate = \"16.0001\"")),
        ),
        (
            "after the contract term ends",
            refused(|b| b.replace("date = \"2028-11-15T00:00:00Z\"", "date = \"2030-02-01T00:00:00Z\"")),
        ),
        (
            "at most one may",
            refused(|b| b.replace("date = \"2027-11-15T00:00:00Z\"", "date = \"2026-11-20T00:00:00Z\"")),
        ),
        ("installments sum to", refused(|b| b.replace("amount = \"100000\" },\n]", "amount = \"99999\" },\n]"))),
        (
            "the offer is void",
            refused(|b| b.replace("expires_at = \"2026-11-30T00:00:00Z\"", "expires_at = \"2026-11-10T00:00:00Z\"")),
        ),
        // Standard's 12-month price below Basic's: the mid-term "upgrade" is a downgrade.
        (
            "downgrade",
            refused(|b| {
                b.replace(
                    "dimension = \"tier_standard\", rate = \"2000\"",
                    "dimension = \"tier_standard\", rate = \"900\"",
                )
            }),
        ),
        (
            "currency mismatch in the resale chain",
            refused(|b| {
                b.replace(
                    "partner = \"channelco\"\nchannel = \"cppo\"\ncurrency = \"USD\"",
                    "partner = \"channelco\"\nchannel = \"cppo\"\ncurrency = \"EUR\"",
                )
            }),
        ),
        (
            "overlapping agreements",
            refused(|b| {
                b.replace(
                    "offer = \"pricechange-public\"\nstart = \"2026-11-15T00:00:00Z\"",
                    "offer = \"pricechange-public\"\nstart = \"2026-11-01T00:00:00Z\"",
                )
            }),
        ),
        (
            "not allowed (public: 1, 12, 24, 36",
            refused(|b| {
                b.replace("{ months = 1, dimension = \"tier_basic\"", "{ months = 6, dimension = \"tier_basic\"")
            }),
        ),
        (
            "private offers do not support BYOL",
            refused(|b| b.replace("usage = { users = { per_unit = \"0.05\" } }", "usage = { users = \"byol\" }")),
        ),
    ];
    for (want, err) in cases {
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
}

#[test]
fn sixty_one_installments_are_refused_edge_47() {
    let many: String =
        (0..61).map(|i| format!("  {{ date = \"2027-{:02}-01T00:00:00Z\", amount = \"1\" }},\n", 1 + i % 12)).collect();
    let err = refused(|b| {
        let start = b.find("installments = [\n").unwrap();
        let end = start + b[start..].find("]\n").unwrap();
        format!("{}installments = [\n{many}{}", &b[..start], &b[end..])
    });
    assert!(err.contains("61 installments"), "{err}");
}

#[test]
fn past_dated_installment_is_invoiced_at_acceptance_edge_47() {
    let book = MODELS.replace(
        "{ date = \"2026-11-15T00:00:00Z\", amount = \"100000\" }",
        "{ date = \"2026-11-01T00:00:00Z\", amount = \"100000\" }",
    );
    let (_, v) = run(&book, "", &["--month", "2026-11", "--close"]).unwrap();
    assert_eq!(one(&v, &[("customer", "bigco"), ("charge_type", "installment")])["invoice_date"], "2026-11-15");
}

#[test]
fn november_close_of_every_model_is_golden() {
    let a = |n: u32| format!("1000000000{n:02}");
    let mut usage = String::new();
    usage += &hourly("saas-tiers", &a(1), "api_calls", "2026-11-01T00:00:00Z", 30, 100);
    usage += &hourly("vm-hourly", &a(2), "m5_large", "2026-11-14T20:00:00Z", 8, 3);
    usage += &hourly("vm-hourly", &a(3), "m5_xlarge", "2026-11-12T00:00:00Z", 3, 2);
    usage += &rec("vm-seconds", &a(4), "m5_large", "2026-11-01T10:00:00Z", 300);
    usage += &rec("container-app", &a(5), "task_seconds", "2026-11-03T10:00:00Z", 1230);
    usage += &rec("container-app", &a(5), "vcpu_hours", "2026-11-03T10:00:00Z", 10);
    usage += &rec("container-app", &a(7), "vcpu_hours", "2026-11-25T10:00:00Z", 4);
    usage += &hourly("saas-contract", &a(8), "extra_hosts", "2026-11-15T22:00:00Z", 4, 5);
    usage += &rec("data-contract", &a(9), "overage_gb", "2026-11-12T00:00:00Z", 37);
    usage += &rec("suite", &a(11), "api_calls", "2026-11-02T00:00:00Z", 1_000_000);
    usage += &rec("suite", &a(13), "api_calls", "2026-11-02T00:00:00Z", 1_000);
    usage += &rec("byol-agent", &a(14), "nodes", "2026-11-02T00:00:00Z", 10);
    usage += &rec("saas-tiers", &a(15), "seats", "2026-11-12T00:00:00Z", 10);
    usage += &rec("pricechange", &a(18), "users", "2026-11-14T23:00:00Z", 100);
    usage += &rec("pricechange", &a(18), "users", "2026-11-15T00:00:00Z", 100);
    let (text, _) = run(MODELS, &usage, &["--month", "2026-11", "--close"]).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/month_close_2026_11.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    assert_eq!(text, std::fs::read_to_string(path).expect("run with UPDATE_GOLDEN=1 once"), "differs from {path}");
}

#[test]
fn a_new_price_book_may_add_dimensions_but_never_rename_or_remove_published_ones_edge_49() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.toml");
    std::fs::write(&old, MODELS).unwrap();
    let check = |new_text: String| {
        let new = dir.path().join("new.toml");
        std::fs::write(&new, new_text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_meterline"))
            .args(["check-price-book", "--previous", old.to_str().unwrap(), new.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let added = check(MODELS.replace(
        "  { key = \"seats\", category = \"users\", unit = \"user-hour\" },\n]",
        "  { key = \"seats\", category = \"users\", unit = \"user-hour\" },\n  { key = \"exports\", category = \"units\" },\n]",
    ));
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    assert!(String::from_utf8_lossy(&added.stdout).contains("valid"));
    let renamed = check(
        MODELS
            .replace("{ key = \"seats\", category", "{ key = \"users\", category")
            .replace("seats = { per_unit", "users = { per_unit"),
    );
    assert!(!renamed.status.success());
    assert!(String::from_utf8_lossy(&renamed.stderr).contains("published dimension `seats` was removed or renamed"));
}

#[test]
fn late_usage_for_a_closed_month_follows_the_profile_policy_edge_34() {
    let late = rec("saas-tiers", "100000000001", "seats", "2026-10-31T23:00:00Z", 100)
        + &rec("saas-tiers", "100000000001", "seats", "2026-11-02T00:00:00Z", 100);
    let args = ["--month", "2026-11", "--close", "--closed-through", "2026-10"];
    // AWS profile: refused (its window has passed anyway).
    let (_, aws) = run(MODELS, &late, &args).unwrap();
    assert_eq!(aws["refused"][0]["status"], "TimestampOutOfBounds");
    assert!(aws["refused"][0]["reason"].as_str().unwrap().contains("closed month"));
    // Own profile: a correction line on November, marked as such, beside November's own usage.
    let own = MODELS.replace("late_usage = \"refuse\"", "late_usage = \"correction_next_month\"");
    let (_, v) = run(&own, &late, &args).unwrap();
    let adj = one(&v, &[("customer", "tierco"), ("charge_type", "adjustment")]);
    assert_eq!(adj["customer_billed_amount"], "1.40");
    assert!(adj["description"].as_str().unwrap().starts_with("correction"));
    assert_eq!(billed(&v, &[("customer", "tierco"), ("charge_type", "usage")]), "1.40");
}

#[test]
fn late_usage_is_corrected_at_the_tier_october_reached_graduated_25_00_volume_minus_40_00_package_0_00() {
    // Issue 17 item 2. October as it was closed: 3,000 api calls (1,000 × 0.10 + 2,000 × 0.05 =
    // 200.00), 1,000 GB (volume, all at 0.40 = 400.00), 2,500 events (3 blocks of 1,000 × 2 = 6.00).
    let t = "100000000001";
    let mut october = hourly("saas-tiers", t, "api_calls", "2026-10-01T00:00:00Z", 30, 100);
    october += &rec("saas-tiers", t, "storage_gb", "2026-10-02T00:00:00Z", 1000);
    october += &hourly("saas-tiers", t, "events", "2026-10-03T00:00:00Z", 5, 500);
    let dir = tempfile::tempdir().unwrap();
    let closed = dir.path().join("october.jsonl");
    std::fs::write(&closed, &october).unwrap();
    // Late October usage after the close, booked on November.
    let late = rec("saas-tiers", t, "api_calls", "2026-10-31T23:00:00Z", 500)
        + &rec("saas-tiers", t, "storage_gb", "2026-10-31T22:00:00Z", 200)
        + &rec("saas-tiers", t, "events", "2026-10-31T21:00:00Z", 400);
    let own = MODELS.replace("late_usage = \"refuse\"", "late_usage = \"correction_next_month\"");
    let closed = closed.to_str().unwrap();
    let args = ["--close", "--closed-through", "2026-10", "--closed-usage", closed];
    let (_, v) = run(&own, &late, &[&["--month", "2026-11"][..], &args].concat()).unwrap();
    let adj = |dim| one(&v, &[("customer", "tierco"), ("dimension", dim), ("charge_type", "adjustment")]).clone();
    // Graduated: 3,500 → 225.00, so 500 × 0.05 = 25.00 (not 50.00 from the first tier again).
    let calls = adj("api_calls");
    assert_eq!((calls["customer_billed_amount"].as_str(), calls["quantity"].as_str()), (Some("25.00"), Some("500")));
    assert_eq!(calls["corrects"], "2026-10");
    let text = calls["description"].as_str().unwrap();
    assert!(
        text.starts_with(
            "correction of graduated usage of api_calls: 2026-10: 500 late units priced from 3000 to 3500"
        ),
        "{text}"
    );
    // Volume: 1,200 GB reach the 0.30 tier for every unit (360.00): 360.00 − 400.00 = −40.00.
    assert_eq!(adj("storage_gb")["customer_billed_amount"], "-40.00");
    // Package: 2,900 events still fit the 3 blocks October started: 0.00 (not 2.00 for a new block).
    assert_eq!(adj("events")["customer_billed_amount"], "0.00");
    // October's own lines never change.
    let (_, oct) = run(&own, &late, &[&["--month", "2026-10"][..], &args].concat()).unwrap();
    let october_line = |dim: &str| {
        let l = oct["charge_lines"].as_array().unwrap().iter().find(|l| l["dimension"] == dim).unwrap().clone();
        (l["charge_type"].as_str().unwrap().to_owned(), l["amount"].as_str().unwrap().to_owned())
    };
    assert_eq!(october_line("api_calls"), ("usage".into(), "200.00".into()));
    assert_eq!(october_line("storage_gb"), ("usage".into(), "400.00".into()));
    assert_eq!(october_line("events"), ("usage".into(), "6.00".into()));
}

#[test]
fn a_softline_style_profile_states_every_parameter_and_closes_in_its_own_terms_edge_59() {
    const SOFTLINE: &str = include_str!("../../docs/examples/softline.toml");
    // Decimal quantities pulled from the vendor: 2.5 vCPU-hours an hour for 10 hours.
    let usage: String = (0..10)
        .map(|h| {
            json!({ "ProductCode": "iaas-vm", "CustomerIdentifier": "sl-0001", "Dimension": "vcpu_hours",
                    "Timestamp": format!("2026-11-02T{h:02}:00:00Z"), "Quantity": 2.5 })
            .to_string()
                + "\n"
        })
        .collect();
    let (_, v) = run(SOFTLINE, &usage, &["--month", "2026-11", "--close"]).unwrap();
    let u = one(&v, &[("dimension", "vcpu_hours")]);
    assert_eq!(u["customer_billed_amount"], "0.54"); // 25 × 0.0215 = 0.5375 → 0.54
    assert_eq!((u["currency"].as_str(), u["broker_id"].as_str()), (Some("EUR"), Some("SOFTLINE_EU")));
    assert_eq!(u["listing_fee_rate"], "0.10");
    assert_eq!(billed(&v, &[("charge_type", "monthly_fee")]), "25.00");
    // Without its fee schedule the profile cannot close: no AWS default fills the gap.
    let start = SOFTLINE.find("[marketplace.listing_fees]").unwrap();
    let end = SOFTLINE.find("[[fx_rates]]").unwrap();
    let bare = format!("{}{}", &SOFTLINE[..start], &SOFTLINE[end..]);
    let err = run(&bare, &usage, &["--month", "2026-11", "--close"]).unwrap_err();
    assert!(err.contains("marketplace `softline` sets no listing_fees"), "{err}");
}

/// `book` with `from` replaced by `to` in the text after `anchor` only (the first match there).
fn edit_after(book: &str, anchor: &str, from: &str, to: &str) -> String {
    let at = book.find(anchor).expect("anchor") + anchor.len();
    let (head, tail) = book.split_at(at);
    assert!(tail.contains(from), "`{from}` not found after `{anchor}`");
    format!("{head}{}", tail.replacen(from, to, 1))
}

/// Runs `meterline check-price-book` on `book`; Err(stderr) when refused.
fn check_price_book(book: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("book.toml");
    std::fs::write(&path, book).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meterline"))
        .args(["check-price-book", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

#[test]
fn annual_purchase_2_x_3000_is_invoiced_6000_at_subscription_and_hours_beyond_it_pay_hourly_section_3_4() {
    // 3 m5.large running, 2 covered (Y − X = 1): 1 × $0.50 on the usage line, beside the
    // $6,000.00 annual line invoiced on the purchase date with its unrounded amount.
    let usage = rec("vm-hourly", "100000000030", "m5_large", "2026-03-02T00:00:00Z", 3);
    let v = close(&usage, "2026-03");
    let annual = one(&v, &[("customer", "annualco"), ("charge_type", "annual")]);
    assert_eq!(annual["customer_billed_amount"], "6000.00");
    assert_eq!(annual["amount_unrounded"], "6000");
    assert_eq!(annual["quantity"], "2");
    assert_eq!(annual["unit_rate"], "3000");
    assert_eq!(annual["invoice_date"], "2026-03-01");
    assert_eq!(annual["listing_fee"], "1200.00"); // public server offer: 20 % of 6,000
    assert_eq!(billed(&v, &[("customer", "annualco"), ("charge_type", "usage")]), "0.50");
    // Invoiced once: nothing in the following months of the term.
    let april = close("", "2026-04");
    assert!(lines(&april, &[("customer", "annualco")]).is_empty());
}

#[test]
fn annual_purchase_by_installments_1400_at_purchase_and_1400_on_1_september() {
    // $2,800 in two installments; the first is dated 20 Feb, before the purchase on 1 Mar, so it
    // is invoiced on 1 Mar.
    let march = close("", "2026-03");
    let first = one(&march, &[("customer", "annualpriv"), ("charge_type", "installment")]);
    assert_eq!(
        (first["customer_billed_amount"].as_str(), first["invoice_date"].as_str()),
        (Some("1400.00"), Some("2026-03-01"))
    );
    assert_eq!(first["pricing_model"], "annual");
    let sept = close("", "2026-09");
    assert_eq!(billed(&sept, &[("customer", "annualpriv"), ("charge_type", "installment")]), "1400.00");
    assert!(lines(&march, &[("customer", "annualpriv"), ("charge_type", "annual")]).is_empty());
}

#[test]
fn annual_price_change_reaches_new_subscribers_at_once_and_a_renewal_only_if_made_90_days_before_edge_45() {
    // Renewal on 1 Mar 2027; 90 days before is 1 Dec 2026. The example's change to $3,300 is
    // made 15 Dec (76 days before): the renewal keeps 2 × 3,000 = $6,000.00.
    let renewal = |book: &str| {
        let (_, v) = run(book, "", &["--month", "2027-03", "--close"]).unwrap();
        let l = one(&v, &[("customer", "annualco"), ("charge_type", "annual")]).clone();
        assert!(l["description"].as_str().unwrap().contains("renewal"), "{l}");
        l["customer_billed_amount"].as_str().unwrap().to_owned()
    };
    assert_eq!(renewal(MODELS), "6000.00");
    let changed = |day: &str| {
        MODELS.replace(
            "rate = \"3300\", effective_from = \"2026-12-15T00:00:00Z\"",
            &format!("rate = \"3300\", effective_from = \"2026-{day}T00:00:00Z\""),
        )
    };
    // Made on 1 Dec, exactly 90 days before: 2 × 3,300 = $6,600.00. On 2 Dec (89 days): $6,000.00.
    assert_eq!(renewal(&changed("12-01")), "6600.00");
    assert_eq!(renewal(&changed("12-02")), "6000.00");
    // A new subscription on 5 Jan 2027, after the change: 1 × $3,300.00 at once.
    let jan = close("", "2027-01");
    assert_eq!(billed(&jan, &[("customer", "annualnew"), ("charge_type", "annual")]), "3300.00");
}

#[test]
fn an_annual_instance_type_without_an_hourly_price_is_refused_by_name_at_load_and_by_check_price_book() {
    // The offer prices c5_xlarge annually but not hourly: every record for it would be NotPriced.
    let no_hourly = edit_after(MODELS, "id = \"vm-annual\"\n", ", c5_xlarge = { per_unit = \"0.34\" }", "");
    let err = refused(|_| no_hourly.clone());
    assert!(err.contains("offer `vm-annual`: annual price for `c5_xlarge`, which has no hourly price"), "{err}");
    let shown = check_price_book(&no_hourly).unwrap_err();
    assert!(shown.contains("every annual instance type needs an hourly price too (PRC-12)"), "{shown}");
    assert!(check_price_book(MODELS).unwrap().contains("valid"));
    // Coverage of a type the offer does not price hourly is refused the same way.
    let uncovered =
        edit_after(MODELS, "id = \"agmnt-annual-priv\"\n", "dimension = \"m5_large\"", "dimension = \"c5_xlarge\"");
    let err = refused(|_| uncovered.clone());
    assert!(
        err.contains("annual coverage of `c5_xlarge`, which has no hourly price in offer `vm-annual-private`"),
        "{err}"
    );
}

#[test]
fn annual_terms_that_cannot_be_priced_are_refused_with_the_rule() {
    let cases: Vec<(&str, String)> = vec![
        (
            "renews no coverage of that type ending then",
            refused(|b| {
                b.replace(
                    "start = \"2027-03-01T00:00:00Z\", end = \"2028-03-01T00:00:00Z\", renewal = true",
                    "start = \"2027-03-02T00:00:00Z\", end = \"2028-03-01T00:00:00Z\", renewal = true",
                )
            }),
        ),
        (
            "installments sum to 2700 but the purchase is worth 2800.00 USD",
            refused(|b| {
                b.replace(
                    "{ date = \"2026-09-01T00:00:00Z\", amount = \"1400\" }",
                    "{ date = \"2026-09-01T00:00:00Z\", amount = \"1300\" }",
                )
            }),
        ),
        (
            "runs past 12 months",
            refused(|b| {
                b.replace(
                    "units = 1, start = \"2027-01-05T00:00:00Z\", end = \"2028-01-05T00:00:00Z\"",
                    "units = 1, start = \"2027-01-05T00:00:00Z\", end = \"2028-02-05T00:00:00Z\"",
                )
            }),
        ),
        (
            "a $0 annual price for `m5_large` is allowed only when its hourly price is $0",
            refused(|b| b.replace("rate = \"2800\"", "rate = \"0\"")),
        ),
    ];
    for (want, err) in cases {
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
}

/// The pricechange increase ($0.10 → $0.12) notified and effective for new subscribers on `date`.
fn notified_on(date: &str) -> String {
    let from = "effective_from = \"2026-03-16T00:00:00Z\"\nnotified_at = \"2026-03-16T00:00:00Z\"";
    MODELS.replace(from, &from.replace("2026-03-16", date))
}

#[test]
fn price_increase_notified_31_december_reaches_existing_subscribers_1_april_and_29_february_1_june_edge_43() {
    // oldco (signed 1 Feb 2026), 100 users in the last hour before and the first hour from the
    // effective date: 10.00 at 0.10, then 12.00 at 0.12.
    for (notice, before, from) in [
        // 31 Dec 2026 + 89 days = 30 Mar 2027 → effective 1 Apr 2027.
        ("2026-12-31", "2027-03-31T23:00:00Z", "2027-04-01T00:00:00Z"),
        // Leap year: 29 Feb 2028 + 89 days = 28 May 2028 → effective 1 Jun 2028.
        ("2028-02-29", "2028-05-31T23:00:00Z", "2028-06-01T00:00:00Z"),
        // A period containing 29 Feb: 2 Dec 2027 + 89 days = 29 Feb 2028 → effective 1 Mar 2028.
        ("2027-12-02", "2028-02-29T23:00:00Z", "2028-03-01T00:00:00Z"),
    ] {
        let book = notified_on(notice);
        let usage = rec("pricechange", "100000000016", "users", before, 100)
            + &rec("pricechange", "100000000016", "users", from, 100);
        let month = |ts: &str| run(&book, &usage, &["--month", &ts[..7], "--close"]).unwrap().1;
        assert_eq!(billed(&month(before), &[("customer", "oldco")]), "10.00", "notice {notice}, before");
        assert_eq!(billed(&month(from), &[("customer", "oldco")]), "12.00", "notice {notice}, from");
    }
}

#[test]
fn contract_usage_nets_20_entitled_hosts_so_25_metered_bill_5_or_meters_overage_only_section_3_7() {
    // hostco nets: 25 hosts → 5 × 0.10 = 0.50; 18 hosts → 0; a month of 25 hosts every hour
    // (720 h) → 5 × 720 × 0.10 = $360.00, §3.7's worked month.
    let usage = rec("saas-hosts", "100000000033", "hosts", "2026-11-02T00:00:00Z", 25)
        + &rec("saas-hosts", "100000000033", "hosts", "2026-11-02T01:00:00Z", 18);
    let v = close(&usage, "2026-11");
    let net = one(&v, &[("customer", "hostco"), ("charge_type", "usage")]);
    assert_eq!(net["customer_billed_amount"], "0.50");
    assert_eq!(net["quantity"], "5");
    let line = &v["charge_lines"].as_array().unwrap().iter().find(|l| l["customer"] == "hostco").unwrap().clone();
    assert_eq!((line["quantity"].as_str(), line["covered_quantity"].as_str()), (Some("43"), Some("38")));
    let month = hourly("saas-hosts", "100000000033", "hosts", "2026-11-01T00:00:00Z", 720, 25);
    assert_eq!(billed(&close(&month, "2026-11"), &[("customer", "hostco")]), "360.00");
    // hostover's seller meters the overage only: 5 metered → 0.50; 25 metered are 25 billed.
    let over = rec("saas-hosts", "100000000034", "hosts", "2026-11-02T00:00:00Z", 5)
        + &rec("saas-hosts", "100000000034", "hosts", "2026-11-02T01:00:00Z", 25);
    assert_eq!(billed(&close(&over, "2026-11"), &[("customer", "hostover")]), "3.00");
    // The entitlement itself: 20 × $100 = $2,000.00 upfront at acceptance, 1 Jan.
    let jan = close("", "2026-01");
    assert_eq!(billed(&jan, &[("customer", "hostco"), ("charge_type", "contract_upfront")]), "2000.00");
    // Netting ends with the 12-month term (1 Jan 2027): 25 metered then are 25 billed, $2.50.
    let after = rec("saas-hosts", "100000000033", "hosts", "2027-01-02T00:00:00Z", 25);
    assert_eq!(billed(&close(&after, "2027-01"), &[("customer", "hostco"), ("charge_type", "usage")]), "2.50");
}

#[test]
fn a_contract_dimension_that_is_also_metered_must_say_how_usage_meets_the_entitlement() {
    // Refused, not warned: the ambiguous form would bill every unit of usage the entitlement covers.
    let err = refused(|b| b.replace("contract_usage = \"net_against_entitlement\"\n", ""));
    assert!(
        err.contains("offer `hosts-net`: `hosts` is both a contract dimension and a metered one, which is ambiguous"),
        "{err}"
    );
    assert!(err.contains("net_against_entitlement") && err.contains("overage_only"), "{err}");
    // A volume over the term cannot be netted per hour.
    let err = refused(|b| {
        b.replace(
            "dimensions = [{ key = \"hosts\", category = \"hosts\", unit = \"host-hour\" }]",
            "dimensions = [{ key = \"hosts\", category = \"data\", unit = \"host-hour\" }]",
        )
    });
    assert!(err.contains("cannot be netted per hour"), "{err}");
}

#[test]
fn a_byol_only_product_is_refused_past_launch_plus_90_days_1_april_2026() {
    // byol-agent launched 1 Jan 2026 (its first price): a paid option is needed by 1 Apr 2026.
    let without_paid = |paid_from: Option<&str>| {
        let paid = "[[offers]]\nid = \"byol-paid\"\nproduct = \"byol-agent\"\nvisibility = \"public\"\ncurrency = \"USD\"\n[[offers.prices]]\neffective_from = \"2026-01-01T00:00:00Z\"\nusage = { nodes = { per_unit = \"0.05\" } }\n";
        assert_eq!(MODELS.matches(paid).count(), 1);
        match paid_from {
            None => MODELS.replace(paid, ""),
            Some(day) => MODELS.replace(paid, &paid.replace("2026-01-01", day)),
        }
    };
    let err = run(&without_paid(None), "", &[]).unwrap_err();
    assert!(
        err.contains("product `byol-agent` has no paid option beside BYOL by 2026-04-01")
            && err.contains("agreement `agmnt-byol` runs past that day")
            && err.contains("(PRC-16)"),
        "{err}"
    );
    // A paid option from exactly launch + 90 days is in time; a day later is not.
    assert!(run(&without_paid(Some("2026-04-01")), "", &[]).is_ok());
    assert!(run(&without_paid(Some("2026-04-02")), "", &[]).is_err());
    // BYOL-only is fine while every agreement ends within the first 90 days.
    let short = without_paid(None).replace(
        "offer = \"byol-public\"\nstart = \"2026-01-01T00:00:00Z\"\n",
        "offer = \"byol-public\"\nstart = \"2026-01-01T00:00:00Z\"\nend = \"2026-04-01T00:00:00Z\"\n",
    );
    assert!(run(&short, "", &[]).is_ok());
}

#[test]
fn a_partial_refund_of_500_of_a_2000_contract_credits_a_quarter_of_the_fee_15_and_names_the_line() {
    let v = close("", "2026-12");
    let r = one(&v, &[("customer", "standardco"), ("charge_type", "refund")]);
    assert_eq!(r["customer_billed_amount"], "-500.00");
    assert_eq!(r["amount_unrounded"], "-500.00");
    assert_eq!(r["listing_fee"], "-15.00"); // 60.00 × 500 / 2,000
    assert_eq!(r["seller_net"], "-485.00");
    assert_eq!(r["invoice_date"], "2026-12-03");
    assert_eq!(r["credits_line"], "INV-2026-11-standardco-USD-20261116/agmnt-standard/contract_upfront/");
    // The credited line is November's, unchanged: a refund is a new row, never an update.
    let nov = close("", "2026-11");
    let orig = one(&nov, &[("customer", "standardco"), ("charge_type", "contract_upfront")]);
    assert_eq!(orig["customer_billed_amount"], "2000.00");
    assert!(lines(&nov, &[("charge_type", "refund")]).is_empty());
}

#[test]
fn a_half_refund_of_a_cppo_contract_reverses_each_partys_share_by_half_edge_57() {
    // 90,000.00 billed: partner fee 350.00, cost of goods 80,000.00, manufacturer fee 2,800.00,
    // partner net 9,650.00, manufacturer net 77,200.00 → each × −0.5.
    let v = close("", "2026-12");
    let r = one(&v, &[("customer", "retailco"), ("charge_type", "refund")]);
    let col = |k: &str| r[k].as_str().unwrap().to_owned();
    assert_eq!(col("customer_billed_amount"), "-45000.00");
    assert_eq!(col("listing_fee"), "-175.00");
    assert_eq!(col("cost_of_goods"), "-40000.00");
    assert_eq!(col("manufacturer_listing_fee"), "-1400.00");
    assert_eq!(col("seller_net"), "-4825.00");
    assert_eq!(col("manufacturer_net"), "-38600.00");
    assert_eq!((col("channel"), col("seller_of_record")), ("cppo".to_owned(), "channelco".to_owned()));
    assert!(col("description").contains("authorised by the seller"));
}

#[test]
fn a_full_refund_of_a_metered_line_cancels_it_to_the_cent_edge_55() {
    // February: 30 hours × 100 api_calls = 3,000 → 1,000 × 0.10 + 2,000 × 0.05 = 200.00, fee
    // 6.00; refunded in full on 27 Feb: −200.00, −6.00, net −194.00; the month nets to zero.
    let usage = hourly("saas-tiers", "100000000001", "api_calls", "2026-02-01T00:00:00Z", 30, 100);
    let v = close(&usage, "2026-02");
    let tier = lines(&v, &[("customer", "tierco")]);
    assert_eq!(tier.len(), 2);
    let sum = |k: &str| -> rust_decimal::Decimal {
        tier.iter().map(|l| l[k].as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap()).sum()
    };
    for k in ["customer_billed_amount", "listing_fee", "seller_net", "amount_unrounded"] {
        assert!(sum(k).is_zero(), "{k} sums to {}", sum(k));
    }
    assert_eq!(billed(&v, &[("customer", "tierco"), ("charge_type", "refund")]), "-200.00");
    // Without the month's usage the credited line does not exist, and the close says which.
    let err = run(MODELS, "", &["--month", "2026-02", "--close"]).unwrap_err();
    assert!(
        err.contains(
            "refund `rf-metering`: credits the usage line of agreement `agmnt-tiers`, dimension `api_calls` in 2026-02"
        ),
        "{err}"
    );
}

#[test]
fn refunds_never_credit_more_than_was_billed_and_are_refused_by_name() {
    // A second refund of 1,600.00 after the 500.00: 2,100.00 > 2,000.00 billed.
    let more = MODELS.to_owned()
        + "\n[[refunds]]\nid = \"rf-too-much\"\nagreement = \"agmnt-standard\"\nmonth = \"2026-11\"\ncharge_type = \"contract_upfront\"\namount = \"1600.00\"\nissued = \"2026-12-20T00:00:00Z\"\nreason = \"goodwill\"\n";
    let err = run(&more, "", &["--month", "2026-12", "--close"]).unwrap_err();
    assert!(err.contains("refund `rf-too-much`: refunds of line INV-2026-11-standardco-USD-20261116/agmnt-standard/contract_upfront/ would total 2100.00, more than its billed 2000.00"), "{err}");
    // 1,500.00 is exactly the rest: accepted, and the line is refunded in full.
    let rest = more.replace("amount = \"1600.00\"", "amount = \"1500.00\"");
    let (_, v) = run(&rest, "", &["--month", "2026-12", "--close"]).unwrap();
    assert_eq!(lines(&v, &[("customer", "standardco"), ("charge_type", "refund")]).len(), 2);
    // Load-time rules: fractions of one line over 1, a private-offer refund without the
    // seller's authorisation, both fraction and amount.
    let cases: Vec<(&str, String)> = vec![
        (
            "add up to 1.5 of it; never more than was billed",
            refused(|b| {
                b.to_owned() + "\n[[refunds]]\nid = \"rf-retail-more\"\nagreement = \"agmnt-retail\"\nmonth = \"2026-11\"\ncharge_type = \"contract_upfront\"\nfraction = \"1\"\nissued = \"2026-12-11T00:00:00Z\"\nreason = \"x\"\nseller_authorised = true\n"
            }),
        ),
        (
            "need the seller's authorisation",
            refused(|b| {
                b.replace(
                    "reason = \"half the platform licences returned\"\nseller_authorised = true\n",
                    "reason = \"half the platform licences returned\"\n",
                )
            }),
        ),
        (
            "give either fraction (0 < f ≤ 1) or amount, not both",
            refused(|b| b.replace("amount = \"500.00\"\n", "amount = \"500.00\"\nfraction = \"0.25\"\n")),
        ),
    ];
    for (want, err) in cases {
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
}

#[test]
fn meterline_close_writes_refund_lines_to_the_sqlite_close_tables_and_the_csv_and_json_export() {
    // A store written before the `credits_line` column existed gains it on open.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("meterline.db");
    drop(meterline::store::Store::open(&db).unwrap());
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("ALTER TABLE invoice_lines DROP COLUMN credits_line")
        .unwrap();
    let book = dir.path().join("book.toml");
    std::fs::write(&book, MODELS).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meterline"))
        .args(["close", "--data-dir", dir.path().to_str().unwrap(), "--price-book", book.to_str().unwrap()])
        // December is still open today: closing it is an early close, on the operator's word.
        .args(["--month", "2026-12", "--cut-off-late-usage", "--out-dir", dir.path().join("out").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let credited = "INV-2026-11-standardco-USD-20261116/agmnt-standard/contract_upfront/";
    // SQLite: the negative line and the line it credits.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (billed, fee, credits): (String, String, String) = conn
        .query_row(
            "SELECT customer_billed_amount, listing_fee, credits_line FROM invoice_lines WHERE customer = 'standardco' AND charge_type = 'refund'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((billed.as_str(), fee.as_str(), credits.as_str()), ("-500.00", "-15.00", credited));
    // CSV: the credits_line column (then the DSOR partner's four, empty here); JSON: the same line.
    let csv = std::fs::read_to_string(dir.path().join("out/invoice-lines-2026-12.csv")).unwrap();
    assert!(csv.lines().next().unwrap().ends_with(
        ",metering_records,credits_line,distributor,distributor_cost_of_goods,distributor_listing_fee,distributor_net"
    ));
    let row = csv.lines().find(|l| l.contains(",refund,") && l.contains("standardco")).unwrap();
    assert!(row.ends_with(&format!(",0,{credited},,,,")) && row.contains(",-500.00,"), "{row}");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/invoice-lines-2026-12.json")).unwrap())
            .unwrap();
    let refunds: Vec<&Value> =
        json["lines"].as_array().unwrap().iter().filter(|l| l["charge_type"] == "refund").collect();
    assert_eq!(refunds.len(), 2);
    assert!(refunds.iter().any(|l| l["credits_line"] == credited));
}

/// A stage binary built beside this test (`cargo build --workspace --all-features --bins`).
fn stage_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(std::path::Path::parent).unwrap().join(name);
    assert!(p.exists(), "{} is missing: run cargo build --workspace --all-features --bins first", p.display());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_close_writes_refund_lines_naming_the_credited_line_to_clickhouse_invoice_lines() {
    // `aggregator close` applies migration 003 and writes December's two refunds of November
    // contracts (they need no usage): −500.00 / fee −15.00 and −45,000.00 / fee −175.00.
    let ch = testkit::ClickHouse::start().await.unwrap();
    let (db, _) = ch.database("refunds").await.unwrap();
    // `aggregator close` tells the raters of the close over Kafka before it reads the lines.
    let broker = testkit::Broker::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("book.toml");
    std::fs::write(&book, MODELS).unwrap();
    let config = dir.path().join("meterline.toml");
    std::fs::write(
        &config,
        format!(
            "price_book = \"{}\"\n[kafka]\nbootstrap = \"{}\"\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\n",
            book.display(),
            broker.bootstrap(),
            ch.url()
        ),
    )
    .unwrap();
    let out = Command::new(stage_bin("aggregator"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "close",
            "--month",
            "2026-12",
            "--cut-off-late-usage",
            "--out-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = ch
        .query_text(&format!(
            "SELECT customer, toString(customer_billed_amount), toString(listing_fee), toString(cost_of_goods), credits_line
             FROM {db}.invoice_lines_current WHERE charge_type = 'refund' ORDER BY customer"
        ))
        .await
        .unwrap();
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    let norm = |s: &str| s.parse::<rust_decimal::Decimal>().unwrap().normalize().to_string();
    let got: Vec<(String, String, String, String, String)> =
        rows.iter().map(|r| (r[0].into(), norm(r[1]), norm(r[2]), norm(r[3]), r[4].into())).collect();
    let want = |c: &str, b: &str, f: &str, g: &str, line: &str| (c.into(), b.into(), f.into(), g.into(), line.into());
    assert_eq!(
        got,
        vec![
            want(
                "retailco",
                "-45000",
                "-175",
                "-40000",
                "INV-2026-11-retailco-USD-20261101/agmnt-retail/contract_upfront/"
            ),
            want(
                "standardco",
                "-500",
                "-15",
                "0",
                "INV-2026-11-standardco-USD-20261116/agmnt-standard/contract_upfront/"
            ),
        ]
    );
    // Other lines carry no reference.
    let others = ch
        .query_text(&format!(
            "SELECT count() FROM {db}.invoice_lines WHERE charge_type != 'refund' AND credits_line != ''"
        ))
        .await
        .unwrap();
    assert_eq!(others.trim(), "0");
    // Migration 005: the DSOR channel sale's middle party in its own four columns (98,000.00 sold
    // by resellco; dsorco owes acme 85,000.00, pays a 175.00 fee and nets 4,825.00), written by
    // the close directly; no other line names a distributor.
    let dsor = ch
        .query_text(&format!(
            "SELECT customer, channel, distributor, toString(distributor_cost_of_goods), toString(distributor_listing_fee),
                    toString(distributor_net)
             FROM {db}.invoice_lines_current WHERE distributor != '' ORDER BY customer"
        ))
        .await
        .unwrap();
    let rows: Vec<Vec<String>> = dsor
        .lines()
        .map(|l| l.split('\t').enumerate().map(|(i, c)| if i >= 3 { norm(c) } else { c.to_owned() }).collect())
        .collect();
    assert_eq!(rows, vec![vec!["schoolco", "cppo", "dsorco", "85000", "175", "4825"]]);
    let nulls = ch
        .query_text(&format!(
            "SELECT count() FROM {db}.invoice_lines WHERE distributor = '' AND distributor_net IS NOT NULL"
        ))
        .await
        .unwrap();
    assert_eq!(nulls.trim(), "0");
}

#[test]
fn resale_authorisations_are_one_time_or_recurring_and_sell_nothing_after_they_expire() {
    // acme-to-channelco is one-time and expires 31 Dec 2026; retailco accepted on 1 Nov.
    let v = close("", "2026-11");
    assert_eq!(billed(&v, &[("customer", "retailco"), ("charge_type", "contract_upfront")]), "90000.00");
    let second_buyer =
        |b: &str| b.replace("buyers = [\"retailco\"]\nresale", "buyers = [\"retailco\", \"eurco\"]\nresale");
    let cases: Vec<(&str, String)> = vec![
        // One-time: a second buyer on the offer.
        ("resale `acme-to-channelco` is one-time: it allows one offer to one buyer", refused(second_buyer)),
        // Accepted after the expiry: 1 Jan 2027 > 31 Dec 2026.
        (
            "agreement `agmnt-retail` was accepted at 2027-01-01T00:00:00.000Z under resale `acme-to-channelco`, which expired at 2026-12-31T00:00:00.000Z",
            refused(|b| b.replace("offer = \"suite-cppo\"\nstart = \"2026-11-01T00:00:00Z\"", "offer = \"suite-cppo\"\nstart = \"2027-01-01T00:00:00Z\"")),
        ),
    ];
    for (want, err) in cases {
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
    // Recurring (the default): the same second buyer is fine.
    let recurring = second_buyer(MODELS).replace("kind = \"one_time\"\n", "");
    run(&recurring, "", &[]).unwrap();
    // One-time, accepted twice: a second agreement under the same offer (after the first ends).
    let twice = MODELS.replace(
        "offer = \"suite-cppo\"\nstart = \"2026-11-01T00:00:00Z\"\n",
        "offer = \"suite-cppo\"\nstart = \"2026-11-01T00:00:00Z\"\nend = \"2026-11-20T00:00:00Z\"\n",
    ) + "\n[[agreements]]\nid = \"agmnt-retail-2\"\ncustomer = \"retailco\"\nproduct = \"suite\"\noffer = \"suite-cppo\"\nstart = \"2026-11-20T00:00:00Z\"\n";
    let err = run(&twice, "", &[]).unwrap_err();
    assert!(
        err.contains("is one-time: it is accepted once, but agreements `agmnt-retail` and `agmnt-retail-2` use it"),
        "{err}"
    );
}

#[test]
fn dsor_channel_model_splits_98000_between_reseller_dsor_partner_and_manufacturer_section_3_13() {
    // Resell Co bills 98,000.00, owes DSOR Co 90,000.00, which owes acme 85,000.00; 3.5 % each
    // on its own share: 280.00 (net 7,720.00), 175.00 (net 4,825.00), 2,975.00 (net 82,025.00).
    let v = close("", "2026-12");
    let l = one(&v, &[("customer", "schoolco"), ("charge_type", "contract_upfront")]);
    let col = |k: &str| l[k].as_str().unwrap().to_owned();
    assert_eq!(
        (col("seller_of_record"), col("manufacturer"), col("channel")),
        ("resellco".into(), "acme".into(), "cppo".into())
    );
    assert_eq!(col("customer_billed_amount"), "98000.00");
    assert_eq!(col("listing_fee_rate"), "0.035");
    assert_eq!(
        (col("listing_fee"), col("cost_of_goods"), col("seller_net")),
        ("280.00".into(), "90000.00".into(), "7720.00".into())
    );
    let d = &l["distributor"];
    assert_eq!(d["party"], "dsorco");
    assert_eq!(
        (d["cost_of_goods"].as_str(), d["listing_fee"].as_str(), d["net"].as_str()),
        (Some("85000.00"), Some("175.00"), Some("4825.00"))
    );
    assert_eq!((col("manufacturer_listing_fee"), col("manufacturer_net")), ("2975.00".into(), "82025.00".into()));
    // Every cent is someone's: nets + fees = billed.
    let dec = |s: &str| s.parse::<rust_decimal::Decimal>().unwrap();
    let parts = ["seller_net", "listing_fee", "manufacturer_listing_fee", "manufacturer_net"]
        .iter()
        .map(|k| dec(&col(k)))
        .sum::<rust_decimal::Decimal>()
        + dec(d["net"].as_str().unwrap())
        + dec(d["listing_fee"].as_str().unwrap());
    assert_eq!(parts, dec("98000.00"));
    // The party nets of the close name all three.
    let nets = v["close_totals"]["party_net"].as_array().unwrap();
    let net = |p: &str| nets.iter().find(|n| n[0] == p).map(|n| n[2].as_str().unwrap().to_owned());
    assert_eq!(net("resellco").as_deref(), Some("7720.00"));
    // A one-level DSOR sale has no middle party.
    assert!(one(&close("", "2026-11"), &[("customer", "govco"), ("charge_type", "contract_upfront")])
        .get("distributor")
        .is_none());
}

#[test]
fn a_two_level_resale_chain_is_cppo_under_dsor_two_levels_at_most() {
    let cases: Vec<(&str, String)> = vec![
        (
            "the DSOR channel model is a cppo authorisation under a dsor one, not cppo under cppo",
            refused(|b| b.replace("parent = \"acme-to-dsorco\"", "parent = \"acme-to-channelco\"")),
        ),
        (
            "the parent authorisation is not defined",
            refused(|b| b.replace("parent = \"acme-to-dsorco\"", "parent = \"nobody\"")),
        ),
        ("`dsorco` cannot resell to itself", refused(|b| b.replace("partner = \"resellco\"", "partner = \"dsorco\""))),
    ];
    for (want, err) in cases {
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
}

#[test]
fn a_full_refund_of_a_two_level_resale_line_reverses_all_three_parties_to_the_cent() {
    let book = MODELS.to_owned()
        + "\n[[refunds]]\nid = \"rf-school\"\nagreement = \"agmnt-school\"\nmonth = \"2026-12\"\ncharge_type = \"contract_upfront\"\nfraction = \"1\"\nissued = \"2026-12-15T00:00:00Z\"\nreason = \"cancelled within 48 hours\"\nseller_authorised = true\n";
    let (_, v) = run(&book, "", &["--month", "2026-12", "--close"]).unwrap();
    let school = lines(&v, &[("customer", "schoolco")]);
    assert_eq!(school.len(), 2);
    let dec = |x: &Value| x.as_str().unwrap().parse::<rust_decimal::Decimal>().unwrap();
    for k in [
        "customer_billed_amount",
        "listing_fee",
        "cost_of_goods",
        "seller_net",
        "manufacturer_listing_fee",
        "manufacturer_net",
    ] {
        assert!(school.iter().map(|l| dec(&l[k])).sum::<rust_decimal::Decimal>().is_zero(), "{k}");
    }
    for k in ["cost_of_goods", "listing_fee", "net"] {
        assert!(
            school.iter().map(|l| dec(&l["distributor"][k])).sum::<rust_decimal::Decimal>().is_zero(),
            "distributor {k}"
        );
    }
    let refund = one(&v, &[("customer", "schoolco"), ("charge_type", "refund")]);
    assert_eq!(refund["distributor"]["net"], "-4825.00");
}

#[test]
fn december_close_with_refunds_and_a_two_level_resale_is_golden() {
    // Issue 17's lines together: the two refunds of November contracts (−500.00, −45,000.00),
    // the DSOR channel sale (98,000.00 split 7,720.00 / 4,825.00 / 82,025.00 net) and annualco's
    // usage beside its annual coverage (3 running, 2 covered → 0.50).
    let usage = rec("vm-hourly", "100000000030", "m5_large", "2026-12-02T00:00:00Z", 3);
    let (text, _) = run(MODELS, &usage, &["--month", "2026-12", "--close"]).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/month_close_2026_12.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    assert_eq!(text, std::fs::read_to_string(path).expect("run with UPDATE_GOLDEN=1 once"), "differs from {path}");
}

#[test]
fn an_annual_amendment_of_181_days_is_prorated_2000_x_181_over_365_is_991_78() {
    // annualco adds one c5.xlarge on 1 Sep 2026 to the end of its term (1 Mar 2027): 181 of the
    // 365 days of the year from 1 Sep, 2,000 × 181 / 365 = 991.780821… → 991.78.
    let book = MODELS.replace(
        "  { dimension = \"m5_large\", units = 2, start = \"2027-03-01T00:00:00Z\", end = \"2028-03-01T00:00:00Z\", renewal = true },\n",
        "  { dimension = \"m5_large\", units = 2, start = \"2027-03-01T00:00:00Z\", end = \"2028-03-01T00:00:00Z\", renewal = true },\n  { dimension = \"c5_xlarge\", units = 1, start = \"2026-09-01T00:00:00Z\", end = \"2027-03-01T00:00:00Z\" },\n",
    );
    assert_ne!(book, MODELS);
    let (_, v) = run(&book, "", &["--month", "2026-09", "--close"]).unwrap();
    let l = one(&v, &[("customer", "annualco"), ("charge_type", "annual")]);
    assert_eq!(l["customer_billed_amount"], "991.78");
    assert!(l["amount_unrounded"].as_str().unwrap().starts_with("991.780821"), "{l}");
    assert!(l["description"].as_str().unwrap().contains("181/365 days of a year"), "{l}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_005_applies_to_an_existing_004_database_once_and_its_rows_read_the_defaults() {
    // A database as 004 left it (migrations 1–4 applied and recorded), with a line in each table.
    let ch = testkit::ClickHouse::start().await.unwrap();
    let (db, _) = ch.database("migrate_005").await.unwrap();
    ch.query_text(&format!(
        "CREATE TABLE {db}.schema_migrations (version UInt32, name String, applied_at DateTime) ENGINE = TinyLog"
    ))
    .await
    .unwrap();
    let files = [
        include_str!("../../deploy/clickhouse/001_init.sql"),
        include_str!("../../deploy/clickhouse/002_invoice_lines.sql"),
        include_str!("../../deploy/clickhouse/003_refunds.sql"),
        include_str!("../../deploy/clickhouse/004_closed_months.sql"),
    ];
    for (v, sql) in files.iter().enumerate() {
        let code: String = sql
            .lines()
            .map(|l| l.split("--").next().unwrap())
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        for stmt in code.split(";\n").map(|s| s.trim().trim_end_matches(';')).filter(|s| !s.is_empty()) {
            ch.query_text(&stmt.replace("{database}", &db)).await.unwrap();
        }
        ch.query_text(&format!("INSERT INTO {db}.schema_migrations VALUES ({}, '00{}', now())", v + 1, v + 1))
            .await
            .unwrap();
    }
    ch.query_text(&format!(
        "INSERT INTO {db}.monthly_charges (month, customer, charge_type) VALUES ('2026-10-01', 'old', 'usage')"
    ))
    .await
    .unwrap();
    ch.query_text(&format!(
        "INSERT INTO {db}.invoice_lines (billing_month, customer, charge_type) VALUES ('2026-10-01', 'old', 'usage')"
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("book.toml");
    std::fs::write(&book, MODELS).unwrap();
    let config = dir.path().join("meterline.toml");
    std::fs::write(
        &config,
        format!(
            "price_book = \"{}\"\n[kafka]\nbootstrap = \"127.0.0.1:9\"\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\n",
            book.display(),
            ch.url()
        ),
    )
    .unwrap();
    let migrate = || {
        Command::new(stage_bin("aggregator")).args(["--config", config.to_str().unwrap(), "migrate"]).output().unwrap()
    };
    for _ in 0..2 {
        // The first run applies 005 (and 006, which came later); the second finds them recorded
        // and changes nothing.
        let out = migrate();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let versions =
        ch.query_text(&format!("SELECT version FROM {db}.schema_migrations ORDER BY version")).await.unwrap();
    assert_eq!(versions.split_whitespace().collect::<Vec<_>>(), ["1", "2", "3", "4", "5", "6"]);
    let old = ch
        .query_text(&format!("SELECT concat('[', corrections, ']') FROM {db}.monthly_charges WHERE customer = 'old'"))
        .await
        .unwrap();
    assert_eq!(old.trim(), "[]");
    let old = ch
        .query_text(&format!(
            "SELECT concat('[', corrects, '|', distributor, ']'), isNull(distributor_net) FROM {db}.invoice_lines_current WHERE customer = 'old'"
        ))
        .await
        .unwrap();
    assert_eq!(old.trim(), "[|]\t1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_close_reads_a_clickhouse_correction_line_and_writes_it_naming_october_at_25_00() {
    // The fold's row for tierco's 500 late October api_calls on November (October closed at
    // 3,000: the 0.05 tier), as the aggregator writes it; `aggregator close` reads it back from
    // monthly_charges and writes the invoice line with the month it corrects.
    let ch = testkit::ClickHouse::start().await.unwrap();
    let (db, _) = ch.database("correction_close").await.unwrap();
    let broker = testkit::Broker::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let own = MODELS.replace("late_usage = \"refuse\"", "late_usage = \"correction_next_month\"");
    let book = dir.path().join("book.toml");
    std::fs::write(&book, &own).unwrap();
    let config = dir.path().join("meterline.toml");
    std::fs::write(
        &config,
        format!(
            "price_book = \"{}\"\n[kafka]\nbootstrap = \"{}\"\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\n",
            book.display(),
            broker.bootstrap(),
            ch.url()
        ),
    )
    .unwrap();
    let aggregator = |args: &[&str]| {
        let out = Command::new(stage_bin("aggregator"))
            .args(["--config", config.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    aggregator(&["migrate"]);
    let d = |s: &str| s.parse::<rust_decimal::Decimal>().unwrap();
    let correction = common::rated::Correction {
        month: common::time::Month::parse("2026-10").unwrap(),
        closed_quantity: d("3000"),
        late_quantity: d("500"),
        price: common::pricing::UsagePrice::Graduated(vec![
            common::pricing::Tier { up_to: Some(d("1000")), rate: d("0.10") },
            common::pricing::Tier { up_to: Some(d("10000")), rate: d("0.05") },
            common::pricing::Tier { up_to: None, rate: d("0.01") },
        ]),
    };
    assert_eq!(correction.amount(), Some(d("25")));
    let json = common::rated::corrections_text(&[correction]);
    // 2026-11-01T00:00Z and 2026-12-01T00:00Z in seconds.
    ch.query_text(&format!(
        "INSERT INTO {db}.monthly_charges (month, usage_period_start, usage_period_end, marketplace, customer, seller_of_record,
             manufacturer, channel, product, agreement_id, offer_id, dimension, charge_type, pricing_model, currency, quantity,
             covered_quantity, billable_quantity, unit_rate, mixed_rates, month_price, month_priced_quantity, record_amounts,
             amount_unrounded, customer_billed_amount, records, source_partition, version, corrections)
         VALUES ('2026-11-01', toDateTime(1793491200), toDateTime(1796083200), 'aws', 'tierco', 'acme', 'acme', 'direct',
             'saas-tiers', 'agmnt-tiers', 'tiers-public', 'api_calls', 'adjustment', 'graduated', 'USD', 500, 0, 500, 0.10, 0,
             '', 0, 0, 25, 25, 1, 0, 1, '{json}')"
    ))
    .await
    .unwrap();
    aggregator(&["close", "--month", "2026-11", "--out-dir", dir.path().to_str().unwrap()]);
    let text = ch
        .query_text(&format!(
            "SELECT corrects, toString(customer_billed_amount), toString(quantity), description FROM {db}.invoice_lines_current
             WHERE charge_type = 'adjustment'"
        ))
        .await
        .unwrap();
    let row: Vec<&str> = text.trim().split('\t').collect();
    let norm = |s: &str| d(s).normalize().to_string();
    assert_eq!((row[0], norm(row[1]), norm(row[2])), ("2026-10", "25".into(), "500".into()), "{text}");
    assert!(row[3].contains("2026-10: 500 late units priced from 3000 to 3500"), "{text}");
    // The CSV export says the same.
    let csv = std::fs::read_to_string(dir.path().join("invoice-lines-2026-11.csv")).unwrap();
    assert!(csv.lines().next().unwrap().contains(",description,corrects,pricing_model,"));
    assert!(csv
        .lines()
        .any(|l| l.contains(",adjustment,") && l.contains(",2026-10,graduated,") && l.contains(",25.00,")));
}
