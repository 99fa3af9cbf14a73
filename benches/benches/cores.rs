//! Throughput of each pure core, in records per second (criterion `Throughput::Elements`).
//!
//! `cargo bench -p meterline-benches --bench cores` runs them (filter with a group name, e.g.
//! `-- p1`); CI only builds them (`cargo bench --no-run`). Inputs are the load generator's
//! realistic world (many customers, up to 24 dimensions, annual coverage) unless named otherwise.
//!
//! Groups: `cores` (validate, dedup + rate, fold, codec: the historical numbers), `dedup`,
//! `rating` (one entry per pricing model of the price-models example book), `codec`, `fold`, and `p1`: the rater core side by side
//! with a bare hash-map insert of the same keys (BENCHMARKS.md row P1).

use common::catalogue::PriceBook;
use common::rated::RatedRecord;
use common::usage::UsageRecord;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput};
use ingest::validate::{validate, Caller, Context};
use ingest::wire::WireRecord;
use meterline_benches::{book, model_records, records, scenario, wire_line};
use rater::decision::{Decision, Rater};
use rater::dedup::Deduper;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const N: usize = 10_000;
/// Customers of the realistic world (≈ 100 k records over `HOURS`).
const CUSTOMERS: usize = 1_000;
const HOURS: i64 = 12;
/// Records per commit, as the embedded writer and the Kafka rater batch them.
const BATCH: usize = 1_000;

fn group<'a>(c: &'a mut Criterion, name: &str, n: usize) -> BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(n as u64))
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    g
}

/// Decides every record, committing every `BATCH`, as the shells do.
fn decide_all(rater: &mut Rater, recs: &[UsageRecord], book: &PriceBook) {
    for chunk in recs.chunks(BATCH) {
        for r in chunk {
            black_box(rater.decide(r, book));
        }
        rater.commit();
    }
}

fn rated_of(recs: &[UsageRecord], book: &PriceBook) -> Vec<RatedRecord> {
    let mut rater = Rater::new();
    recs.iter()
        .filter_map(|r| match rater.decide(r, book) {
            Decision::Rated(x) => Some(x),
            _ => None,
        })
        .collect()
}

fn cores(c: &mut Criterion) {
    let book = book();
    let recs = records(N);
    let mut g = group(c, "cores", N);

    g.bench_function("validate_wire_json", |b| {
        let lines: Vec<String> = (0..N).map(wire_line).collect();
        let now = common::time::Timestamp::parse_rfc3339("2026-11-30T00:00:00Z").expect("constant parses");
        let cx = Context { book: &book, caller: Caller::Trusted, now: None, received_at: now };
        b.iter(|| {
            for l in &lines {
                let w: WireRecord<'_> = serde_json::from_str(l).expect("bench lines parse");
                black_box(validate(&w, None, &cx).ok());
            }
        })
    });
    g.bench_function("dedup_and_rate", |b| {
        b.iter_batched(
            Rater::new,
            |mut rater| {
                decide_all(&mut rater, &recs, &book);
                rater
            },
            BatchSize::LargeInput,
        )
    });
    let rated = rated_of(&recs, &book);
    g.bench_function("monthly_fold", |b| b.iter(|| fold_all(&rated)));
    g.bench_function("codec_encode_decode_usage_record", |b| {
        b.iter(|| {
            for r in &recs {
                let bytes = common::codec::encode(r);
                black_box(common::codec::decode::<UsageRecord>(&bytes).ok());
            }
        })
    });
    g.finish();
}

/// The realistic world's records with their precomputed ids.
struct World {
    book: PriceBook,
    recs: Vec<UsageRecord>,
    ids: Vec<(common::id::DedupKey, common::time::Hour, common::id::RecordId)>,
}

fn world() -> World {
    let (book, recs) = scenario(CUSTOMERS, HOURS);
    let ids = recs.iter().map(|r| (r.dedup_key(), r.hour(), r.record_id())).collect();
    World { book, recs, ids }
}

/// Stages every key of the world and commits every `BATCH`, as a rater does.
fn stage_all(mut d: Deduper, w: &World) -> Deduper {
    for chunk in w.ids.chunks(BATCH) {
        for &(k, h, r) in chunk {
            black_box(d.check_and_stage(k, h, r));
        }
        d.commit();
    }
    d
}

fn dedup(c: &mut Criterion, w: &World) {
    let mut g = group(c, "dedup", w.ids.len());
    // Every key new, committed in batches: the steady state of a rater.
    g.bench_function("check_and_stage_commit_new", |b| {
        b.iter_batched(Deduper::new, |d| stage_all(d, w), BatchSize::LargeInput)
    });
    // Every key already held: identical resends.
    let mut full = Deduper::new();
    for &(k, h, r) in &w.ids {
        full.restore(k, h, r);
    }
    g.bench_function("check_resend", |b| {
        b.iter(|| {
            for &(k, h, r) in &w.ids {
                black_box(full.check_and_stage(k, h, r));
            }
        })
    });
    g.finish();
}

