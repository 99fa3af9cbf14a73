//! Overload and soak against the real `meterline serve` process (issue 7), loopback only, bounded.
//!
//! - `twice_the_sustainable_load_is_shed_with_retry_after_and_nothing_acknowledged_is_lost`:
//!   measures the sustainable rate T (closed loop), offers 2·T open-loop for
//!   `METERLINE_OVERLOAD_SECS` (default 12; the issue's 60 s run is `METERLINE_OVERLOAD_SECS=60`),
//!   then 0.5·T, at the server's DEFAULT settings (issue 12). Checks: excess calls are answered
//!   429/503 with `Retry-After` (no other status), the first within seconds of the overload, with
//!   accepted calls' p99 bounded,
//!   the server's peak RSS (VmHWM) stays under a bound, every acknowledged record is in the store
//!   and the charges equal an offline rating of exactly the acknowledged records, and the server
//!   accepts everything again once the pressure ends.
//! - `soak_of_mixed_good_and_bad_traffic_bills_exactly_the_good_records`: the demo scenario's
//!   traffic (resends, conflicts, invalid records) plus hostile bodies, for `METERLINE_SOAK_SECS`
//!   (default 40), retrying 429s after `Retry-After`; the monthly totals equal an offline rating
//!   of the records the server acknowledged, and every hostile body got its 4xx.
//!
//! Numbers (rates, RSS, recovery time) are printed for the report. `METERLINE_BIN=target/release/meterline`
//! runs the same tests against a release build (the figures in SECURITY.md).

use ::common::catalogue::PriceBook;
use ::common::id::RecordId;
use ::common::time::HOUR_MS;
use ingest::clock::Clock;
use meterline::store::Store;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fixtures::{price_book, KEY, RATES};

struct Served {
    child: Child,
    url: String,
}

fn serve(book: &std::path::Path, data: &std::path::Path, extra: &[&str]) -> Served {
    let (child, url) = crate::fixtures::spawn_serve(book, data, extra);
    Served { child, url }
}

impl Served {
    /// A field of /proc/<pid>/status in kB (VmRSS, VmHWM).
    fn vm_kb(&self, field: &str) -> u64 {
        crate::fixtures::vm_kb(self.child.id(), field)
    }

    /// SIGINT (graceful: in-flight calls finish, the writer commits), then wait.
    fn stop(mut self) {
        Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().expect("running kill -INT");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child.kill().ok();
        panic!("meterline serve did not stop within 60 s of SIGINT");
    }
}

/// What the server answered, accumulated across calls.
#[derive(Default)]
struct Tally {
    /// Acknowledged records by id: the record as sent, with its ProductCode (first answer kept).
    acked: HashMap<String, Value>,
    calls_ok: u64,
    throttled: u64,
    unavailable: u64,
    records_refused: u64,
    /// Anything else: a failure of the test.
    unexpected: Vec<String>,
}

/// Outcome of one call.
enum Answer {
    Ok,
    Shed { retry_after: u64 },
    Other,
}

async fn call(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    product: &str,
    records: &[Value],
    tally: &Mutex<Tally>,
) -> Answer {
    let body = json!({ "ProductCode": product, "UsageRecords": records }).to_string();
    // Per-record answers (the documented opt-in): the traffic mixes invalid records in.
    let req = http
        .post(format!("{url}/v1/BatchMeterUsage"))
        .header("X-Api-Key", key)
        .header("X-Meterline-Per-Record", "true");
    let resp = match req.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            tally.lock().unwrap().unexpected.push(format!("transport error: {e}"));
            return Answer::Other;
        }
    };
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let text = resp.text().await.unwrap_or_default();
    let mut t = tally.lock().unwrap();
    match (status, retry) {
        (200, _) => {
            t.calls_ok += 1;
            let v: Value = serde_json::from_str(&text).expect("200 answers are JSON");
            for (r, sent) in v["Results"].as_array().expect("Results").iter().zip(records) {
                if r["Status"] == "Success" {
                    let mut line = sent.clone();
                    line["ProductCode"] = json!(product);
                    t.acked.entry(r["MeteringRecordId"].as_str().unwrap().to_owned()).or_insert(line);
                } else {
                    t.records_refused += 1;
                }
            }
            Answer::Ok
        }
        (429, Some(s)) | (503, Some(s)) => {
            if status == 429 {
                t.throttled += 1;
            } else {
                t.unavailable += 1;
            }
            Answer::Shed { retry_after: s }
        }
        _ => {
            t.unexpected
                .push(format!("{status} (Retry-After {retry:?}): {}", text.chars().take(200).collect::<String>()));
            Answer::Other
        }
    }
}

