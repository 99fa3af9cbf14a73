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

/// Env var naming the folder of Kafka's jars (overrides the cache).
pub const KAFKA_LIBS_ENV: &str = "METERLINE_KAFKA_LIBS";
/// Env var that overrides the ClickHouse server binary.
pub const CLICKHOUSE_BIN_ENV: &str = "METERLINE_CLICKHOUSE_BIN";
/// Env var naming the cache dir the install script copies Kafka's jars into.
pub const CACHE_ENV: &str = "METERLINE_CACHE";
/// The Apache Kafka version the tests (and the install script, `testkit/kafka/pom.xml`) use.
pub const KAFKA_VERSION: &str = "4.1.1";

const INSTALL_HINT: &str = "run scripts/install-test-deps.sh (idempotent)";

fn is_executable(path: &Path) -> bool {
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn on_path(name: &str) -> Option<PathBuf> {
    env::var_os("PATH").and_then(|paths| env::split_paths(&paths).map(|dir| dir.join(name)).find(|p| is_executable(p)))
}

/// A binary named by `var`, if set; an error if it is set but not executable.
fn from_env(var: &str) -> Result<Option<PathBuf>> {
    match env::var_os(var) {
        Some(v) if !v.is_empty() => {
            let path = PathBuf::from(v);
            if is_executable(&path) {
                Ok(Some(path))
            } else {
                bail!("{var}={} is not an executable file; fix {var} or unset it and {INSTALL_HINT}", path.display())
            }
        }
        _ => Ok(None),
    }
}

fn missing(what: &str, var: &str, looked: &[PathBuf]) -> anyhow::Error {
    let looked: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
    let ci = if env::var_os("CI").is_some() { "CI is set and " } else { "" };
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

/// The Kafka jars: `$METERLINE_KAFKA_LIBS`, else `$METERLINE_CACHE/kafka-4.1.1/libs` (default
/// cache `~/.cache/meterline`), where `scripts/install-test-deps.sh` copies them with Maven from
/// `testkit/kafka/pom.xml`. The folder must hold `kafka_2.13-4.1.1.jar`.
pub fn kafka_libs() -> Result<PathBuf> {
    let jar = format!("kafka_2.13-{KAFKA_VERSION}.jar");
    let mut looked = Vec::new();
    let candidates = env::var_os(KAFKA_LIBS_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain(cache_dir().map(|c| c.join(format!("kafka-{KAFKA_VERSION}")).join("libs")));
    for dir in candidates {
        if dir.join(&jar).is_file() {
            return Ok(dir);
        }
        looked.push(dir.join(&jar));
    }
    Err(missing(&format!("Apache Kafka {KAFKA_VERSION} ({jar})"), KAFKA_LIBS_ENV, &looked))
}

/// The `java` to run Kafka with: `$JAVA_HOME/bin/java`, else `java` on `PATH` (Kafka 4 needs 17+).
pub fn java_bin() -> Result<PathBuf> {
    let from_home = env::var_os("JAVA_HOME").map(|h| PathBuf::from(h).join("bin").join("java"));
    if let Some(path) = from_home.as_ref().filter(|p| is_executable(p)) {
        return Ok(path.clone());
    }
    on_path("java")
        .ok_or_else(|| missing("Java (17 or newer)", "JAVA_HOME", &from_home.into_iter().collect::<Vec<_>>()))
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
    Err(missing("ClickHouse server", CLICKHOUSE_BIN_ENV, &candidates))
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
