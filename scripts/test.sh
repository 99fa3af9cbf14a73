#!/usr/bin/env bash
# README command 2: the whole test suite. Installs what the tests need first (idempotent), then
# runs every test of every crate, and builds the benches so they cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's clickhouse-server and Prometheus, Apache Kafka's jars (Maven) and the boto3 virtualenv
# that tests/it/boto3.rs runs (all cached in ~/.cache/meterline).
bash scripts/install-test-deps.sh

# Hygiene gates first (they fail in seconds): formatting, and clippy on every target with every
# feature, warnings as errors.
cargo fmt --all --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

# Two cores: one test at a time keeps server-backed tests from starving each other.
export RUST_BACKTRACE=1
# --all-features: the distributed binaries (ingest, rater, aggregator) are built first, because
# tests/it/distributed.rs runs them as separate processes against real servers.
cargo build --workspace --all-targets --all-features --locked
# The alert rules: syntax, the Prometheus config that loads them, and one unit test per alert.
promtool check rules deploy/prometheus/alerts.yml
promtool check config deploy/prometheus/prometheus.yml
promtool test rules deploy/prometheus/alerts.test.yml
cargo test --workspace --all-features --locked -- --test-threads="${METERLINE_TEST_THREADS:-1}"
cargo bench --workspace --all-features --locked --no-run

# Issue 7: every fuzz target for a bounded time (cargo-fuzz on nightly, installed if missing), and
# the supply-chain policy (cargo-deny; the advisory check needs GitHub, see SECURITY.md).
FUZZ_SECONDS="${FUZZ_SECONDS:-15}" bash scripts/fuzz.sh
bash scripts/deny.sh
