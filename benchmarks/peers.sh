#!/usr/bin/env bash
# Workload W2 through Kafka, side by side: Rampart (`rampart run`, the W2 pipeline) and Quix
# Streams (benchmarks/peers/quix_w2.py: the same 8 detectors, 5 of them sliding windows) each
# consume the same pre-loaded topic of generated CloudTrail-shaped events on the same broker,
# one after the other, and publish their matches. Reports each system's events/s (first to
# last input message), the detections each found per detector (distinct detector/key pairs)
# and where they differ; Rampart's replay of the same file is shown for reference.
#
#   EVENTS=20000 benchmarks/peers.sh       # the default: Quix needs minutes for 20k events
#
# Broker: Tansu (in-memory) on loopback; client settings as in latency.sh (linger 10 ms, fetch
# wait 25 ms). Quix Streams is installed into ~/.cache/rampart/venv (pinned version below).
# Writes benchmarks/results/peers-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/common.sh
./scripts/setup.sh
source scripts/env.sh
EVENTS="${EVENTS:-20000}"
QUIX_VERSION="${QUIX_VERSION:-3.28.1}"
VENV="$HOME/.cache/rampart/venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import quixstreams, sys; sys.exit(quixstreams.__version__ != '$QUIX_VERSION')" 2>/dev/null \
  || "$VENV/bin/pip" install -q "quixstreams==$QUIX_VERSION"
cargo build --release --workspace --all-targets >&2
LOAD="$CARGO_TARGET_DIR/release/rampart-load"
work="${TMPDIR:-/tmp}/rampart-peers"
rm -rf "$work"
mkdir -p "$work"
# Zipf actors with injected abusive bursts (one per 1,000 events by default), and the truth
# file the decisions are scored against.
BURSTS="${BURSTS:-$((EVENTS / 1000))}"
python3 benchmarks/generate.py --events "$EVENTS" --actors 10000 --bursts "$BURSTS" \
  --truth "$work/truth.jsonl" --out "$work/input.jsonl"

PORT=$(free_port)
trap stop_background EXIT
start_tansu "$PORT" "$work/broker.log" bench.events
pin_helpers
BROKERS="127.0.0.1:$PORT"
helper "$LOAD" --brokers "$BROKERS" feed --topic bench.events --rate 200000 "$work/input.jsonl" >&2

echo "== Rampart replay of the same file (reference)" >&2
replay=$(pinned "$RAMPART" replay benchmarks/pipelines/w2 --input "$work/input.jsonl" --output "$work/rampart-replay-decisions.jsonl" --dead-letters /dev/null 2>&1)
replay_rate=$(rate_of "$replay")

echo "== Rampart: rampart run benchmarks/pipelines/w2 on the topic" >&2
export RAMPART_KAFKA_LINGER_MS=10 RAMPART_KAFKA_FETCH_WAIT_MAX_MS=25
RAMPART_LOG=info pinned "$RAMPART" run benchmarks/pipelines/w2 --brokers "$BROKERS" --listen "127.0.0.1:$(free_port)" \
  --state "$work/rampart-state" --audit "$work/rampart-audit.log" --until-idle 3s 2>"$work/rampart.log"
rampart_rate=$(python3 - "$work/rampart.log" "$EVENTS" <<'PY'
import re, sys, datetime
# From the first message to the last: the log's "first message consumed" .. "no message for the idle period" (3 s later).
text = open(sys.argv[1]).read()
ts = lambda line: datetime.datetime.fromisoformat(re.sub(r"\x1b\[[0-9;]*m", "", line).split()[0].replace("Z", "+00:00"))
lines = [l for l in text.splitlines() if re.search(r"\d{4}-\d\d-\d\dT", l)]
start = next(ts(l) for l in lines if "first message consumed" in l)
end = next(ts(l) for l in lines if "no message for the idle period" in l)
print(round(int(sys.argv[2]) / max((end - start).total_seconds() - 3.0, 1e-3)))
PY
)
"$LOAD" --brokers "$BROKERS" tail --topic bench.decisions --idle 3 >"$work/rampart-decisions.jsonl"

echo "== Quix Streams $QUIX_VERSION: benchmarks/peers/quix_w2.py on the topic" >&2
quix=$(pinned "$VENV/bin/python" benchmarks/peers/quix_w2.py --brokers "$BROKERS" --input bench.events \
  --decisions quix.decisions --events "$EVENTS" 2>"$work/quix.log" | tail -n 1)
quix_rate=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["events_per_second"])' "$quix")
"$LOAD" --brokers "$BROKERS" tail --topic quix.decisions --idle 3 >"$work/quix-decisions.jsonl"

# Detections are compared with Rampart's replay of the same file: at the end of a replay the
# input is complete and every window row is decided, while the service (whose input never
# ends) keeps the rows of the last allowed-lateness (10 s) of event time waiting for later
# events.
comparison=$(python3 benchmarks/score.py --truth "$work/truth.jsonl" \
  "Rampart=$work/rampart-replay-decisions.jsonl" "Quix Streams=$work/quix-decisions.jsonl")
ratio=$(python3 -c "print(f'{$rampart_rate / max($quix_rate, 1):.0f}')")
out="benchmarks/results/peers-$(date +%F).md"
{
  echo "# W2 through Kafka: Rampart and Quix Streams ($(date +%F))"
  echo
  machine_line
  pinning_line
  echo "Broker: Tansu 0.6.0 (in-memory) on loopback, the same for both, one system at a time."
  echo "Input: \`benchmarks/generate.py --events $EVENTS --actors 10000 --bursts $BURSTS\` (Zipf actors, $BURSTS injected bursts alternating denied reconnaissance and mass secret reads, each by a new actor), pre-loaded into one partition."
  echo "Command: \`EVENTS=$EVENTS benchmarks/peers.sh\`. Quix Streams $QUIX_VERSION (Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'))."
  echo
  echo "| system | events/s (first to last input message) |"
  echo "| --- | --- |"
  echo "| Rampart \`rampart run\` (8 detectors, 5 windowed) | $rampart_rate |"
  echo "| Quix Streams (the same 8 detectors, 5 sliding windows) | $quix_rate |"
  echo "| ratio | ${ratio}x |"
  echo "| (Rampart replay of the same file, no broker) | $replay_rate |"
  echo
  echo "Detections: distinct (detector, key) pairs each system published (Rampart once per block or dedup period, Quix every match); Rampart's are from the replay of the same file, where the input ends and every window row is decided (the service keeps the rows of the last 10 s of event time, the allowed lateness, waiting for later events: $(python3 -c 'import sys; print(sum(1 for _ in open(sys.argv[1])))' "$work/rampart-decisions.jsonl") decisions on the topic):"
  echo
  echo "$comparison"
  echo
  echo "Precision and recall are against the injected bursts: recall is the share of bursts the system alerted on; precision the share of keys it alerted on that are burst actors (keys of the background traffic that cross the same threshold count against it, equally for every system)."
} >"$out"
cat "$out"
