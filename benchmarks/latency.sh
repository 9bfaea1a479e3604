#!/usr/bin/env bash
# End-to-end latency through Kafka, open-loop: from each event's intended send time to its
# decision consumed from the decisions topic, at fixed rates; beside a broker-only passthrough
# (consume + produce, no work) measured in the same run on the same broker.
#
#   RATES=50000,100000,150000 DURATION=20 benchmarks/latency.sh
#
# Broker: Tansu 0.6.0 (in-memory) on loopback. Pipeline: benchmarks/pipelines/w2 (8 detectors,
# 5 windowed). Load: CloudTrail-shaped records from benchmarks/generate.py, actors spread over
# $ACTORS (10k), event time = send time; every 100th event is a probe (a
# StopLogging call the per-event detector `trail-logging-disabled` blocks) whose decision is
# timed. Everything (load generator, broker, rampart) shares this machine's cores.
# Writes benchmarks/results/latency-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/common.sh
./scripts/setup.sh
source scripts/env.sh
RATES="${RATES:-5000,10000,20000,50000,75000}"
DURATION="${DURATION:-15}"
# Client settings for every client in the run (load generator, passthrough, rampart). Tansu
# answers a fetch only when fetch.wait.max.ms has passed (it does not return early when data
# arrives) and spends CPU per request, so tiny waits and tiny produce batches overload it:
# measured here, the passthrough's p99 at 50k ev/s was 770 ms with (linger 1 ms, fetch wait
# 10 ms), 340 ms with (1, 25), 103 ms with (5, 25) and 63 ms with (10, 25).
LINGER_MS="${LINGER_MS:-10}"
# Background events are spread uniformly over this many actors (each actor a window key).
ACTORS="${ACTORS:-10000}"
FETCH_WAIT_MS="${FETCH_WAIT_MS:-25}"
cargo build --release --workspace --all-targets >&2
LOAD="$CARGO_TARGET_DIR/release/rampart-load"
work="${TMPDIR:-/tmp}/rampart-latency"
rm -rf "$work"
mkdir -p "$work"

# Benign background: calls that fail (errorCode) are left out, so that the windowed detectors
# (denied reconnaissance, failure volume) do not fire on every event at this real-time rate.
generated "$work/generated.jsonl" --events 40000 --actors 10000 --attack-share 0
awk '!/"errorCode"/ && n < 20000 { print; n++ }' "$work/generated.jsonl" >"$work/background.jsonl"
python3 - "$work/probe.json" <<'PY'
import json, sys
r = json.load(open("data/cloudtrail/stratus-detonation-logs/aws.defense-evasion.cloudtrail-stop.json"))
r = r["Records"] if isinstance(r, dict) else r
json.dump(next(x for x in r if x["eventName"] == "StopLogging"), open(sys.argv[1], "w"))
PY

port=$(free_port)
http=$(free_port)
BROKERS="127.0.0.1:$port"
trap stop_background EXIT
start_tansu "$port" "$work/broker.log" bench.pt.in bench.pt.out bench.events
pin_helpers

common=(--brokers "$BROKERS" --set "linger.ms=$LINGER_MS" --set "fetch.wait.max.ms=$FETCH_WAIT_MS" latency --background "$work/background.jsonl" --probe "$work/probe.json"
  --rates "$RATES" --duration "$DURATION" --actors "$ACTORS")

if [ -z "${SKIP_PASSTHROUGH:-}" ]; then
echo "== broker-only passthrough" >&2
taskset -c "$SUT_CPUS" "$LOAD" --brokers "$BROKERS" --set "linger.ms=$LINGER_MS" --set "fetch.wait.max.ms=$FETCH_WAIT_MS" passthrough --from bench.pt.in --to bench.pt.out 2>"$work/passthrough.log" &
pt=$!
pids+=($pt)
sleep 2
helper "$LOAD" "${common[@]}" --input bench.pt.in --output bench.pt.out --label passthrough | tee "$work/passthrough.md"
kill "$pt"
fi