/// One entry per pricing model the price-models example book uses (`model_records` labels each
/// record with the model that prices it), so a new model needs no new line here; the realistic
/// world's per-unit records are benched too.
fn rating(c: &mut Criterion, w: &World) {
    let (book, labelled) = model_records();
    let mut by_model: std::collections::BTreeMap<String, Vec<&UsageRecord>> = std::collections::BTreeMap::new();
    for (label, r) in &labelled {
        by_model.entry(label.clone()).or_default().push(r);
    }
    let mut entries: Vec<(String, &PriceBook, Vec<&UsageRecord>)> =
        vec![("realistic_world_per_unit".into(), &w.book, w.recs.iter().collect())];
    entries.extend(by_model.into_iter().map(|(m, rs)| (m, &book, rs)));
    for (model, book, recs) in entries {
        let ids: Vec<_> = recs.iter().map(|r| (r.dedup_key(), r.record_id())).collect();
        let mut g = group(c, "rating", recs.len());
        g.bench_function(model.as_str(), |b| {
            b.iter(|| {
                for (r, (k, id)) in recs.iter().zip(&ids) {
                    black_box(rater::rating::rate(r, *k, *id, book).ok());
                }
            })
        });
        g.finish();
    }
}

fn codec(c: &mut Criterion, w: &World) {
    let rated = rated_of(&w.recs, &w.book);
    let mut g = group(c, "codec", w.recs.len());
    g.bench_function("encode_usage_record", |b| {
        b.iter(|| w.recs.iter().map(|r| common::codec::encode(r).len()).sum::<usize>())
    });
    let bytes: Vec<Vec<u8>> = w.recs.iter().map(common::codec::encode).collect();
    g.bench_function("decode_usage_record", |b| {
        b.iter(|| {
            for x in &bytes {
                black_box(common::codec::decode::<UsageRecord>(x).ok());
            }
        })
    });
    g.finish();
    let mut g = group(c, "codec", rated.len());
    g.bench_function("encode_rated_record", |b| {
        b.iter(|| rated.iter().map(|r| common::codec::encode(r).len()).sum::<usize>())
    });
    let bytes: Vec<Vec<u8>> = rated.iter().map(common::codec::encode).collect();
    g.bench_function("decode_rated_record", |b| {
        b.iter(|| {
            for x in &bytes {
                black_box(common::codec::decode::<RatedRecord>(x).ok());
            }
        })
    });
    g.finish();
}

/// Folds every rated record into a fresh month.
fn fold_all(rated: &[RatedRecord]) -> aggregator::rollup::MonthlyRollup {
    let mut roll = aggregator::rollup::MonthlyRollup::new();
    for r in rated {
        black_box(roll.fold(r).ok());
    }
    roll
}

fn fold(c: &mut Criterion, w: &World) {
    let rated = rated_of(&w.recs, &w.book);
    let mut g = group(c, "fold", rated.len());
    g.bench_function("monthly_fold", |b| b.iter(|| fold_all(&rated)));
    g.finish();
}

/// P1: the rater core (dedup + rate, from the record's strings) against a bare std `HashMap`
/// insert of the same slot keys (product, customer, dimension, hour — borrowed, SipHash), and the
/// dedup state alone against a bare `HashSet<u128>` of the same fingerprints. Same records, same
/// run, fresh state per iteration for all four.
fn p1(c: &mut Criterion, w: &World) {
    let mut g = group(c, "p1", w.recs.len());
    g.bench_function("rater_core_dedup_and_rate", |b| {
        b.iter_batched(
            Rater::new,
            |mut rater| {
                decide_all(&mut rater, &w.recs, &w.book);
                rater
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("bare_hashmap_insert_slot_keys", |b| {
        b.iter(|| {
            let mut m: HashMap<(&str, &str, &str, i64), u64> = HashMap::new();
            for (i, r) in w.recs.iter().enumerate() {
                black_box(
                    m.insert((r.product.as_str(), r.customer.as_str(), r.dimension.as_str(), r.hour().0), i as u64),
                );
            }
            m
        })
    });
    g.bench_function("dedup_state_only", |b| b.iter_batched(Deduper::new, |d| stage_all(d, w), BatchSize::LargeInput));
    g.bench_function("bare_hashset_insert_u128", |b| {
        b.iter(|| {
            let mut s: HashSet<u128> = HashSet::new();
            for &(k, _, _) in &w.ids {
                black_box(s.insert(k.0));
            }
            s
        })
    });
    g.finish();
}

fn realistic(c: &mut Criterion) {
    let w = world();
    p1(c, &w);
    dedup(c, &w);
    rating(c, &w);
    codec(c, &w);
    fold(c, &w);
}

criterion_group!(benches, cores, realistic);
criterion_main!(benches);
