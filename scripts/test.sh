#!/usr/bin/env bash
# README command 2: the whole test suite. Installs what the tests need first (idempotent), then
# runs every test of every crate, and builds the benches so they cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/install-test-deps.sh ]; then
  bash scripts/install-test-deps.sh
fi

# Two cores: one test binary at a time keeps server-backed tests from starving each other.
export RUST_BACKTRACE=1
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads="${METERLINE_TEST_THREADS:-2}"
cargo bench --workspace --locked --no-run
