#!/usr/bin/env bash
# BENCHMARKS.md "distributed ack": how long a seller waits for distributed `ingest`'s answer now
# that it is the rater's committed decision (issue 14 item 2), beside `meterline serve` on the
# same machine, same generator, same run.
#   1. `local-cluster` (Apache Kafka, ClickHouse, ingest, rater, aggregator on loopback);
#   2. `loadtest http` as fast as it goes with bulk calls of 1000 (the sustainable rate);
#   3. at half that rate: AWS BatchMeterUsage calls of 25 (64 in flight), reporting p50…p999 of
#      the ack — the budget is p99 < 50 ms;
#   4. the same two runs against `meterline serve` (the embedded anchor).
#   bash loadtest/scripts/p3-ack.sh          # CUSTOMERS=20000 RECORDS=200000 PARTITIONS=4
set -euo pipefail
cd "$(dirname "$0")/../.."
CUSTOMERS=${CUSTOMERS:-20000}
RECORDS=${RECORDS:-200000}
PARTITIONS=${PARTITIONS:-4}
PORT=${PORT:-18280}
EPORT=${EPORT:-18281}
DIR=${DIR:-$(mktemp -d)}
mkdir -p "$DIR"
T=${CARGO_TARGET_DIR:-target}/release
bash scripts/install-test-deps.sh >/dev/null
cargo build --release --workspace --all-features --bins >&2
"$T/loadtest" price-book --customers "$CUSTOMERS" --out "$DIR/price-book.toml" >/dev/null

CLUSTER=""
SERVE=""
cleanup() {
  [ -n "$SERVE" ] && kill "$SERVE" 2>/dev/null || true
  [ -n "$CLUSTER" ] && kill -INT "$CLUSTER" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Each run gets a fresh pipeline: the generator's traffic covers the same four hours, and a second
# run on the same store would be all identical resends.
start_cluster() { # name
  "$T/local-cluster" --price-book "$DIR/price-book.toml" --dir "$DIR/$1" --port "$PORT" --partitions "$PARTITIONS" \
    >"$DIR/$1.out" 2>&1 &
  CLUSTER=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.2; done
  # Every partition owned and rebuilt before the clock starts.
  for _ in $(seq 240); do
    [ "$(grep -c 'partition state rebuilt' "$DIR/$1/rater.log" 2>/dev/null || echo 0)" -ge "$PARTITIONS" ] && break
    sleep 0.5
  done
  sleep "${SETTLE_SECONDS:-3}"
}
stop_cluster() { kill -INT "$CLUSTER"; wait "$CLUSTER" || true; CLUSTER=""; }
start_serve() { # name
  "$T/meterline" serve --price-book "$DIR/price-book.toml" --data-dir "$DIR/$1" --listen "127.0.0.1:$EPORT" \
    >"$DIR/$1.log" 2>&1 &
  SERVE=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$EPORT/health" >/dev/null && break; sleep 0.1; done
}
stop_serve() { kill "$SERVE"; wait "$SERVE" || true; SERVE=""; }

load() { # name url rate endpoint concurrency size
  bash loadtest/scripts/machine.sh >"$DIR/$1.machine.json"
  "$T/loadtest" http --url "$2" --customers "$CUSTOMERS" --endpoint "$4" --bulk-size "$6" \
    --concurrency "$5" --rate "$3" --records "$RECORDS" --max-seconds 120 --out "$DIR/$1.json" >/dev/null
  python3 - "$DIR/$1" <<'PY'
import json, sys
p = sys.argv[1]
s, m = json.load(open(p + ".json")), json.load(open(p + ".machine.json"))
print(json.dumps({"run": p.rsplit("/", 1)[1], "records": s["records"], "records_per_sec": round(s["records_per_sec"]),
                  "target_rate": s["target_rate"], "ack_ms_per_call": s["ack_ms_per_call"], "load": m["uptime"]}))
PY
}
half() { python3 -c "import json;print(round(json.load(open('$DIR/$1.json'))['records_per_sec']/2))"; }

bash loadtest/scripts/machine.sh
start_cluster c1; load distributed-max "http://127.0.0.1:$PORT" 0 bulk 8 1000; stop_cluster
start_cluster c2; load distributed-half-aws "http://127.0.0.1:$PORT" "$(half distributed-max)" aws 64 25; stop_cluster
start_serve e1; load embedded-max "http://127.0.0.1:$EPORT" 0 bulk 8 1000; stop_serve
start_serve e2; load embedded-half-aws "http://127.0.0.1:$EPORT" "$(half embedded-max)" aws 64 25; stop_serve
echo "results in $DIR" >&2
