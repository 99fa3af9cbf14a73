//! What the tests with real AWS clients share: the example price book with deployments and a
//! licence, and `meterline serve` as a child process on a free loopback port.
#![allow(dead_code)] // Each test binary uses its own part.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const BOOK: &str = include_str!("../../docs/examples/price-book.toml");
pub const ACME: &str = "demo-key-acme";
pub const GLOBEX: &str = "demo-key-globex";
pub const LICENSE: &str = "arn:aws:license-manager::123456789012:license:l-alpha-analytics";

/// The example book plus what the AWS-side operations need: two deployments of cust-a's
/// `acme-vm` (MeterUsage from inside the buyer's account), one of cust-c's ended agreement, and
/// a licence ARN on cust-a's analytics agreement.
pub fn book_text() -> String {
    let hash = |k: &str| hex(&common::catalogue::api_key_hash(k));
    let mut book = BOOK
        .replace("id = \"agmnt-a-analytics\"\n", &format!("id = \"agmnt-a-analytics\"\nlicense_arn = \"{LICENSE}\"\n"));
    for (id, customer, product, key) in [
        ("dep-a1", "cust-a", "acme-vm", "dep-key-a1"),
        ("dep-a2", "cust-a", "acme-vm", "dep-key-a2"),
        ("dep-c1", "cust-c", "acme-analytics", "dep-key-c1"),
        // cust-b holds no acme-vm agreement at all: not entitled.
        ("dep-b1", "cust-b", "acme-vm", "dep-key-b1"),
    ] {
        book.push_str(&format!(
            "\n[[deployments]]\nid = \"{id}\"\ncustomer = \"{customer}\"\nproduct = \"{product}\"\napi_key_sha256 = [\"{}\"]\n",
            hash(key)
        ));
    }
    book
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `meterline serve` as a child process; stopped with SIGINT (drain, commit) on drop.
pub struct Served {
    child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Served {
    pub fn start(extra: &[&str]) -> Served {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("book.toml"), book_text()).unwrap();
        let (child, url) = crate::fixtures::spawn_serve(&dir.path().join("book.toml"), &dir.path().join("data"), extra);
        Served { child, url, dir }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the server and returns the store's charge lines.
    pub fn stop(mut self) -> Vec<common::rated::ChargeLine> {
        self.halt();
        let conn = meterline::store::Store::open_read_only(&self.data().join("meterline.db")).unwrap();
        meterline::store::Store::charge_lines(&conn, None).unwrap()
    }

    fn halt(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // Best effort: a server that already exited is fine, the loop below waits either way.
        Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().ok();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.halt();
    }
}

pub fn issue_token(book: &Path, data: &Path, customer: &str, product: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_meterline"))
        .args(["issue-token", "--customer", customer, "--product", product, "--price-book"])
        .arg(book)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