# The pipeline, with its window state cache sized to the working set: at these rates W2's
# 15-minute windows hold hundreds of MB within a minute, and a cache smaller than the keys in
# use evicts keys the next batches read straight back (docs/operations.md, "cache_mb").
PIPELINE="${PIPELINE:-benchmarks/pipelines/w2}"
CACHE_MB="${CACHE_MB:-4096}"
cp -rL "$PIPELINE" "$work/pipeline"
sed -i "s/^\[state\]\$/[state]\ncache_mb = $CACHE_MB/" "$work/pipeline/pipeline.toml"
grep -q "^cache_mb = $CACHE_MB\$" "$work/pipeline/pipeline.toml"
echo "== rampart run $PIPELINE (cache_mb = $CACHE_MB)" >&2
RAMPART_KAFKA_LINGER_MS=$LINGER_MS RAMPART_KAFKA_FETCH_WAIT_MAX_MS=$FETCH_WAIT_MS \
  taskset -c "$SUT_CPUS" "$RAMPART" run "$work/pipeline" --brokers "$BROKERS" --listen "127.0.0.1:$http" \
  --state "$work/state" --audit "$work/audit.log" 2>"$work/rampart.log" &
rp=$!
pids+=($rp)
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$http/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
if [ -n "${PERF_OUT:-}" ]; then
  # A CPU profile of rampart while the load runs (see benchmarks/results/profile-*.md).
  # (PERF_CALL_GRAPH=dwarf,16384 for full call stacks: benchmarks/profile.sh.)
  perf record -F 499 --call-graph "${PERF_CALL_GRAPH:-fp}" -p "$rp" -o "$PERF_OUT" -- sleep "$DURATION" 2>/dev/null &
  perf_pid=$!
fi
helper "$LOAD" "${common[@]}" --input bench.events --output bench.decisions --label rampart | tee "$work/rampart.md"
curl -s "http://127.0.0.1:$http/metrics" | grep -E '^rampart_(events_total|decisions_total|processing_latency_seconds|checkpoint_latency_seconds)' >"$work/metrics.txt" || true
kill -TERM "$rp"
wait "$rp" || true
[ -z "${perf_pid:-}" ] || wait "$perf_pid" || true

# A run without the passthrough (a diagnostic run) does not replace the day's result.
out="benchmarks/results/latency-$(date +%F).md"
[ -z "${SKIP_PASSTHROUGH:-}" ] || out="$work/latency.md"
{
  echo "# End-to-end latency through Kafka ($(date +%F))"
  echo
  machine_line
  pinning_line
  echo "Broker: Tansu 0.6.0, in-memory storage, loopback, 1 partition per topic."
  echo "Command: \`RATES=$RATES DURATION=$DURATION ACTORS=$ACTORS LINGER_MS=$LINGER_MS FETCH_WAIT_MS=$FETCH_WAIT_MS CACHE_MB=$CACHE_MB benchmarks/latency.sh\` ($DURATION s per rate, the first 3 s not counted)."
  echo "Pipeline: \`$PIPELINE\` with \`[state] cache_mb = $CACHE_MB\`."
  echo
  echo "Latency is from each probe's intended send time (open loop: event i is due at i/rate)"
  echo "to its decision consumed from \`bench.decisions\` (rampart) or its copy consumed from"
  echo "\`bench.pt.out\` (passthrough), so a sender or pipeline that falls behind shows in the tail."
  echo "Every client (generator, passthrough, rampart): linger.ms=$LINGER_MS, fetch.wait.max.ms=$FETCH_WAIT_MS"
  echo "(see the script for why); rampart batches at most 4096 events or 5 ms. Load generator,"
  echo "broker and rampart share the 2 cores."
  echo
  if [ -s "$work/passthrough.md" ]; then cat "$work/passthrough.md"; else head -n 2 "$work/rampart.md"; fi
  tail -n +3 "$work/rampart.md"
  echo
  echo "Rampart's own view at the end (\`/metrics\`):"
  echo
  echo '```'
  cat "$work/metrics.txt"
  echo '```'
} >"$out"
echo "wrote $out" >&2
