//! Throughput of each pure core, in records per second (criterion `Throughput::Elements`).
//!
//! `cargo bench -p meterline-benches` runs them; CI only builds them (`cargo bench --no-run`).

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ingest::validate::{validate, Caller, Context};
use ingest::wire::WireRecord;
use meterline_benches::{book, records, wire_line};
use rater::decision::Rater;
use std::time::Duration;

const N: usize = 10_000;

fn cores(c: &mut Criterion) {
    let book = book();
    let recs = records(N);
    let mut g = c.benchmark_group("cores");
    g.throughput(Throughput::Elements(N as u64)).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));

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
                for r in &recs {
                    black_box(rater.decide(r, &book));
                }
                rater.commit();
                rater
            },
            BatchSize::LargeInput,
        )
    });

    let rated: Vec<_> = {
        let mut rater = Rater::new();
        recs.iter()
            .filter_map(|r| match rater.decide(r, &book) {
                rater::decision::Decision::Rated(x) => Some(x),
                _ => None,
            })
            .collect()
    };
    g.bench_function("monthly_fold", |b| {
        b.iter(|| {
            let mut roll = aggregator::rollup::MonthlyRollup::new();
            for r in &rated {
                black_box(roll.fold(r).ok());
            }
            roll
        })
    });

    g.bench_function("codec_encode_decode_usage_record", |b| {
        b.iter(|| {
            for r in &recs {
                let bytes = common::codec::encode(r);
                black_box(common::codec::decode::<common::usage::UsageRecord>(&bytes).ok());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, cores);
criterion_main!(benches);
