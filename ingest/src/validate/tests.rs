//! Edge cases of domain-rules §6 (ingestion, allocations and tags) against the example price book.

use super::*;
use crate::wire::WireRecord;
use common::catalogue::PriceBook;

const BOOK: &str = include_str!("../../../docs/examples/price-book.toml");

fn book() -> PriceBook {
    PriceBook::from_toml(BOOK).expect("example price book is valid")
}

fn ts(s: &str) -> Timestamp {
    Timestamp::parse_rfc3339(s).unwrap()
}

/// Validates `json` as a record of `acme-analytics` sent by acme at `now`.
fn check(json: &str, now: &str) -> Result<UsageRecord, Rejection> {
    check_as(json, now, "acme")
}

fn check_as(json: &str, now: &str, seller: &str) -> Result<UsageRecord, Rejection> {
    let b = book();
    let s = b.doc().sellers.iter().find(|s| s.id == seller).unwrap().clone();
    let wire: WireRecord<'_> = match crate::wire::parse_record(json) {
        Ok(w) => w,
        Err(e) => return Err(Rejection::new(RejectCode::InvalidRecord, e)),
    };
    let cx = Context { book: &b, caller: Caller::Seller(&s), now: Some(ts(now)), received_at: ts(now) };
    validate(&wire, Some("acme-analytics"), &cx)
}

fn code(r: Result<UsageRecord, Rejection>) -> RejectCode {
    r.expect_err("expected a rejection").code
}

const NOW: &str = "2026-10-10T12:10:00Z";

