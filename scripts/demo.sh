#!/usr/bin/env bash
# The demo: Rampart as a live service on a real Kafka-protocol broker.
#
# Builds rampart, checks and tests the cloudtrail pipeline, starts a local Tansu broker, runs
# `rampart run pipelines/cloudtrail` and the example enforcement gateway, feeds the 35 real
# Stratus Red Team detonations mixed into ~24k benign CloudTrail events (timeline ending now),
# shows the decisions arriving on the decisions topic, asks the gateway about a blocked and an
# innocent actor, shows health and metrics, and stops everything cleanly (SIGTERM: the service
# checkpoints and exits 0).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
source scripts/env.sh
echo "== building rampart (release; the first build takes a while)" >&2
# --workspace --all-targets: the same feature set as the tests, so both share one build.
cargo build --release --workspace --all-targets
LOAD="$CARGO_TARGET_DIR/release/rampart-load"
GATEWAY="$CARGO_TARGET_DIR/release/examples/gateway"
echo "== rampart check / test pipelines/cloudtrail" >&2
"$RAMPART" check pipelines/cloudtrail
"$RAMPART" test pipelines/cloudtrail

out="${TMPDIR:-/tmp}/rampart-demo"
rm -rf "$out"
mkdir -p "$out"
KAFKA_PORT=$(free_port)
HTTP_PORT=$(free_port)
GATEWAY_PORT=$(free_port)
BROKERS="127.0.0.1:$KAFKA_PORT"
trap stop_background EXIT

echo "== starting the Tansu broker on $BROKERS (in-memory storage)" >&2
start_tansu "$KAFKA_PORT" "$out/broker.log" cloudtrail

echo "== rampart run pipelines/cloudtrail (metrics on http://127.0.0.1:$HTTP_PORT/metrics)" >&2
RAMPART_LOG=info "$RAMPART" run pipelines/cloudtrail --brokers "$BROKERS" \
  --listen "127.0.0.1:$HTTP_PORT" --state "$out/state" 2>"$out/rampart.log" &
rampart_pid=$!
pids+=($rampart_pid)
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "readyz: $(curl -s "http://127.0.0.1:$HTTP_PORT/readyz")" >&2

echo "== the example gateway (an enforcement point using rampart-enforce) on 127.0.0.1:$GATEWAY_PORT" >&2
"$GATEWAY" --brokers "$BROKERS" --topic rampart.decisions --listen "127.0.0.1:$GATEWAY_PORT" 2>"$out/gateway.log" &
pids+=($!)

echo "== feeding 35 real detonations mixed into benign traffic (20 minutes of event time, ending now)" >&2
python3 scripts/demo-feed.py --out "$out/feed.jsonl"
"$LOAD" --brokers "$BROKERS" feed --topic cloudtrail --rate 4000 "$out/feed.jsonl"

echo >&2
echo "== decisions on rampart.decisions, as they arrived (the first of each detector; all in $out/decisions.jsonl)" >&2
"$LOAD" --brokers "$BROKERS" tail --topic rampart.decisions --idle 4 > "$out/decisions.jsonl"
python3 - "$out/decisions.jsonl" <<'PY'
import json, sys
seen, n = set(), 0
for line in open(sys.argv[1]):
    d = json.loads(line); n += 1
    if d['detector']['id'] in seen:
        continue
    seen.add(d['detector']['id'])
    print(f"{d['verdict']:<6} {d['severity']:<8} {d['detector']['id']:<36} {d['reason'][:110]}")
print(f"-- {n} decisions from {len(seen)} detectors", file=sys.stderr)
PY

echo >&2
echo "== the gateway refuses a blocked actor and lets an innocent one through" >&2
blocked=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["detector"]["id"] == "trail-logging-disabled":
        print(d["actor"]); break' "$out/decisions.jsonl")
echo "\$ curl -H 'X-Actor: $blocked' http://127.0.0.1:$GATEWAY_PORT/CreateAccessKey" >&2
curl -s -w '  (HTTP %{http_code})\n' -H "X-Actor: $blocked" "http://127.0.0.1:$GATEWAY_PORT/CreateAccessKey"
echo "\$ curl -H 'X-Actor: arn:aws:iam::111122223333:user/dev-3' http://127.0.0.1:$GATEWAY_PORT/ListBuckets" >&2
curl -s -w '  (HTTP %{http_code})\n' -H "X-Actor: arn:aws:iam::111122223333:user/dev-3" "http://127.0.0.1:$GATEWAY_PORT/ListBuckets"

echo >&2
echo "== health and a few metrics" >&2
echo "healthz: $(curl -s "http://127.0.0.1:$HTTP_PORT/healthz")  readyz: $(curl -s "http://127.0.0.1:$HTTP_PORT/readyz")"
curl -s "http://127.0.0.1:$HTTP_PORT/metrics" \
  | grep -E '^rampart_(events_total|bad_records_total|late_records_total|checkpoints_total|state_disk_bytes|end_to_end_latency_seconds\{quantile="0.99"\}|processing_latency_seconds\{quantile="0.99"\}) '

echo >&2
echo "== stopping: SIGTERM finishes the batch in flight, waits for the broker, checkpoints, exits 0" >&2
kill -TERM "$rampart_pid"
status=0
wait "$rampart_pid" || status=$?
tail -n 1 "$out/rampart.log" >&2
echo "rampart run exited with status $status (logs: $out/rampart.log)" >&2
exit "$status"
