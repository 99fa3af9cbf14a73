#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/, libFuzzer, nightly) for a bounded time each.
#   scripts/fuzz.sh                  # FUZZ_SECONDS (default 20) per target: what CI runs
#   FUZZ_RUNS=10000000 FUZZ_SANITIZER=none scripts/fuzz.sh rater_core   # a long run, by executions
# Installs cargo-fuzz if missing (idempotent). Inputs found so far go to
# ${FUZZ_CORPUS:-fuzz/corpus}/<target> (not committed); fuzz/seeds/<target> are committed seeds.
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the script; turn it into a
# regression test in the crate that owns the code, then fix.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION="0.13.2"
step() { printf '[fuzz] %s\n' "$*"; }

if ! cargo +nightly --version >/dev/null 2>&1; then
    step "the nightly toolchain is missing: rustup toolchain install nightly"
    exit 1
fi
case "$(cargo fuzz --version 2>/dev/null || true)" in
    *"$CARGO_FUZZ_VERSION"*) ;;
    *)
        step "installing cargo-fuzz $CARGO_FUZZ_VERSION"
        cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
        ;;
esac

SECONDS_PER_TARGET="${FUZZ_SECONDS:-20}"
CORPUS="${FUZZ_CORPUS:-fuzz/corpus}"
# Debug assertions on (-a): integer overflow panics instead of wrapping silently.
# FUZZ_SANITIZER=none for long runs: our code forbids `unsafe`, and without ASan it runs ~3x faster.
FLAGS=(-O -a --fuzz-dir fuzz --sanitizer "${FUZZ_SANITIZER:-address}")
if [ "$#" -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz); fi

cargo +nightly fuzz build "${FLAGS[@]}"
for t in "${targets[@]}"; do
    mkdir -p "$CORPUS/$t" "fuzz/seeds/$t"
    if [ -n "${FUZZ_RUNS:-}" ]; then limit=(-runs="$FUZZ_RUNS"); else limit=(-max_total_time="$SECONDS_PER_TARGET"); fi
    step "$t: ${limit[*]}"
    # -timeout: one input slower than 10 s is a hang; -rss_limit_mb: unbounded allocation fails.
    log="$CORPUS/$t.log"
    rc=0
    cargo +nightly fuzz run "${FLAGS[@]}" "$t" "$CORPUS/$t" "fuzz/seeds/$t" -- \
        "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -max_len=16384 -print_final_stats=1 >"$log" 2>&1 || rc=$?
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done)' "$log" || true
    if [ "$rc" -ne 0 ]; then
        grep -E -A 20 'panicked|ERROR|SUMMARY' "$log" | head -n 60 >&2 || true
        step "$t: FAILED (input in fuzz/artifacts/$t/, log $log)"
        exit 1
    fi
done
step "all targets ran clean"
