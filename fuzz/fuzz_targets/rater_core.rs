//! The dedup + rating core (`rater::decision::Rater`) fed arbitrary records against the example
//! price book, interleaved with commits, rollbacks and evictions, as a raw-topic consumer would
//! see them (records there are not re-validated, so the core must be total).
//! Properties: no panic; after a commit, an identical record is `Identical` and a different
//! quantity in the same slot is refused, never rated twice; a rated record keeps its quantity and
//! `amount = billable × rate` with `billable = quantity − covered ≥ 0`.
#![no_main]

use arbitrary::Arbitrary;
use common::time::Timestamp;
use common::usage::{Allocation, CustomerRef, Tag, UsageRecord};
use libfuzzer_sys::fuzz_target;
use meterline_fuzz::{book, now};
use rater::decision::{Decision, Rater};
use rust_decimal::Decimal;

const PRODUCTS: &[&str] = &["acme-analytics", "acme-vm", "globex-db"];
const CUSTOMERS: &[&str] = &["cust-a", "cust-b", "cust-c"];
const DIMENSIONS: &[&str] = &["users", "gb_ingest", "m5_large", "c5_xlarge", "requests"];

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Any(String),
}

#[derive(Arbitrary, Debug)]
struct Rec {
    product: Name,
    customer: Name,
    dimension: Name,
    hours_before_now: i16,
    millis_in_hour: u32,
    mantissa: i64,
    scale: u8,
    allocations: Vec<(Option<(String, String)>, u32)>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Decide(Rec),
    Resend,
    Commit,
    Rollback,
    Evict(u16),
}

fn pick(n: &Name, list: &[&str]) -> String {
    match n {
        Name::Known(i) => list[*i as usize % list.len()].to_owned(),
        Name::Any(s) => s.clone(),
    }
}

fn record(r: &Rec) -> UsageRecord {
    let hour_ms = 3_600_000i64;
    let t = now().millis() - i64::from(r.hours_before_now) * hour_ms;
    let t = t - t.rem_euclid(hour_ms) + i64::from(r.millis_in_hour % 3_600_000);
    let mut rec = UsageRecord {
        seller: String::new(),
        product: pick(&r.product, PRODUCTS),
        customer: pick(&r.customer, CUSTOMERS),
        customer_ref: CustomerRef::CustomerId,
        dimension: pick(&r.dimension, DIMENSIONS),
        timestamp: Timestamp(t),
        quantity: Decimal::new(r.mantissa, u32::from(r.scale % 29)),
        allocations: r
            .allocations
            .iter()
            .take(8)
            .map(|(tag, q)| Allocation {
                tags: tag.iter().map(|(k, v)| Tag { key: k.clone(), value: v.clone() }).collect(),
                quantity: Decimal::from(*q),
            })
            .collect(),
        received_at: now(),
    };
    rec.seller = book().product(&rec.product).map(|p| p.seller.clone()).unwrap_or_default();
    rec.canonicalise();
    rec
}

#[derive(Clone, Copy, PartialEq)]
enum Fate {
    Staged,
    Committed,
    Gone,
}

fuzz_target!(|ops: Vec<Op>| {
    let book = book();
    let mut rater = Rater::new();
    // Rated records and whether their claim is staged, durable, or forgotten.
    let mut rated: Vec<(UsageRecord, Fate)> = Vec::new();
    let mut last: Option<UsageRecord> = None;
    for op in ops.iter().take(64) {
        match op {
            Op::Decide(r) => {
                let rec = record(r);
                if let Decision::Rated(out) = rater.decide(&rec, book) {
                    assert_eq!(out.quantity, rec.quantity);
                    assert!(out.billable_quantity >= Decimal::ZERO && out.covered_quantity >= Decimal::ZERO);
                    assert_eq!(out.billable_quantity + out.covered_quantity, out.quantity);
                    assert_eq!(out.amount, out.billable_quantity * out.unit_rate);
                    rated.push((rec.clone(), Fate::Staged));
                }
                last = Some(rec);
            }
            Op::Resend => {
                let Some(rec) = &last else { continue };
                let live = rated.iter().any(|(r, f)| r == rec && *f != Fate::Gone);
                let d = rater.decide(rec, book);
                if live {
                    assert!(matches!(d, Decision::Identical { .. }), "an identical resend of a rated record: {d:?}");
                } else if matches!(d, Decision::Rated(_)) {
                    rated.push((rec.clone(), Fate::Staged));
                }
            }
            Op::Commit => {
                rater.commit();
                rated.iter_mut().filter(|(_, f)| *f == Fate::Staged).for_each(|(_, f)| *f = Fate::Committed);
            }
            Op::Rollback => {
                rater.rollback();
                rated.iter_mut().filter(|(_, f)| *f == Fate::Staged).for_each(|(_, f)| *f = Fate::Gone);
            }
            Op::Evict(h) => {
                rater.evict(now(), i64::from(*h) * 3_600_000);
                // Which slots survive depends on their hour; treat all as unknown from here on.
                rated.iter_mut().for_each(|(_, f)| *f = Fate::Gone);
            }
        }
    }
    rater.commit();
    for (rec, fate) in &rated {
        if *fate != Fate::Gone {
            assert!(matches!(rater.decide(rec, book), Decision::Identical { .. }), "a rated record is known after commit: {rec:?}");
        }
    }
});
