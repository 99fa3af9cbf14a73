//! Locating the server binaries the tests run.
//!
//! Both lookups end in the same honest failure: an error naming the env var to set and
//! `scripts/install-test-deps.sh`, which installs both idempotently. Tests never skip silently
//! when a server is missing (with or without `CI` set); `CI` only changes the wording.

use std::{
    env,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};

/// Env var that overrides the Tansu binary.
pub const TANSU_BIN_ENV: &str = "METERLINE_TANSU_BIN";
/// Env var that overrides the ClickHouse server binary.
pub const CLICKHOUSE_BIN_ENV: &str = "METERLINE_CLICKHOUSE_BIN";
/// Env var naming the cache dir the install script builds Tansu into.
pub const CACHE_ENV: &str = "METERLINE_CACHE";
/// The Tansu version the tests (and the install script) use.
pub const TANSU_VERSION: &str = "0.6.0";

const INSTALL_HINT: &str = "run scripts/install-test-deps.sh (idempotent)";

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn on_path(name: &str) -> Option<PathBuf> {
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    })
}

/// A binary named by `var`, if set; an error if it is set but not executable.
fn from_env(var: &str) -> Result<Option<PathBuf>> {
    match env::var_os(var) {
        Some(v) if !v.is_empty() => {
            let path = PathBuf::from(v);
            if is_executable(&path) {
                Ok(Some(path))
            } else {
                bail!(
                    "{var}={} is not an executable file; fix {var} or unset it and {INSTALL_HINT}",
                    path.display()
                )
            }
        }
        _ => Ok(None),
    }
}

fn missing(what: &str, var: &str, looked: &[PathBuf]) -> anyhow::Error {
    let looked: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
    let ci = if env::var_os("CI").is_some() {
        "CI is set and "
    } else {
        ""
    };
    anyhow::anyhow!(
        "{ci}the {what} binary was not found (looked at: {}; and on PATH). \
         Set {var} to its path, or {INSTALL_HINT}",
        looked.join(", ")
    )
}

/// The cache dir of the install script: `$METERLINE_CACHE`, else `~/.cache/meterline`.
pub fn cache_dir() -> Option<PathBuf> {
    match env::var_os(CACHE_ENV) {
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("meterline")),
    }
}

/// Path of the Tansu 0.6.0 broker binary.
///
/// Order: `$METERLINE_TANSU_BIN`; `$METERLINE_CACHE/tansu-0.6.0/bin/tansu` (default cache
/// `~/.cache/meterline`, where `scripts/install-test-deps.sh` builds it); `tansu` on `PATH`.
/// The error names the env var and the install script.
pub fn tansu_bin() -> Result<PathBuf> {
    if let Some(path) = from_env(TANSU_BIN_ENV)? {
        return Ok(path);
    }
    let mut looked = Vec::new();
    if let Some(cache) = cache_dir() {
        let path = cache
            .join(format!("tansu-{TANSU_VERSION}"))
            .join("bin")
            .join("tansu");
        if is_executable(&path) {
            return Ok(path);
        }
        looked.push(path);
    }
    if let Some(path) = on_path("tansu") {
        return Ok(path);
    }
    Err(missing(
        &format!("Tansu {TANSU_VERSION} broker"),
        TANSU_BIN_ENV,
        &looked,
    ))
}

/// Path of the ClickHouse server binary.
///
/// Order: `$METERLINE_CLICKHOUSE_BIN`; `/usr/bin/clickhouse` (upstream's multi-call binary, run
/// as `clickhouse server`); `/usr/bin/clickhouse-server`; `/usr/sbin/clickhouse-server` (where
/// Debian's 18.16 package puts it); then `clickhouse` or `clickhouse-server` on `PATH`.
/// A binary whose file name is exactly `clickhouse` is started with the `server` subcommand.
pub fn clickhouse_bin() -> Result<PathBuf> {
    if let Some(path) = from_env(CLICKHOUSE_BIN_ENV)? {
        return Ok(path);
    }
    let candidates = [
        PathBuf::from("/usr/bin/clickhouse"),
        PathBuf::from("/usr/bin/clickhouse-server"),
        PathBuf::from("/usr/sbin/clickhouse-server"),
    ];
    if let Some(path) = candidates.iter().find(|p| is_executable(p)) {
        return Ok(path.clone());
    }
    if let Some(path) = on_path("clickhouse").or_else(|| on_path("clickhouse-server")) {
        return Ok(path);
    }
    Err(missing(
        "ClickHouse server",
        CLICKHOUSE_BIN_ENV,
        &candidates,
    ))
}

/// Whether `bin` is the multi-call `clickhouse` binary that needs a `server` subcommand.
pub(crate) fn clickhouse_is_multicall(bin: &Path) -> bool {
    bin.file_name().is_some_and(|n| n == "clickhouse")
}

/// Path of the Prometheus server binary: `$METERLINE_PROMETHEUS_BIN`, `/usr/bin/prometheus`
/// (Debian's package, installed by `scripts/install-test-deps.sh`), then `prometheus` on `PATH`.
pub fn prometheus_bin() -> Result<PathBuf> {
    let var = crate::prometheus::PROMETHEUS_BIN_ENV;
    if let Some(path) = from_env(var)? {
        return Ok(path);
    }
    let candidates = [PathBuf::from("/usr/bin/prometheus")];
    if let Some(path) = candidates.iter().find(|p| is_executable(p)) {
        return Ok(path.clone());
    }
    on_path("prometheus").ok_or_else(|| missing("Prometheus server", var, &candidates))
}
