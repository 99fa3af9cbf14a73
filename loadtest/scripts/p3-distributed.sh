#!/usr/bin/env bash
# BENCHMARKS.md P3 (and the partition/instance scaling rows): the distributed mode end to end
# against a raw consume of the same topic, same broker, same client library, same run.
#
#   1. `local-cluster` starts Apache Kafka (one KRaft node), ClickHouse, ingest, rater, aggregator on
#      loopback (PARTITIONS partitions); RATERS-1 more raters join the group.
#   2. `loadtest kafka` produces RECORDS records of the scenario straight to the raw topic as fast
#      as it goes (acks=all), sampling event → row in ClickHouse every 250 ms.
#   3. End to end = RECORDS / (first produce → the moment ClickHouse's rated_usage stops growing).
#   4. `loadtest consume` then reads the same RECORDS raw messages from the start with a fresh group:
#      the broker + client limit.
#   5. P4: the same produced records (dumped by the load generator) are loaded raw into a table of
#      the same ClickHouse, and SQL computes the deduplicated monthly charges (first record per
#      slot stands; prices joined per hour, annual coverage netted); the result must equal the
#      pipeline's monthly_charges line for line.
#   bash loadtest/scripts/p3-distributed.sh       # CUSTOMERS=20000 RECORDS=300000 PARTITIONS=4 RATERS=1
set -euo pipefail
cd "$(dirname "$0")/../.."
CUSTOMERS=${CUSTOMERS:-20000}
RECORDS=${RECORDS:-300000}
PARTITIONS=${PARTITIONS:-4}
RATERS=${RATERS:-1}
PORT=${PORT:-18180}
DIR=${DIR:-$(mktemp -d)}
T=${CARGO_TARGET_DIR:-target}/release
bash scripts/install-test-deps.sh >/dev/null
cargo build --release --workspace --all-features --bins >&2
"$T/loadtest" price-book --customers "$CUSTOMERS" --out "$DIR/price-book.toml" >/dev/null

"$T/local-cluster" --price-book "$DIR/price-book.toml" --dir "$DIR/cluster" --port "$PORT" --partitions "$PARTITIONS" \
  --session-timeout-ms "${SESSION_TIMEOUT_MS:-10000}" >"$DIR/cluster.out" 2>&1 &
