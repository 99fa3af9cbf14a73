//! boto3 (the official AWS SDK for Python, `meteringmarketplace` 2016-01-14) against
//! `meterline serve`: runs `tests/boto3/metering_calls.py` in the virtualenv that
//! `scripts/install-test-deps.sh` creates under `${METERLINE_CACHE:-$HOME/.cache/meterline}`,
//! then checks the store bills exactly what the script's successful calls sent.
//!
//! Without the virtualenv the test says so and passes, except under `CI=true`, where a missing
//! client is a failure (CI must have run the install script).

use crate::aws_fixtures::{issue_token, Served, LICENSE};
use rust_decimal::Decimal;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn venv_python() -> Option<PathBuf> {
    let cache = std::env::var_os("METERLINE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/meterline")))?;
    let python = cache.join("boto3-venv/bin/python");
    python.exists().then_some(python)
}

#[test]
fn boto3_calls_every_operation_against_meterline_serve() {
    let Some(python) = venv_python() else {
        let msg =
            "boto3 virtualenv missing: run scripts/install-test-deps.sh (it creates ${METERLINE_CACHE:-$HOME/.cache/meterline}/boto3-venv)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    };
    let s = Served::start(&[]);
    let throttled = Served::start(&["--seller-records-per-sec", "1", "--seller-burst", "1"]);
    let token = issue_token(&s.dir.path().join("book.toml"), &s.data(), "cust-a", "acme-analytics");
    let expired = ingest::aws::TokenEntry::new(
        "mlrt-old",
        "cust-a",
        "acme-analytics",
        None,
        common::time::Timestamp::from_millis(0),
    );
    let tokens = s.data().join("registration-tokens.toml");
    let text = std::fs::read_to_string(&tokens).unwrap();
    std::fs::write(&tokens, format!("{text}\n{}", expired.to_toml())).unwrap();

    let mut child = Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/boto3/metering_calls.py"))
        .env("METERLINE_URL", &s.url)
        .env("METERLINE_THROTTLED_URL", &throttled.url)
        .env("METERLINE_TOKEN", &token)
        .env("METERLINE_LICENSE", LICENSE)
        // No real AWS configuration may leak in (profiles, endpoints, credentials).
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the boto3 script");
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("the boto3 script took longer than 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(status.success(), "boto3 checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all boto3 checks passed"), "{stdout}");

    throttled.stop();
    let lines = s.stop();
    let qty = |dim: &str| lines.iter().filter(|l| l.dimension == dim).map(|l| l.quantity).sum::<Decimal>();
    assert_eq!(
        qty("users"),
        Decimal::from(250),
        "QuantityAsDecimal 250, its resend once; no refused call left a trace"
    );
    assert_eq!(qty("gb_ingest"), Decimal::from(12), "the licence-only record");
    assert_eq!(qty("c5_xlarge"), Decimal::from(3 + 4 + 1), "both deployments, the dry run not stored");
}
