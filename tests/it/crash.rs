//! Crash safety of the embedded mode: SIGKILL the real `meterline serve` process mid-load,
//! restart it on the same data directory, resend what was not acknowledged (and some of what
//! was), and check that the monthly charges equal the ground truth exactly: nothing acknowledged
//! lost, nothing charged twice.
//!
//! The ground truth is computed here from the generated records with plain decimal arithmetic,
//! independently of the rating core.

use ::common::catalogue::PriceBook;
use ::common::money::round_to_minor;
use ::common::time::HOUR_MS;
use ingest::clock::Clock;
use meterline::store::Store;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::fixtures::{price_book, KEY, RATES};

const CUSTOMERS: usize = 1000;
const HOURS: i64 = 4;

struct Running {
    child: Child,
    url: String,
}

fn start(book: &std::path::Path, data: &std::path::Path) -> Running {
    let (child, url) = crate::fixtures::spawn_serve(book, data, &[]);
    Running { child, url }
}

/// One batch of 25 records and what it should produce.
#[derive(Clone)]
struct Batch {
    records: Vec<Value>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_then_resend_unacknowledged_gives_exact_totals() {
    let dir = tempfile::tempdir().unwrap();
    let book_path = dir.path().join("price-book.toml");
    let book = PriceBook::new(price_book(CUSTOMERS)).unwrap();
    std::fs::write(&book_path, book.to_toml().unwrap()).unwrap();
    let data = dir.path().join("data");

    // Records for the last HOURS hours (inside the 6-hour window for the whole test).
    let now_hour = ingest::clock::SystemClock.now_hour_start();
    let mut rng = SmallRng::seed_from_u64(2026);
    let mut truth: BTreeMap<(String, String), (Decimal, u64)> = BTreeMap::new();
    let mut records = Vec::new();
    for h in 1..=HOURS {
        let t = now_hour.plus_millis(-h * HOUR_MS + rng.gen_range(0..HOUR_MS));
        for c in 0..CUSTOMERS {
            for (dim, rate) in RATES {
                let q: i64 = rng.gen_range(0..5_000);
                let e = truth.entry((format!("c{c:04}"), dim.to_owned())).or_insert((Decimal::ZERO, 0));
                e.0 += Decimal::from(q) * rate.parse::<Decimal>().unwrap();
                e.1 += 1;
                records.push(json!({ "Timestamp": t.millis() / 1000, "CustomerAWSAccountId": format!("{:012}", 500_000 + c), "Dimension": dim, "Quantity": q }));
            }
        }
    }
    let batches: Vec<Batch> = records.chunks(25).map(|c| Batch { records: c.to_vec() }).collect();
    let mut pending: Vec<usize> = (0..batches.len()).collect();
    let mut first_ids: HashMap<usize, Vec<String>> = HashMap::new();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let mut kills = 0;
    let mut interrupted = 0;

    for round in 0..4 {
        let mut server = start(&book_path, &data);
        let acked = Arc::new(AtomicUsize::new(0));
        // Kill after 20–45 % of what is pending is acknowledged; the last round runs to the end.
        let kill_at = if round < 3 { pending.len() * rng.gen_range(20..45) / 100 } else { usize::MAX };
        let sem = Arc::new(tokio::sync::Semaphore::new(8));
        let mut tasks = Vec::new();
        for &b in &pending {
            let permit = Arc::clone(&sem).acquire_owned().await.unwrap();
            if acked.load(Ordering::SeqCst) >= kill_at {
                drop(permit);
                break;
            }
            let (http, url, recs, acked) =
                (http.clone(), server.url.clone(), batches[b].records.clone(), Arc::clone(&acked));
            tasks.push(tokio::spawn(async move {
                let body = json!({ "ProductCode": "p", "UsageRecords": recs }).to_string();
                let resp =
                    http.post(format!("{url}/v1/BatchMeterUsage")).header("X-Api-Key", KEY).body(body).send().await;
                drop(permit);
                let v: Value = match resp {
                    Ok(r) if r.status().is_success() => r.json().await.ok()?,
                    Ok(r) => {
                        eprintln!("answer {}: {}", r.status(), r.text().await.unwrap_or_default());
                        return None;
                    }
                    Err(_) => return None,
                };
                let results = v["Results"].as_array()?;
                assert!(
                    results.iter().all(|r| r["Status"] == "Success"),
                    "every record is new or an identical resend: {v}"
                );
                acked.fetch_add(1, Ordering::SeqCst);
                Some((
                    b,
                    results.iter().map(|r| r["MeteringRecordId"].as_str().unwrap().to_owned()).collect::<Vec<_>>(),
                ))
            }));
        }
        if round < 3 {
            // SIGKILL while calls are in flight.
            server.child.kill().unwrap();
            server.child.wait().unwrap();
            kills += 1;
        }
        let mut acked_now = Vec::new();
        for t in tasks {
            if let Some((b, ids)) = t.await.unwrap() {
                if let Some(prev) = first_ids.get(&b) {
                    assert_eq!(prev, &ids, "a resend returns the same MeteringRecordIds");
                }
                first_ids.entry(b).or_insert(ids);
                acked_now.push(b);
            }
        }
        // Resend everything not acknowledged, plus a tenth of what was (sellers retry blindly).
        let unacked: Vec<usize> = pending.iter().copied().filter(|b| !acked_now.contains(b)).collect();
        let sent = acked_now.len() + unacked.len().min(8);
        eprintln!(
            "round {round}: {} batches acknowledged, {} not (in flight or never sent) of {} pending; {} sent",
            acked_now.len(),
            unacked.len(),
            pending.len(),
            sent
        );
        if round < 3 {
            interrupted += unacked.len();
        }
        let mut again: Vec<usize> = acked_now.iter().copied().filter(|_| rng.gen_bool(0.1)).collect();
        again.extend(unacked);
        pending = again;
        if round == 3 {
            assert!(
                pending.iter().all(|b| first_ids.contains_key(b)),
                "the last round acknowledges everything it sends"
            );
            server.child.kill().unwrap();
            server.child.wait().unwrap();
            break;
        }
    }
    assert_eq!(kills, 3);
    assert!(interrupted > 0, "the kills interrupted the load");
    assert_eq!(first_ids.len(), batches.len(), "every batch was acknowledged once");

    let store = Store::open(&data.join("meterline.db")).unwrap();
    let lines = Store::charge_lines(store.conn(), None).unwrap();
    assert_eq!(lines.len(), truth.len());
    for l in &lines {
        let (amount, n) = truth[&(l.customer.clone(), l.dimension.clone())];
        assert_eq!(l.amount_unrounded, amount, "{} {}", l.customer, l.dimension);
        assert_eq!(l.amount, round_to_minor(amount, 2));
        assert_eq!(l.records, n);
    }
    let items: i64 = store.conn().query_row("SELECT count(*) FROM rated_usage", [], |r| r.get(0)).unwrap();
    assert_eq!(items as usize, records.len(), "one rated line item per record, none twice");
}
