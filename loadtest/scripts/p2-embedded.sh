#!/usr/bin/env bash
# BENCHMARKS.md P2: the embedded default end to end (HTTP ingest → durable in SQLite → folded into
# the monthly charges, all before the ack), on loopback.
#   1. as fast as it goes: native bulk calls of 1000 records, 8 in flight;
#   2. at half that rate: the same bulk calls, then AWS BatchMeterUsage calls of 25 (64 in flight),
#      each against a fresh store, reporting p50…p999 of the ack.
# The load generator runs on the same machine and takes part of its CPU (see its user time).
#   bash loadtest/scripts/p2-embedded.sh            # CUSTOMERS=30000 RECORDS=600000 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
CUSTOMERS=${CUSTOMERS:-30000}
RECORDS=${RECORDS:-600000}
PORT=${PORT:-18080}
DIR=${DIR:-$(mktemp -d)}
T=${CARGO_TARGET_DIR:-target}/release
cargo build --release -p meterline --bin meterline -p meterline-loadtest --bin loadtest >&2
"$T/loadtest" price-book --customers "$CUSTOMERS" --out "$DIR/price-book.toml" >/dev/null

run() { # name rate endpoint concurrency
  rm -rf "$DIR/data"
  "$T/meterline" serve --price-book "$DIR/price-book.toml" --data-dir "$DIR/data" --listen "127.0.0.1:$PORT" >"$DIR/serve-$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
  bash loadtest/scripts/machine.sh >"$DIR/$1.machine.json"
  local size=1000
  "$T/loadtest" http --url "http://127.0.0.1:$PORT" --customers "$CUSTOMERS" --endpoint "$3" --bulk-size $size \
    --concurrency "$4" --rate "$2" --records "$RECORDS" --max-seconds 120 --out "$DIR/$1.json" >/dev/null
  "$T/meterline" stats --data-dir "$DIR/data" >"$DIR/$1.stats.txt"
  kill "$pid"; wait "$pid" || true
  python3 - "$DIR/$1" <<'PY'
import json, sys
p = sys.argv[1]
s, m = json.load(open(p + ".json")), json.load(open(p + ".machine.json"))
print(json.dumps({"run": p.rsplit("/", 1)[1], "records": s["records"], "records_per_sec": round(s["records_per_sec"]),
                  "target_rate": s["target_rate"], "ack_ms_per_call": s["ack_ms_per_call"], "load": m["uptime"]}))
PY
  grep -E "accepted and charged|records answered" "$DIR/$1.stats.txt" >&2
}

bash loadtest/scripts/machine.sh
run max 0 bulk 8
HALF=$(python3 -c "import json;print(round(json.load(open('$DIR/max.json'))['records_per_sec']/2))")
run half-bulk "$HALF" bulk 8
run half-aws "$HALF" aws 64
echo "results in $DIR" >&2
