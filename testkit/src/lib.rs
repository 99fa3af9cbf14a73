//! Test support for Meterline: starts **real** server processes for integration tests.
//!
//! No mocks: a [`Broker`] is Apache Kafka 4.1 in KRaft mode (one combined broker + controller
//! Java process, or a three-node cluster) and a [`ClickHouse`] is a `clickhouse-server` process
//! (Debian's 18.16 package on the dev machine), each on free ports on `127.0.0.1` only, with its
//! data and logs in a temporary directory. Both are killed (SIGKILL) when dropped, and a small `sh` watchdog per process kills
//! them when the test binary exits, so servers held in never-dropped statics do not outlive it.
//!
//! The servers come from `scripts/install-test-deps.sh` (idempotent: Kafka's jars through Maven,
//! ClickHouse and Prometheus from Debian); see [`kafka_libs`], [`java_bin`] and [`clickhouse_bin`]
//! for how they are found (`METERLINE_KAFKA_LIBS`, `JAVA_HOME`, `METERLINE_CLICKHOUSE_BIN`). A
//! missing server is an error, never a silent skip.
//!
//! # Layout
//! * [`ports`]: [`free_port`], loopback ports reserved process-wide so none is handed out twice.
//! * [`bins`]: locating the server binaries, with an error that names the env var and the script.
//! * `process` (private): spawning a server with its output in a log file, the exit watchdog,
//!   log tails for readiness errors, unique name suffixes.
//! * [`broker`]: [`Broker`], start/kill/restart Kafka (whole cluster or one node); per-test topic,
//!   group and transactional-id names; topic creation through rdkafka's `AdminClient`.
//! * [`prometheus`]: [`Prometheus`], a real Prometheus scraping loopback targets every second.
//! * [`clickhouse_server`]: [`ClickHouse`], start/kill/restart ClickHouse from a generated XML
//!   config; per-test databases; a plain-text query helper for asserts.
//!
//! # Where data enters and leaves
//! Tests reach the servers only over loopback TCP: Kafka protocol at [`Broker::bootstrap`],
//! ClickHouse HTTP at [`ClickHouse::url`]. Server logs stay in each server's temp dir (set
//! `METERLINE_TESTKIT_KEEP=1` to keep the dirs after the test for inspection).
//!
//! # Isolation
//! Isolate tests by name, not by server: [`Broker::topic`], [`Broker::group`] and
//! [`ClickHouse::database`] hand out unique names, so one server may be shared by many tests.
//! On a 2-core machine run integration tests with `--test-threads=1` or few threads.

pub mod bins;
pub mod broker;
pub mod clickhouse_server;
pub mod ports;
mod process;
pub mod prometheus;

pub use bins::{clickhouse_bin, java_bin, kafka_libs};
pub use broker::Broker;
pub use clickhouse_server::ClickHouse;
pub use ports::free_port;
pub use prometheus::{Job, Prometheus};
