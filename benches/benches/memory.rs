//! P5 and the scaling table: bytes per dedup key held in the acceptance window, and how memory
//! and time grow with customers × dimensions × hours.
//!
//! `cargo bench -p meterline-benches --bench memory` prints one JSON line per measurement. Each
//! measurement runs in a fresh child process (this binary re-executed with `--one …`) so the
//! resident-set delta belongs to that structure alone. Keys are real [`DedupKey`]s of
//! (product, customer, dimension, hour) slots; claims are committed in batches of 1 000 and hours
//! evicted past a 7-hour window (6 h acceptance + 1 h slack), as the rater does.
//!
//! Layouts measured side by side (`generate_only` is the cost of making the keys, in every row's
//! time): `deduper` (rater/src/dedup.rs), `hashmap_u128_pairs` (the
//! previous layout: per-hour `HashMap<u128, u128>`), `hashset_u128` (a bare 128-bit fingerprint
//! set: no record id, so it cannot tell a resend from a conflict), `hashset_string` (the
//! slot as a string key).

use common::id::{DedupKey, Fingerprinter, RecordId};
use common::time::Hour;
use rater::dedup::Deduper;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

const WINDOW_HOURS: i64 = 7;
const BATCH: usize = 1_000;

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: usize =
        statm.split_whitespace().nth(1).and_then(|x| x.parse().ok()).expect("statm has a resident field");
    pages * 4096
}

/// Every slot of `hours` hours: (key, hour, record id), generated lazily.
fn slots(customers: usize, dims: usize, hours: i64) -> impl Iterator<Item = Slot> {
    (0..hours).flat_map(move |h| {
        (0..customers).flat_map(move |c| {
            (0..dims).map(move |d| {
                let (product, customer, dimension) =
                    (format!("prod-{}", d % 3), format!("cust-{c:07}"), format!("dim_{d:02}"));
                let hour = Hour(493_000 + h);
                let key = DedupKey::of(&product, &customer, &dimension, hour);
                let id = RecordId(Fingerprinter::new(b'r').u128(key.0).str("42").finish());
                (key, hour, id, format!("{product}|{customer}|{dimension}|{}", hour.0))
            })
        })
    })
}

fn one(layout: &str, customers: usize, dims: usize, hours: i64) -> serde_json::Value {
    let before = rss_bytes();
    let started = Instant::now();
    let mut records = 0u64;
    let (held, accounted) = match layout {
        "deduper" => {
            let mut d = Deduper::new();
            let mut in_batch = 0;
            let mut last = i64::MIN;
            for (k, h, r, _) in slots(customers, dims, hours) {
                std::hint::black_box(d.check_and_stage(k, h, r));
                records += 1;
                in_batch += 1;
                if in_batch == BATCH || h.0 != last {
                    d.commit();
                    d.evict_before(Hour(h.0 - WINDOW_HOURS + 1));
                    in_batch = 0;
                    last = h.0;
                }
            }
            d.commit();
            let held = d.len();
            let acc = d.heap_bytes();
            let after = rss_bytes();
            std::hint::black_box(&d);
            return summary(
                layout,
                customers,
                dims,
                hours,
                records,
                held,
                Some(acc),
                after.saturating_sub(before),
                started,
            );
        }
        // Generating the keys alone (strings + two XXH3 hashes): subtract it to compare layouts' time.
        "generate_only" => {
            for slot in slots(customers, dims, hours) {
                records += 1;
                std::hint::black_box(slot);
            }
            (0, None)
        }
        "hashmap_u128_pairs" => {
            baseline::<HashMap<u128, u128>>(customers, dims, hours, &mut records, |m, (k, _, r, _)| {
                m.entry(k.0).or_insert(r.0);
            })
        }
        "hashset_u128" => baseline::<HashSet<u128>>(customers, dims, hours, &mut records, |m, (k, _, _, _)| {
            m.insert(k.0);
        }),
        "hashset_string" => baseline::<HashSet<String>>(customers, dims, hours, &mut records, |m, (_, _, _, s)| {
            m.insert(s);
        }),
        other => panic!("unknown layout {other}"),
    };
    let after = rss_bytes();
    summary(layout, customers, dims, hours, records, held, accounted, after.saturating_sub(before), started)
}