CLUSTER=$!
EXTRA=()
cleanup() {
  for p in "${EXTRA[@]}"; do kill "$p" 2>/dev/null || true; done
  kill -INT "$CLUSTER" 2>/dev/null || true
  wait "$CLUSTER" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.2; done
CFG="$DIR/cluster/meterline.toml"
CH=$(sed -n 's/^url = "\(.*\)"/\1/p' "$CFG")
q() { curl -sf --data-binary "$1" "$CH"; }
for _ in $(seq 300); do q "SELECT count() FROM meterline.rated_usage" >/dev/null 2>&1 && break; sleep 0.2; done
for i in $(seq 2 "$RATERS"); do
  METERLINE__RATER__INSTANCE_ID="rater-$i" "$T/rater" --config "$CFG" >"$DIR/cluster/rater-$i.log" 2>&1 &
  EXTRA+=($!)
done
# Let the group settle: every partition's state rebuilt.
for _ in $(seq 240); do
  [ "$(cat "$DIR"/cluster/rater*.log | grep -c 'partition state rebuilt')" -ge "$PARTITIONS" ] && break
  sleep 0.5
done
sleep "${SETTLE_SECONDS:-5}"

"$T/loadtest" prices --customers "$CUSTOMERS" --out "$DIR/prices.jsonl" >/dev/null
bash loadtest/scripts/machine.sh >"$DIR/machine.json"
START=$(date +%s.%N)
"$T/loadtest" kafka --config "$CFG" --customers "$CUSTOMERS" --records "$RECORDS" --max-seconds 300 --probe \
  --dump "$DIR/raw.jsonl" --out "$DIR/produce.json" >/dev/null
# Done when ClickHouse holds every distinct priced slot (or nothing moved for 120 s: a stall).
EXPECTED=$(python3 -c "import json; print(json.load(open('$DIR/produce.json'))['expected_rated'])")
PREV=-1
LAST=$(date +%s.%N)
while true; do
  N=$(q "SELECT count() FROM meterline.rated_usage FINAL" || echo "$PREV")
  NOW=$(date +%s.%N)
  if [ "$N" != "$PREV" ]; then PREV=$N; LAST=$NOW; fi
  [ "$N" -ge "$EXPECTED" ] && break
  if python3 -c "import sys; sys.exit(0 if $NOW - $LAST > 120 else 1)"; then echo "stalled at $N of $EXPECTED" >&2; break; fi
  sleep 0.1
done
# Where the CPU went during the run (broker, ClickHouse, stages; the load generator is separate).
ps -eo pid,ppid,comm,time --no-headers | awk -v c="$CLUSTER" -v extra=" ${EXTRA[*]:-} " \
  '$2 == c || index(extra, " " $1 " ") { print $3, $4 }' >"$DIR/cpu.txt"
"$T/loadtest" consume --config "$CFG" --records "$RECORDS" --max-seconds 300 >"$DIR/consume.json"

# P4: raw into ClickHouse, charges by SQL at query time.
q "CREATE DATABASE IF NOT EXISTS p4"
q "DROP TABLE IF EXISTS p4.raw"
q "DROP TABLE IF EXISTS p4.prices"
q "CREATE TABLE p4.raw (seq UInt64, product String, customer String, dimension String, hour DateTime, quantity Decimal(38, 9)) ENGINE = MergeTree ORDER BY (product, customer, dimension, hour)"
q "CREATE TABLE p4.prices (customer String, product String, dimension String, hour DateTime, rate Decimal(38, 12), currency String, annual_units UInt64) ENGINE = MergeTree ORDER BY (customer, product, dimension, hour)"
curl -sf --data-binary @"$DIR/prices.jsonl" "$CH/?query=INSERT%20INTO%20p4.prices%20FORMAT%20JSONEachRow"
P4SQL="SELECT toString(toStartOfMonth(hour)) AS m, customer, product, dimension, currency,
  toString(sum(if(q > toDecimal128(annual_units, 9), q - toDecimal128(annual_units, 9), toDecimal128(0, 9)) * rate)) AS amount, count() AS records
FROM (SELECT product, customer, dimension, hour, argMin(quantity, seq) AS q FROM p4.raw GROUP BY product, customer, dimension, hour)
ALL INNER JOIN (SELECT customer, product, dimension, hour, rate, currency, annual_units FROM p4.prices) USING (customer, product, dimension, hour)
GROUP BY m, customer, product, dimension, currency ORDER BY m, customer, product, dimension, currency FORMAT TabSeparated"
P4START=$(date +%s.%N)
curl -sf --data-binary @"$DIR/raw.jsonl" "$CH/?query=INSERT%20INTO%20p4.raw%20FORMAT%20JSONEachRow"
P4LOADED=$(date +%s.%N)
q "$P4SQL" >"$DIR/p4-sql.tsv"
P4END=$(date +%s.%N)
q "SELECT toString(month), customer, product, dimension, currency, toString(amount_unrounded), records FROM meterline.monthly_charges FINAL ORDER BY month, customer, product, dimension, currency FORMAT TabSeparated" >"$DIR/p4-pipeline.tsv"
python3 - "$DIR" "$START" "$LAST" "$PREV" "$RECORDS" "$PARTITIONS" "$RATERS" "$P4START" "$P4LOADED" "$P4END" <<'PY'
import json, sys
from decimal import Decimal
d, start, last, rated, records, partitions, raters = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7]
p4start, p4loaded, p4end = map(float, sys.argv[8:11])
def lines(f):
    out = {}
    for l in open(f):
        x = l.rstrip("\n").split("\t")
        if len(x) == 7:
            out[tuple(x[:5])] = (Decimal(x[5]).normalize(), int(x[6]))
    return out
sql, ours = lines(d + "/p4-sql.tsv"), lines(d + "/p4-pipeline.tsv")
diff = [k for k in set(sql) | set(ours) if sql.get(k) != ours.get(k)]
p, c, m = json.load(open(d + "/produce.json")), json.load(open(d + "/consume.json")), json.load(open(d + "/machine.json"))
e2e = p["records"] / (last - start)
print(json.dumps({
    "partitions": int(partitions), "raters": int(raters), "records_produced": p["records"], "rated_rows": rated, "expected_rated": p["expected_rated"],
    "produce_records_per_sec": round(p["records_per_sec"]), "produce_ack_ms": p["ack_ms_per_record"],
    "end_to_end_records_per_sec": round(e2e), "end_to_end_seconds": round(last - start, 2),
    "raw_consume_records_per_sec": round(c["records_per_sec"]), "raw_consume_records": c["records"],
    "ratio_e2e_over_raw": round(e2e / c["records_per_sec"], 3),
    "event_to_clickhouse_ms": p["charge_visible_ms"],
    "p4": {"sql_load_seconds": round(p4loaded - p4start, 3), "sql_query_seconds": round(p4end - p4loaded, 3),
           "sql_total_seconds": round(p4end - p4start, 3), "pipeline_seconds": round(last - start, 2),
           "ratio_ours_over_sql": round((last - start) / (p4end - p4start), 2),
           "lines": len(ours), "lines_differing": len(diff), "first_differences": [[list(k), str(sql.get(k)), str(ours.get(k))] for k in diff[:3]]},
    "load_at_start": m["uptime"]}))
PY
echo "results in $DIR" >&2
