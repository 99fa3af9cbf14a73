#!/usr/bin/env bash
# The distributed mode on this machine: installs the broker and ClickHouse if missing, builds the
# three binaries, and starts everything on loopback (Ctrl-C stops it).
#   bash scripts/cluster.sh [--price-book FILE] [--dir DIR] [--port 8080]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-test-deps.sh >/dev/null
cargo build --release --workspace --all-features --bins
exec target/release/local-cluster "$@"
