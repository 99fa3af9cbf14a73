//! Process plumbing shared by the broker and ClickHouse wrappers.
//!
//! * [`ServerProcess`] owns a spawned server and its exit watchdog. Its output goes to a log file
//!   (appended across restarts). Dropping it SIGKILLs and reaps both.
//! * The watchdog is `sh -c 'while kill -0 <test pid>; do sleep 1; done; kill -9 <server pid>'`:
//!   statics are never dropped, so without it a server shared through a `OnceCell` would outlive
//!   the test binary. It is killed together with the server so it can never fire later at a
//!   recycled pid.
//! * [`log_tail`] collects the end of a server's log files for readiness errors.

use std::{
    collections::hash_map::RandomState,
    fs::{File, OpenOptions},
    hash::{BuildHasher, Hasher},
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, Result};

/// A running server process plus the watchdog that kills it when the test binary exits.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    name: &'static str,
    child: Child,
    watchdog: Option<Child>,
}

impl ServerProcess {
    /// Spawns `cmd` with stdin closed and stdout/stderr appended to `log`, then its watchdog.
    pub(crate) fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {name} log file {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("duplicating {name} log file handle"))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err));
        let child = cmd.spawn().with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let mut proc = ServerProcess { name, child, watchdog: None };
        let script = format!(
            "while kill -0 {test} 2>/dev/null; do sleep 1; done; kill -9 {server} 2>/dev/null",
            test = std::process::id(),
            server = proc.child.id()
        );
        // If the watchdog cannot start, `proc` is dropped here and kills the server.
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning the exit watchdog for {name}"))?;
        proc.watchdog = Some(watchdog);
        tracing::debug!(name, pid = proc.child.id(), ?cmd, "testkit: server spawned");
        Ok(proc)
    }

    /// The server's pid.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` if the server has already exited.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILLs and reaps the server and its watchdog. Idempotent.
    pub(crate) fn kill(&mut self) {
        // Errors mean the process is already gone (or reaped); nothing left to do.
        kill_and_reap(&mut self.child);
        if let Some(mut w) = self.watchdog.take() {
            kill_and_reap(&mut w);
        }
        tracing::debug!(name = self.name, pid = self.child.id(), "testkit: server killed");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILLs `child` and waits for it; a process that already exited is not an error.
fn kill_and_reap(child: &mut Child) {
    if let Err(e) = child.kill() {
        tracing::trace!(pid = child.id(), error = %e, "testkit: kill failed (already exited?)");
    }
    if let Err(e) = child.wait() {
        tracing::trace!(pid = child.id(), error = %e, "testkit: wait failed");
    }
}

/// The last `lines` lines of each existing file in `files`, headed by its path; for errors.
pub(crate) fn log_tail(files: &[PathBuf], lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let mut out = String::new();
    for path in files {
        let Ok(mut f) = File::open(path) else {
            continue;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES))).is_err() {
            continue;
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            continue;
        }
        let text = String::from_utf8_lossy(&buf);
        let all: Vec<&str> = text.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        out.push_str(&format!("\n--- tail of {} ---\n", path.display()));
        out.push_str(&tail.join("\n"));
    }
    if out.is_empty() {
        out.push_str("\n(no log output)");
    }
    out
}

/// A random `u64` from std's randomly keyed hasher (no extra dependency; not cryptographic).
pub(crate) fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default(),
    );
    h.finish()
}

/// `{prefix}{sep}{16 hex digits}`, unique per call within the process (a counter is mixed in)
/// and across processes with overwhelming probability. Characters of `prefix` outside
/// `[A-Za-z0-9_]` (and `.`/`-` when `allow_dot_dash`) become `_`; a prefix that does not start
/// with a letter gets `t_` in front. The prefix is cut at 100 characters.
pub(crate) fn unique_name(prefix: &str, sep: char, allow_dot_dash: bool) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(random_u64());
    h.write_u64(n);
    h.write_u32(std::process::id());
    let clean: String =
        prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || (allow_dot_dash && (c == '.' || c == '-')) {
                    c
                } else {
                    '_'
                }
            })
            .take(100)
            .collect();
    // Start with a letter so the name is also a valid unquoted SQL identifier.
    let clean = match clean.chars().next() {
        Some(c) if c.is_ascii_alphabetic() => clean,
        _ => format!("t_{clean}"),
    };
    format!("{clean}{sep}{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_are_clean() {
        let a = unique_name("my::test name", '-', true);
        let b = unique_name("my::test name", '-', true);
        assert_ne!(a, b);
        assert!(a.starts_with("my__test_name-"), "{a}");
        let db = unique_name("a.b-c", '_', false);
        assert!(db.starts_with("a_b_c_"), "{db}");
        assert!(unique_name("1x", '_', false).starts_with("t_1x_"));
    }
}