fn rec(extra: &str) -> String {
    format!(r#"{{"Timestamp":"2026-10-10T11:30:00Z","CustomerIdentifier":"cid-alpha","Dimension":"users"{extra}}}"#)
}

#[test]
fn a_plain_record_is_accepted_and_resolved() {
    let r = check(&rec(r#","Quantity":100"#), NOW).unwrap();
    assert_eq!(r.customer, "cust-a");
    assert_eq!(r.quantity, Decimal::from(100));
    assert_eq!(r.seller, "acme");
}

#[test]
fn epoch_seconds_as_sdks_send_them_are_accepted() {
    // 2026-10-10T11:30:00Z = 1791631800
    let r = check(
        r#"{"Timestamp":1791631800.5,"CustomerAWSAccountId":"111122223333","Dimension":"users","Quantity":1}"#,
        NOW,
    )
    .unwrap();
    assert_eq!(r.timestamp, ts("2026-10-10T11:30:00.500Z"));
}

#[test]
fn window_edges_5h59m59s_accepted_6h00m01s_rejected() {
    let now = "2026-10-10T12:00:00Z";
    let at =
        |t: &str| format!(r#"{{"Timestamp":"{t}","CustomerIdentifier":"cid-alpha","Dimension":"users","Quantity":1}}"#);
    check(&at("2026-10-10T06:00:01Z"), now).unwrap();
    assert_eq!(code(check(&at("2026-10-10T05:59:59Z"), now)), RejectCode::TimestampOutOfBounds);
}

#[test]
fn future_hour_is_rejected_current_hour_and_skew_accepted() {
    let at =
        |t: &str| format!(r#"{{"Timestamp":"{t}","CustomerIdentifier":"cid-alpha","Dimension":"users","Quantity":1}}"#);
    // now 12:10: 12:50 is this hour; 13:00 is a future hour.
    check(&at("2026-10-10T12:50:00Z"), NOW).unwrap();
    assert_eq!(code(check(&at("2026-10-10T13:00:00Z"), NOW)), RejectCode::TimestampOutOfBounds);
    // now 12:57 with 5 min skew: a seller clock 2 min ahead (13:01) is tolerated.
    check(&at("2026-10-10T13:01:00Z"), "2026-10-10T12:57:00Z").unwrap();
}

#[test]
fn quantity_bounds_omitted_and_null_refused_max_ok_over_and_negative_rejected() {
    // Never a quantity the seller did not send: no field and `null` are refused, 0 is sent as 0.
    let omitted = check(&rec(""), NOW).unwrap_err();
    assert_eq!(omitted.code, RejectCode::InvalidQuantity);
    assert!(omitted.message.contains("no quantity"), "{}", omitted.message);
    let null = check(&rec(r#","Quantity":null"#), NOW).unwrap_err();
    assert!(null.code == RejectCode::InvalidQuantity && null.message.contains("null"), "{null:?}");
    assert_eq!(code(check(&rec(r#","QuantityAsDecimal":null"#), NOW)), RejectCode::InvalidQuantity);
    assert_eq!(check(&rec(r#","Quantity":0"#), NOW).unwrap().quantity, Decimal::ZERO);
    check(&rec(r#","Quantity":2147483647"#), NOW).unwrap();
    assert_eq!(code(check(&rec(r#","Quantity":2147483648"#), NOW)), RejectCode::InvalidQuantity);
    assert_eq!(code(check(&rec(r#","Quantity":-1"#), NOW)), RejectCode::InvalidQuantity);
    assert_eq!(code(check(&rec(r#","Quantity":2.5"#), NOW)), RejectCode::InvalidQuantity);
    assert_eq!(code(check(&rec(r#","Quantity":"5""#), NOW)), RejectCode::InvalidQuantity);
    assert_eq!(code(check(&rec(r#","Quantity":1e400"#), NOW)), RejectCode::InvalidQuantity);
    assert_eq!(
        code(check(&rec(r#","Quantity":99999999999999999999999999999999999"#), NOW)),
        RejectCode::InvalidQuantity
    );
    assert_eq!(check(&rec(r#","Quantity":5.0"#), NOW).unwrap().quantity, Decimal::from(5));
}

#[test]
fn customer_ids_both_neither_and_non_digit_are_rejected() {
    let both = r#"{"Timestamp":"2026-10-10T11:30:00Z","CustomerIdentifier":"cid-alpha","CustomerAWSAccountId":"111122223333","Dimension":"users","Quantity":1}"#;
    assert_eq!(code(check(both, NOW)), RejectCode::InvalidCustomerIdentifier);
    let neither = r#"{"Timestamp":"2026-10-10T11:30:00Z","Dimension":"users","Quantity":1}"#;
    assert_eq!(code(check(neither, NOW)), RejectCode::InvalidCustomerIdentifier);
    let letters =
        r#"{"Timestamp":"2026-10-10T11:30:00Z","CustomerAWSAccountId":"1111-2222","Dimension":"users","Quantity":1}"#;
    assert_eq!(code(check(letters, NOW)), RejectCode::InvalidCustomerIdentifier);
    let unknown =
        r#"{"Timestamp":"2026-10-10T11:30:00Z","CustomerIdentifier":"nobody","Dimension":"users","Quantity":1}"#;
    assert_eq!(code(check(unknown, NOW)), RejectCode::CustomerNotSubscribed);
}

#[test]
fn identifier_and_account_id_normalise_to_one_customer() {
    let by_ci = check(&rec(r#","Quantity":3"#), NOW).unwrap();
    let by_acct = check(
        r#"{"Timestamp":"2026-10-10T11:30:00Z","CustomerAWSAccountId":"111122223333","Dimension":"users","Quantity":3}"#,
        NOW,
    )
    .unwrap();
    assert_eq!(by_ci.customer, by_acct.customer);
    assert_eq!(by_ci.dedup_key(), by_acct.dedup_key());
    assert_eq!(by_ci.record_id(), by_acct.record_id());
}

#[test]
fn unknown_dimension_and_wrong_case_are_named() {
    let r = check(
        r#"{"Timestamp":"2026-10-10T11:30:00Z","CustomerIdentifier":"cid-alpha","Dimension":"Users","Quantity":1}"#,
        NOW,
    );
    let e = r.unwrap_err();
    assert_eq!(e.code, RejectCode::InvalidUsageDimension);
    assert!(e.message.contains("did you mean `users`"), "{}", e.message);
    let r = check(
        r#"{"Timestamp":"2026-10-10T11:30:00Z","CustomerIdentifier":"cid-alpha","Dimension":"cpu","Quantity":1}"#,
        NOW,
    );
    assert_eq!(code(r), RejectCode::InvalidUsageDimension);
}

#[test]
fn another_sellers_product_is_refused() {
    let r = check_as(&rec(r#","Quantity":1"#), NOW, "globex");
    assert_eq!(code(r), RejectCode::InvalidProductCode);
}

#[test]
fn usage_before_a_future_dated_agreement_starts_is_refused() {
    let at =
        |t: &str| format!(r#"{{"Timestamp":"{t}","CustomerIdentifier":"cid-gamma","Dimension":"users","Quantity":1}}"#);
    let e = check(&at("2026-10-10T11:30:00Z"), NOW).unwrap_err();
    assert_eq!(e.code, RejectCode::TimestampOutOfBounds);
    assert!(e.message.contains("before agreement `agmnt-c-analytics` starts"), "{}", e.message);
    check(&at("2026-10-15T00:30:00Z"), "2026-10-15T01:00:00Z").unwrap();
}

#[test]
fn final_records_within_one_hour_of_agreement_end_then_refused() {
    let at =
        |t: &str| format!(r#"{{"Timestamp":"{t}","CustomerIdentifier":"cid-gamma","Dimension":"users","Quantity":1}}"#);
    // Agreement ends 2026-10-25T00:00Z: 23:30 usage sent at 00:50 is accepted, at 01:10 refused.
    check(&at("2026-10-24T23:30:00Z"), "2026-10-25T00:50:00Z").unwrap();
    assert_eq!(code(check(&at("2026-10-24T23:30:00Z"), "2026-10-25T01:10:00Z")), RejectCode::TimestampOutOfBounds);
    assert_eq!(code(check(&at("2026-10-25T00:10:00Z"), "2026-10-25T00:20:00Z")), RejectCode::TimestampOutOfBounds);
}

fn alloc(json: &str) -> String {
    rec(&format!(r#","Quantity":10,"UsageAllocations":{json}"#))
}

#[test]
fn allocations_must_sum_to_quantity() {
    check(
        &alloc(r#"[{"AllocatedUsageQuantity":4,"Tags":[{"Key":"team","Value":"a"}]},{"AllocatedUsageQuantity":6}]"#),
        NOW,
    )
    .unwrap();
    let off_by_one =
        alloc(r#"[{"AllocatedUsageQuantity":4,"Tags":[{"Key":"team","Value":"a"}]},{"AllocatedUsageQuantity":5}]"#);
    assert_eq!(code(check(&off_by_one, NOW)), RejectCode::InvalidUsageAllocations);
}

#[test]
fn one_untagged_bucket_ok_two_rejected() {
    let two = alloc(r#"[{"AllocatedUsageQuantity":4},{"AllocatedUsageQuantity":6}]"#);
    assert_eq!(code(check(&two, NOW)), RejectCode::InvalidUsageAllocations);
}

#[test]
fn same_tag_set_in_another_order_is_a_repeat() {
    let j = alloc(
        r#"[{"AllocatedUsageQuantity":4,"Tags":[{"Key":"a","Value":"1"},{"Key":"b","Value":"2"}]},
            {"AllocatedUsageQuantity":6,"Tags":[{"Key":"b","Value":"2"},{"Key":"a","Value":"1"}]}]"#,
    );
    assert_eq!(code(check(&j, NOW)), RejectCode::InvalidUsageAllocations);
}

fn tags(n: usize, key_len: usize, val_len: usize) -> String {
    let t: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"Key":"{}{i}","Value":"{}"}}"#, "k".repeat(key_len - 1), "v".repeat(val_len)))
        .collect();
    alloc(&format!(r#"[{{"AllocatedUsageQuantity":10,"Tags":[{}]}}]"#, t.join(",")))
}

#[test]
fn tag_limits_5_tags_100_char_keys_256_char_values() {
    check(&tags(5, 100, 256), NOW).unwrap();
    assert_eq!(code(check(&tags(6, 10, 10), NOW)), RejectCode::InvalidTag);
    assert_eq!(code(check(&tags(1, 101, 10), NOW)), RejectCode::InvalidTag);
    assert_eq!(code(check(&tags(1, 10, 257), NOW)), RejectCode::InvalidTag);
    let empty = alloc(r#"[{"AllocatedUsageQuantity":10,"Tags":[{"Key":"team","Value":""}]}]"#);
    assert_eq!(code(check(&empty, NOW)), RejectCode::InvalidTag);
}

#[test]
fn tag_characters_follow_the_prose_whitelist() {
    let with = |v: &str| alloc(&format!(r#"[{{"AllocatedUsageQuantity":10,"Tags":[{{"Key":"k","Value":"{v}"}}]}}]"#));
    check(&with("a b+c-d=e.f_g:h/i@j"), NOW).unwrap();
    check(&with(r"back\\slash"), NOW).unwrap();
    for v in ["a#b", "50%", "a,b", "(x)", "café"] {
        assert_eq!(code(check(&with(v), NOW)), RejectCode::InvalidTag, "{v}");
    }
}

#[test]
fn allocation_count_limit_2500_ok_2501_rejected() {
    let make = |n: usize| {
        let a: Vec<String> =
            (0..n).map(|i| format!(r#"{{"AllocatedUsageQuantity":1,"Tags":[{{"Key":"i","Value":"{i}"}}]}}"#)).collect();
        rec(&format!(r#","Quantity":{n},"UsageAllocations":[{}]"#, a.join(",")))
    };
    check(&make(2500), NOW).unwrap();
    assert_eq!(code(check(&make(2501), NOW)), RejectCode::InvalidUsageAllocations);
}

#[test]
fn zero_quantity_with_zero_allocations_is_fine() {
    let j = rec(r#","Quantity":0,"UsageAllocations":[{"AllocatedUsageQuantity":0,"Tags":[{"Key":"t","Value":"x"}]}]"#);
    check(&j, NOW).unwrap();
}

#[test]
fn missing_or_garbled_timestamp_is_an_invalid_record() {
    let j = r#"{"CustomerIdentifier":"cid-alpha","Dimension":"users","Quantity":1}"#;
    assert_eq!(code(check(j, NOW)), RejectCode::InvalidRecord);
    let j = r#"{"Timestamp":"yesterday","CustomerIdentifier":"cid-alpha","Dimension":"users","Quantity":1}"#;
    assert_eq!(code(check(j, NOW)), RejectCode::InvalidRecord);
    let j = r#"{"Timestamp":1791631800000,"CustomerIdentifier":"cid-alpha","Dimension":"users","Quantity":1}"#;
    assert_eq!(code(check(j, NOW)), RejectCode::InvalidRecord, "milliseconds sent as seconds");
}

#[test]
fn quantity_as_decimal_is_metered_exactly_and_conflicts_are_refused() {
    // The current model's field, as a number or as decimal text.
    assert_eq!(check(&rec(r#","QuantityAsDecimal":250"#), NOW).unwrap().quantity, Decimal::from(250));
    assert_eq!(check(&rec(r#","QuantityAsDecimal":"250""#), NOW).unwrap().quantity, Decimal::from(250));
    assert_eq!(check(&rec(r#","QuantityAsDecimal":250.000"#), NOW).unwrap().quantity, Decimal::from(250));
    // A fraction only where the profile allows it (the AWS profile is integer).
    let frac = check(&rec(r#","QuantityAsDecimal":"2.5""#), NOW).unwrap_err();
    assert!(frac.code == RejectCode::InvalidQuantity && frac.message.contains("whole number"), "{frac:?}");
    for bad in [r#""-1""#, r#""1e3""#, r#""""#, r#"" 5""#, r#""5.""#, r#""abc""#, "-3"] {
        assert_eq!(
            code(check(&rec(&format!(r#","QuantityAsDecimal":{bad}"#)), NOW)),
            RejectCode::InvalidQuantity,
            "{bad}"
        );
    }
    // Both fields: refused as the current model says, different values never guessed between.
    let same = check(&rec(r#","Quantity":7,"QuantityAsDecimal":"7.0""#), NOW).unwrap_err();
    assert!(same.code == RejectCode::InvalidQuantity && same.message.contains("both sent"), "{same:?}");
    let both = check(&rec(r#","Quantity":7,"QuantityAsDecimal":8"#), NOW).unwrap_err();
    assert!(both.code == RejectCode::InvalidQuantity && both.message.contains("differ"), "{both:?}");
}

#[test]
fn a_field_that_differs_only_by_case_is_refused_by_name() {
    let r = check(&rec(r#","quantity":250"#), NOW).unwrap_err();
    assert_eq!(r.code, RejectCode::InvalidRecord);
    assert!(r.message.contains("`quantity`") && r.message.contains("`Quantity`"), "{}", r.message);
    let r = check(&rec(r#","Quantity":1,"quantityAsDecimal":2"#), NOW).unwrap_err();
    assert!(r.message.contains("`QuantityAsDecimal`"), "{}", r.message);
    // Unknown fields that are not near a known one stay ignored.
    check(&rec(r#","Quantity":1,"ClientToken":"x","Unrelated":{"a":[1]}"#), NOW).unwrap();
}

#[test]
fn decimal_quantity_fields_keep_fractions_exactly_under_a_decimal_profile() {
    let b = PriceBook::from_toml(include_str!("../../../docs/examples/softline.toml")).unwrap();
    let s = b.doc().sellers[0].clone();
    let product = b.doc().products[0].code.clone();
    let dim = b.doc().products[0].dimensions[0].key.clone();
    let cid = b.doc().customers[0].customer_identifier.clone().unwrap();
    let start = b.doc().agreements[0].start;
    let ts = start.plus_millis(3_600_000);
    let json = format!(
        r#"{{"Timestamp":{},"CustomerIdentifier":"{cid}","Dimension":"{dim}","QuantityAsDecimal":"12.3456789012"}}"#,
        ts.millis() / 1000
    );
    let wire = crate::wire::parse_record(&json).unwrap();
    let cx = Context { book: &b, caller: Caller::Seller(&s), now: None, received_at: ts };
    let r = validate(&wire, Some(&product), &cx);
    // 10 decimal places exceed the profile's 9: refused by name, never rounded.
    assert_eq!(code(r), RejectCode::InvalidQuantity);
    let json = json.replace("12.3456789012", "12.345678");
    let wire = crate::wire::parse_record(&json).unwrap();
    assert_eq!(validate(&wire, Some(&product), &cx).unwrap().quantity, "12.345678".parse::<Decimal>().unwrap());
}

#[test]
fn allocations_take_exactly_one_quantity_field() {
    let with = |alloc: &str| rec(&format!(r#","QuantityAsDecimal":"5","UsageAllocations":[{alloc}]"#));
    let r = check(&with(r#"{"AllocatedUsageQuantityAsDecimal":"5"}"#), NOW).unwrap();
    assert_eq!(r.allocations[0].quantity, Decimal::from(5));
    check(&with(r#"{"AllocatedUsageQuantity":5}"#), NOW).unwrap();
    let both = check(&with(r#"{"AllocatedUsageQuantity":5,"AllocatedUsageQuantityAsDecimal":"5"}"#), NOW).unwrap_err();
    assert!(both.code == RejectCode::InvalidUsageAllocations && both.message.contains("not both"), "{both:?}");
    let none = check(&with(r#"{"Tags":[{"Key":"a","Value":"b"}]}"#), NOW).unwrap_err();
    assert_eq!(none.code, RejectCode::InvalidUsageAllocations);
    let null = check(&with(r#"{"AllocatedUsageQuantity":null}"#), NOW).unwrap_err();
    assert!(null.message.contains("null"), "{null:?}");
}
