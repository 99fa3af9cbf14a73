//! Smoke run of the `loadtest` binary against `meterline serve` on loopback (issue 6): a few
//! seconds of the scenario's traffic through both API shapes, bounded in records and seconds.
//! It checks that the load generator still works end to end and that its tally agrees with the
//! store; it asserts nothing about speed (performance lives in BENCHMARKS.md).
//!
//! The `loadtest` binary must be built first (`scripts/test.sh` builds the whole workspace).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn loadtest_bin() -> PathBuf {
    // target/<profile>/deps/<this test> → target/<profile>/loadtest
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(Path::parent).unwrap().join("loadtest");
    assert!(p.exists(), "{} is missing: build it first (cargo build --workspace --all-features)", p.display());
    p
}

struct Serve(Child);
impl Drop for Serve {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The number on the `meterline stats` line that starts with `label`.
fn stat(stats: &str, label: &str) -> u64 {
    let line = stats
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` in:\n{stats}"));
    line.split_whitespace().last().unwrap().replace(',', "").parse().unwrap()
}

#[test]
fn loadtest_drives_meterline_serve_through_both_api_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("price-book.toml");
    let data = dir.path().join("data");
    let keys = run(Command::new(loadtest_bin()).args(["price-book", "--customers", "40", "--out"]).arg(&book));
    assert!(keys.contains("acme demo-key-acme"), "{keys}");

    let port = testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_meterline"))
            .args(["serve", "--price-book"])
            .arg(&book)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "meterline serve did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut success = 0;
    for (endpoint, extra) in [("bulk", ["--bulk-size", "200"]), ("aws", ["--rate", "3000"])] {
        let summary = dir.path().join(format!("{endpoint}.json"));
        run(Command::new(loadtest_bin())
            .args([
                "http",
                "--url",
                &url,
                "--customers",
                "40",
                "--endpoint",
                endpoint,
                "--records",
                "600",
                "--max-seconds",
                "20",
                "--concurrency",
                "4",
            ])
            .args(extra)
            // Every share of misbehaviour high enough to show up in a few hundred records.
            .args(["--duplicate-share", "0.1", "--conflict-share", "0.05", "--invalid-share", "0.05", "--out"])
            .arg(&summary));
        let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
        assert_eq!(s["records"], 600, "{s}");
        assert!(s["calls"].as_u64().unwrap() > 0, "{s}");
        for p in ["p50", "p90", "p99", "p999"] {
            assert!(s["ack_ms_per_call"][p].as_f64().is_some(), "{p} missing: {s}");
        }
        let by: &serde_json::Map<String, Value> = s["by_status"].as_object().unwrap();
        assert_eq!(by.values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 600, "every record answered: {s}");
        assert!(by.keys().any(|k| k != "Success"), "the invalid and conflicting shares show up: {s}");
        success += by["Success"].as_u64().unwrap();
    }

    // The second run repeats the first one's slots (same seed, same hours): identical resends.
    let stats = run(Command::new(env!("CARGO_BIN_EXE_meterline")).args(["stats", "--data-dir"]).arg(&data));
    assert_eq!(stat(&stats, "records answered"), 1200, "{stats}");
    assert_eq!(stat(&stats, "accepted and charged") + stat(&stats, "identical resends"), success, "{stats}");
}