/// A hash-based layout: one `S` per hour, hours past the window dropped, as the rater would.
/// Returns the keys held; the structure is leaked on purpose (the process ends right after the
/// RSS is read; freeing would only blur the reading).
fn baseline<S: Default + Len>(
    customers: usize,
    dims: usize,
    hours: i64,
    records: &mut u64,
    mut insert: impl FnMut(&mut S, Slot),
) -> (usize, Option<usize>) {
    let mut m: BTreeMap<i64, S> = BTreeMap::new();
    for slot in slots(customers, dims, hours) {
        *records += 1;
        let h = slot.1 .0;
        insert(m.entry(h).or_default(), slot);
        m = m.split_off(&(h - WINDOW_HOURS + 1));
    }
    let held = m.values().map(Len::len).sum();
    std::mem::forget(m);
    (held, None)
}

type Slot = (DedupKey, Hour, RecordId, String);

trait Len {
    fn len(&self) -> usize;
}
impl<K, V> Len for HashMap<K, V> {
    fn len(&self) -> usize {
        HashMap::len(self)
    }
}
impl<K> Len for HashSet<K> {
    fn len(&self) -> usize {
        HashSet::len(self)
    }
}

#[allow(clippy::too_many_arguments)]
fn summary(
    layout: &str,
    customers: usize,
    dims: usize,
    hours: i64,
    records: u64,
    held: usize,
    accounted: Option<usize>,
    rss: usize,
    started: Instant,
) -> serde_json::Value {
    let secs = started.elapsed().as_secs_f64();
    serde_json::json!({
        "layout": layout,
        "customers": customers,
        "dimensions": dims,
        "hours": hours,
        "records": records,
        "keys_held": held,
        "rss_bytes_per_key": (held > 0).then(|| (rss as f64 / held as f64 * 10.0).round() / 10.0),
        "accounted_bytes_per_key": accounted.map(|a| (a as f64 / held.max(1) as f64 * 10.0).round() / 10.0),
        "seconds": (secs * 1000.0).round() / 1000.0,
        "records_per_sec": (records as f64 / secs).round(),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        let p = |j: usize| args[i + j].parse::<usize>().expect("numeric argument");
        println!("{}", one(&args[i + 1], p(2), p(3), p(4) as i64));
        return;
    }
    // Only `cargo bench` (which passes `--bench`) runs the measurements; `cargo test --benches`
    // and `--list` must not spend a minute here.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let me = std::env::current_exe().expect("own path");
    let run = |layout: &str, c: usize, d: usize, h: i64| {
        let out = std::process::Command::new(&me)
            .args(["--one", layout, &c.to_string(), &d.to_string(), &h.to_string()])
            .output()
            .expect("re-executing the bench");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        print!("{}", String::from_utf8_lossy(&out.stdout));
    };
    // P5: one million keys held (20 k customers × 10 dimensions × 5 hours of the window… plus
    // two more hours so the window is full), each layout.
    for layout in ["generate_only", "deduper", "hashmap_u128_pairs", "hashset_u128", "hashset_string"] {
        run(layout, 20_000, 10, 7);
    }
    // Scaling: 10× steps of customers, dimensions and hours (past 7 hours, older ones are evicted).
    for (c, d, h) in [
        (1_000, 10, 7),
        (10_000, 10, 7),
        (100_000, 10, 7),
        (10_000, 1, 7),
        (10_000, 24, 7),
        (10_000, 10, 1),
        (10_000, 10, 70),
    ] {
        run("deduper", c, d, h);
        run("hashmap_u128_pairs", c, d, h);
    }
}