/// The store holds every acknowledged record, nothing else was accepted, and its charge lines
/// equal an offline rating (same cores, no HTTP, no store) of exactly the acknowledged records.
fn check_against_ground_truth(book: &PriceBook, data: &std::path::Path, tally: &Tally) {
    let conn = Store::open_read_only(&data.join("meterline.db")).unwrap();
    // One scan (rated_usage has no index on record_id; a lookup per id would scan per id).
    let mut st = conn.prepare("SELECT record_id FROM rated_usage").unwrap();
    let stored_ids: std::collections::HashSet<String> =
        st.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect();
    for id in tally.acked.keys() {
        let rid: RecordId = id.parse().unwrap();
        assert!(stored_ids.contains(&rid.to_string()), "acknowledged record {id} is not in the store");
    }
    let counts: HashMap<String, u64> = Store::status_counts(&conn).unwrap().into_iter().collect();
    assert_eq!(
        counts.get("Success").copied().unwrap_or(0),
        tally.acked.len() as u64,
        "accepted in the store = acknowledged"
    );
    let usage: String = tally.acked.values().map(|v| format!("{v}\n")).collect();
    let truth = meterline::rate::rate_lines(book, &usage, &meterline::rate::RateOptions::default()).unwrap();
    assert!(
        truth.refused.is_empty(),
        "acknowledged records rate offline: {:?}",
        &truth.refused[..truth.refused.len().min(3)]
    );
    let key = |l: &::common::rated::ChargeLine| {
        format!("{}|{}|{}|{}|{:?}|{}", l.month, l.customer, l.product, l.dimension, l.charge_type, l.currency)
    };
    let stored: HashMap<String, (rust_decimal::Decimal, rust_decimal::Decimal)> =
        Store::charge_lines(&conn, None).unwrap().iter().map(|l| (key(l), (l.quantity, l.amount_unrounded))).collect();
    let expected: HashMap<String, (rust_decimal::Decimal, rust_decimal::Decimal)> =
        truth.charge_lines.iter().map(|l| (key(l), (l.quantity, l.amount_unrounded))).collect();
    assert_eq!(stored.len(), expected.len(), "charge lines");
    for (k, v) in &expected {
        assert_eq!(stored.get(k), Some(v), "line {k}");
    }
    let total: rust_decimal::Decimal = truth.invoice_totals.iter().map(|t| t.amount).sum();
    println!(
        "ground truth: {} acknowledged records, {} charge lines, invoices total {total}: store matches",
        tally.acked.len(),
        expected.len()
    );
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twice_the_sustainable_load_is_shed_with_retry_after_and_nothing_acknowledged_is_lost() {
    const CUSTOMERS: usize = 4000;
    const HOURS: i64 = 5;
    // Below the default 1024 open files of both processes.
    const OUTSTANDING: usize = 256;
    let overload_secs = env_secs("METERLINE_OVERLOAD_SECS", 12);
    let dir = tempfile::tempdir().unwrap();
    let book_path = dir.path().join("price-book.toml");
    let book = PriceBook::new(price_book(CUSTOMERS)).unwrap();
    std::fs::write(&book_path, book.to_toml().unwrap()).unwrap();
    let data = dir.path().join("data");
    // The DEFAULT settings (issue 12): the in-flight bound follows the writer's measured rate.
    let server = serve(&book_path, &data, &[]);
    let url = server.url.clone();

    // Unique slots: customer × dimension × hour, in batches of 25; replayed (identical resends)
    // when exhausted.
    let now_hour = ingest::clock::SystemClock.now_hour_start();
    let mut batches: Vec<Vec<Value>> = Vec::new();
    let mut cur = Vec::new();
    for h in 0..HOURS {
        let ts = now_hour.plus_millis(-h * HOUR_MS).millis() / 1000 + 60;
        for c in 0..CUSTOMERS {
            for (i, (dim, _)) in RATES.iter().enumerate() {
                cur.push(json!({ "Timestamp": ts, "CustomerAWSAccountId": crate::fixtures::account(c), "Dimension": dim, "Quantity": (c * 7 + i * 13) % 1000 + 1 }));
                if cur.len() == 25 {
                    batches.push(std::mem::take(&mut cur));
                }
            }
        }
    }
    let batches = Arc::new(batches);
    let next = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(OUTSTANDING)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let take = {
        let (batches, next) = (Arc::clone(&batches), Arc::clone(&next));
        move || batches[next.fetch_add(1, Ordering::Relaxed) % batches.len()].clone()
    };

    // Phase 1: the sustainable rate, closed loop (8 callers, 3 s).
    let t0 = Instant::now();
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (http, url, tally, take) = (http.clone(), url.clone(), Arc::clone(&tally), take.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while t0.elapsed() < Duration::from_secs(3) {
                    if let Answer::Ok = call(&http, &url, KEY, "p", &take(), &tally).await {
                        n += 25;
                    }
                }
                n
            })
        })
        .collect();
    let mut sustained = 0u64;
    for c in callers {
        sustained += c.await.unwrap();
    }
    let t_rate = sustained as f64 / t0.elapsed().as_secs_f64();
    println!("sustainable (closed loop, 8 callers): {t_rate:.0} records/s");

    // RSS sampler.
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let pid_status = format!("/proc/{}/status", server.child.id());
    let sampler = {
        let (peak, on) = (Arc::clone(&peak_rss), Arc::clone(&sampling));
        std::thread::spawn(move || {
            while on.load(Ordering::Relaxed) {
                let s = std::fs::read_to_string(&pid_status).unwrap_or_default();
                if let Some(kb) = s
                    .lines()
                    .find(|l| l.starts_with("VmRSS"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
                {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Phase 2 (2·T open loop) and phase 3 (0.5·T): a call is started on schedule whatever the
    // answers; at most OUTSTANDING calls wait (the client's own bound), the rest count as not sent.
    let outstanding = Arc::new(AtomicUsize::new(0));
    let not_sent = Arc::new(AtomicU64::new(0));
    let last_shed_ms = Arc::new(AtomicU64::new(0));
    let first_shed_ms = Arc::new(AtomicU64::new(u64::MAX));
    // Latency of calls answered 200, per phase (ms).
    let ok_latency: Arc<Mutex<Vec<Vec<f64>>>> = Arc::new(Mutex::new(vec![Vec::new(), Vec::new()]));
    let phase = |secs: u64, records_per_sec: f64, which: usize| {
        let (http, url, tally, take) = (http.clone(), url.clone(), Arc::clone(&tally), take.clone());
        let (outstanding, not_sent, last_shed_ms) =
            (Arc::clone(&outstanding), Arc::clone(&not_sent), Arc::clone(&last_shed_ms));
        let (first_shed_ms, ok_latency) = (Arc::clone(&first_shed_ms), Arc::clone(&ok_latency));
        async move {
            let start = Instant::now();
            let mut started = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            while start.elapsed() < Duration::from_secs(secs) {
                tick.tick().await;
                let due = (start.elapsed().as_secs_f64() * records_per_sec / 25.0) as u64;
                while started < due {
                    started += 1;
                    if outstanding.load(Ordering::Relaxed) >= OUTSTANDING {
                        not_sent.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    outstanding.fetch_add(1, Ordering::Relaxed);
                    let (http, url, tally, outstanding, last_shed_ms) = (
                        http.clone(),
                        url.clone(),
                        Arc::clone(&tally),
                        Arc::clone(&outstanding),
                        Arc::clone(&last_shed_ms),
                    );
                    let (first_shed_ms, ok_latency) = (Arc::clone(&first_shed_ms), Arc::clone(&ok_latency));
                    let batch = take();
                    tokio::spawn(async move {
                        let sent = Instant::now();
                        match call(&http, &url, KEY, "p", &batch, &tally).await {
                            Answer::Shed { .. } => {
                                let at = t0.elapsed().as_millis() as u64;
                                last_shed_ms.fetch_max(at, Ordering::Relaxed);
                                first_shed_ms.fetch_min(at, Ordering::Relaxed);
                            }
                            Answer::Ok => ok_latency.lock().unwrap()[which].push(sent.elapsed().as_secs_f64() * 1000.0),
                            Answer::Other => {}
                        }
                        outstanding.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
        }
    };
    let before = {
        let t = tally.lock().unwrap();
        (t.calls_ok, t.throttled + t.unavailable)
    };
    let overload_start_ms = t0.elapsed().as_millis() as u64;
    phase(overload_secs, 2.0 * t_rate, 0).await;
    let overload_end_ms = t0.elapsed().as_millis() as u64;
    let (ok_over, shed_over) = {
        let t = tally.lock().unwrap();
        (t.calls_ok - before.0, t.throttled + t.unavailable - before.1)
    };
    let recovery_secs = 10;
    phase(recovery_secs, 0.5 * t_rate, 1).await;
    while outstanding.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let end_ms = t0.elapsed().as_millis() as u64;
    let last_shed = last_shed_ms.load(Ordering::Relaxed);
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let hwm_kb = server.vm_kb("VmHWM");
    // Memory after the burst: the queue is bounded, so what it held is freed (glibc may keep
    // some of it mapped; RSS is what the machine sees).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_kb = server.vm_kb("VmRSS");
    let recovered_after = last_shed.saturating_sub(overload_end_ms);
    {
        let t = tally.lock().unwrap();
        println!(
            "overload {overload_secs} s at {:.0} records/s offered: {ok_over} calls answered 200, {shed_over} shed (429 {} / 503 {} in total), {} not sent (client bound {OUTSTANDING})",
            2.0 * t_rate,
            t.throttled,
            t.unavailable,
            not_sent.load(Ordering::Relaxed)
        );
        println!(
            "server RSS: peak sampled {} MiB, VmHWM {} MiB, {} MiB 1 s after the load; last shed call {} ms after the overload ended (recovery), then none for {} ms",
            peak_rss.load(Ordering::Relaxed) / 1024,
            hwm_kb / 1024,
            after_kb / 1024,
            recovered_after,
            end_ms.saturating_sub(last_shed.max(overload_end_ms))
        );
        let first_shed_after = first_shed_ms.load(Ordering::Relaxed).saturating_sub(overload_start_ms);
        let pct = |v: &[f64], q: f64| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or(0.0)
        };
        let lat = ok_latency.lock().unwrap();
        println!(
            "first 429/503 {first_shed_after} ms after the overload began; accepted calls under overload p50 {:.0} ms p99 {:.0} ms, after it p99 {:.0} ms",
            pct(&lat[0], 0.5),
            pct(&lat[0], 0.99),
            pct(&lat[1], 0.99)
        );
        assert!(
            t.unexpected.is_empty(),
            "only 200, or 429/503 with Retry-After: {:?}",
            &t.unexpected[..t.unexpected.len().min(5)]
        );
        // Shedding starts early and keeps the queue short (issue 12); generous for a debug build
        // on a shared machine: the release figures are in SECURITY.md.
        assert!(first_shed_after < 3_000, "first shed {first_shed_after} ms into the overload");
        assert!(pct(&lat[0], 0.99) < 3_000.0, "accepted calls' p99 under overload {:.0} ms", pct(&lat[0], 0.99));
        assert!(shed_over > 0, "2× the sustainable load sheds calls");
        // A bound on memory, far above the ~100–300 MiB seen here: what it rules out is growth
        // with the offered load (an unbounded queue would take gigabytes within seconds).
        assert!(hwm_kb < 1024 * 1024, "peak RSS {} MiB", hwm_kb / 1024);
        // Recovered: the last 3 s of the 0.5·T phase saw no shedding at all.
        assert!(
            end_ms.saturating_sub(last_shed.max(overload_end_ms)) >= 3000,
            "throughput did not recover: last shed at {last_shed} ms, end {end_ms} ms"
        );
    }
    server.stop();
    check_against_ground_truth(&book, &data, &tally.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_of_mixed_good_and_bad_traffic_bills_exactly_the_good_records() {
    let soak_secs = env_secs("METERLINE_SOAK_SECS", 40);
    let now = ingest::clock::SystemClock.now();
    let scenario = loadtest::scenario::Scenario::generate(loadtest::scenario::ScenarioConfig {
        customers: 300,
        month: now.hour().month(),
        seed: 77,
        identical_resend_share: 0.05,
        conflict_share: 0.01,
        invalid_share: 0.05,
    });
    let dir = tempfile::tempdir().unwrap();
    let book_path = dir.path().join("price-book.toml");
    let book = PriceBook::new(scenario.doc.clone()).unwrap();
    std::fs::write(&book_path, book.to_toml().unwrap()).unwrap();
    let data = dir.path().join("data");
    let server = serve(&book_path, &data, &["--body-timeout-secs", "2"]);
    let url = server.url.clone();

    // The last six hours' traffic (the acceptance window), in send order.
    let mut rng = SmallRng::seed_from_u64(7);
    let now_hour = now.hour();
    let mut calls: Vec<loadtest::scenario::Batch> = Vec::new();
    for h in (0..6).rev() {
        let hour = ::common::time::Hour(now_hour.0 - h);
        if hour.start().millis() >= now.millis() - 6 * HOUR_MS {
            calls.extend(scenario.hour_traffic(hour, &mut rng));
        }
    }
    let some_key = scenario.keys[0].key.clone();
    let foreign = scenario.doc.products.iter().find(|p| p.seller != scenario.keys[0].seller).unwrap().code.clone();
    // Hostile bodies mixed in: each must get its 4xx, and none may disturb the good traffic.
    let hostile: Vec<(String, &str, String, u16)> = vec![
        ("truncated".into(), "application/json", r#"{"ProductCode":"x","UsageRecords":[{"Timest"#.into(), 400),
        (
            "deep".into(),
            "application/json",
            format!(r#"{{"ProductCode":"x","UsageRecords":[{}]}}"#, "[".repeat(5000)),
            400,
        ),
        ("wrong key".into(), "application/json", r#"{"ProductCode":"x","UsageRecords":[]}"#.into(), 401),
        // AWS's answer for another seller's product: 400 InvalidProductCodeException.
        (
            "foreign product".into(),
            "application/json",
            json!({ "ProductCode": foreign, "UsageRecords": [] }).to_string(),
            400,
        ),
        ("content type".into(), "text/csv", "a,b".into(), 415),
        (
            "oversized".into(),
            "application/json",
            format!(r#"{{"ProductCode":"{}","X":"{}"}}"#, foreign, "y".repeat(1_100_000)),
            413,
        ),
    ];
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let hostile_answered = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(calls);
    let hostile = Arc::new(hostile);
    let start = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (http, url, tally, next, calls, hostile, answered, key) = (
                http.clone(),
                url.clone(),
                Arc::clone(&tally),
                Arc::clone(&next),
                Arc::clone(&calls),
                Arc::clone(&hostile),
                Arc::clone(&hostile_answered),
                some_key.clone(),
            );
            let keys = scenario.keys.clone();
            tokio::spawn(async move {
                while start.elapsed() < Duration::from_secs(soak_secs) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i % 20 == 19 {
                        let (what, ct, body, want) = &hostile[(i / 20) % hostile.len()];
                        let k = if what == "wrong key" { "not-a-key" } else { key.as_str() };
                        let r = http
                            .post(format!("{url}/v1/BatchMeterUsage"))
                            .header("X-Api-Key", k)
                            .header("Content-Type", *ct)
                            .body(body.clone())
                            .send()
                            .await
                            .unwrap();
                        // Repeated wrong keys from one address are throttled (issue 12): 429 with
                        // Retry-After instead of 401 once the address's budget is spent.
                        let got = r.status().as_u16();
                        let throttled = what == "wrong key" && got == 429 && r.headers().contains_key("retry-after");
                        assert!(got == *want || throttled, "hostile body `{what}`: {got}, expected {want}");
                        answered.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // Once through the traffic, everything is an identical resend: still billed once.
                    let b = &calls[i % calls.len()];
                    let key = keys.iter().find(|k| k.seller == b.seller).unwrap().key.clone();
                    while let Answer::Shed { retry_after } =
                        call(&http, &url, &key, &b.product, &b.records, &tally).await
                    {
                        tokio::time::sleep(Duration::from_secs(retry_after.min(5))).await
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let hwm_kb = server.vm_kb("VmHWM");
    {
        let t = tally.lock().unwrap();
        println!(
            "soak {soak_secs} s: {} calls answered 200 ({} records acknowledged, {} refused by name), {} hostile bodies answered 4xx, {} traffic calls in the scenario, server VmHWM {} MiB",
            t.calls_ok,
            t.acked.len(),
            t.records_refused,
            hostile_answered.load(Ordering::Relaxed),
            calls.len(),
            hwm_kb / 1024
        );
        assert!(t.unexpected.is_empty(), "{:?}", &t.unexpected[..t.unexpected.len().min(5)]);
        assert!(t.records_refused > 0 && hostile_answered.load(Ordering::Relaxed) > 0, "the traffic was mixed");
    }
    server.stop();
    check_against_ground_truth(&book, &data, &tally.lock().unwrap());
}
