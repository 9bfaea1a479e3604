#!/usr/bin/env bash
# The service draining a backlog, beside replay of the same events: `rampart run --until-end`
# on W2 over a topic that already holds EVENTS events, against `rampart replay` of the same
# file, RUNS times each (alternating), median of each.
#
#   benchmarks/drain.sh                               # 500k events, 3 runs
#   EVENTS=300000 RUNS=5 benchmarks/drain.sh
#   BEFORE=/tmp/rampart-old benchmarks/drain.sh       # also the build BEFORE, in the same runs
#   SUT_CPUS=1 BROKER_CPUS=0 benchmarks/drain.sh      # the broker on a core of its own
#
# Input: the first EVENTS events of the generated 1M CloudTrail-shaped log, fed to a 1-partition
# topic of Tansu 0.6 (in memory, loopback, same 2 cores). Each drain starts on a fresh state
# directory in a new consumer group. Two service figures: the whole process (start, joining the
# group, which Tansu holds for its initial rebalance delay of 3 s, the drain, the quiet period
# that makes the last rows certain, the final checkpoint), and the drain alone (from the first
# message consumed to the process stopping, from its log). Writes
# benchmarks/results/drain-DATE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/common.sh
./scripts/setup.sh
source scripts/env.sh
EVENTS="${EVENTS:-500000}"
RUNS="${RUNS:-3}"
INPUT=$(prefix_input "$EVENTS")
cargo build --release --workspace --all-targets >&2
LOAD="$CARGO_TARGET_DIR/release/rampart-load"
work="${TMPDIR:-/tmp}/rampart-drain"
rm -rf "$work"
mkdir -p "$work"

port=$(free_port)
BROKERS="127.0.0.1:$port"
trap stop_background EXIT
start_tansu "$port" "$work/broker.log" bench.events
pin_helpers
helper "$LOAD" --brokers "$BROKERS" --set linger.ms=50 --set batch.num.messages=10000 feed --topic bench.events "$INPUT"

# seconds_between LOG FIRST LAST: seconds between the log lines matching FIRST and LAST.
seconds_between() {
  python3 - "$@" <<'PY'
import re, sys
from datetime import datetime
log, first, last = sys.argv[1:]
def at(pattern):
    for line in open(log):
        if pattern in line:
            return datetime.fromisoformat(re.match(r"\S+", line).group(0).replace("Z", "+00:00"))
    sys.exit(f"{log}: no line with {pattern!r}")
print(f"{(at(last) - at(first)).total_seconds():.3f}")
PY
}

# replay_rate BINARY: events/s of one W2 replay of the input.
replay_rate() {
  rate_of "$(pinned "$1" replay benchmarks/pipelines/w2 --input "$INPUT" --output /dev/null --dead-letters /dev/null 2>&1)"
}

# drain BINARY NAME: drains the topic with BINARY in a new group; prints "whole drain" seconds.
drain() {
  local dir t0 t1
  dir=$(w2_in_group "$work/$2" "$2")
  rm -rf "$work/$2.state"
  t0=$(date +%s.%N)
  RAMPART_LOG=info pinned "$1" run "$dir" --brokers "$BROKERS" --listen "127.0.0.1:$(free_port)" \
    --state "$work/$2.state" --until-end 2>"$work/$2.log"
  t1=$(date +%s.%N)
  grep -q "^stopped: $EVENTS events," "$work/$2.log" || { tail "$work/$2.log" >&2; exit 1; }
  echo "$(python3 -c "print(f'{$t1 - $t0:.3f}')") $(seconds_between "$work/$2.log" "first message consumed" "stopped cleanly")"
}

builds=(after)
declare -A binary=([after]="$RAMPART")
if [ -n "${BEFORE:-}" ]; then
  builds=(before after)
  binary[before]="$BEFORE"
fi
declare -A replays wholes drains
for i in $(seq "$RUNS"); do
  for b in "${builds[@]}"; do
    r=$(replay_rate "${binary[$b]}")
    read -r whole alone < <(drain "${binary[$b]}" "drain-$b-$i")
    echo "run $i, $b: replay $r events/s; drain $whole s whole, $alone s from the first message" >&2
    replays[$b]+="$r "
    wholes[$b]+="$whole "
    drains[$b]+="$alone "
  done
done

out="benchmarks/results/drain-$(date -u +%F).md"
{
  echo "# The service draining a backlog, beside replay ($(date -u +%F))"
  echo
  echo "| build | replay, events/s | \`run --until-end\`, whole process | drain from the first message | drain rate / replay rate |"
  echo "|---|---:|---:|---:|---:|"
  for b in "${builds[@]}"; do
    # shellcheck disable=SC2086
    python3 - "$b" "$EVENTS" "$(median ${replays[$b]})" "$(median ${wholes[$b]})" "$(median ${drains[$b]})" <<'PY'
import sys
build, events, replay, whole, alone = sys.argv[1], *map(float, sys.argv[2:])
print(f"| {build} | {replay:,.0f} | {whole:.2f} s ({events / whole:,.0f} events/s) | "
      f"{alone:.2f} s ({events / alone:,.0f} events/s) | {events / alone / replay:.2f} |")
PY
  done
  echo
  machine_line
  pinning_line
  echo "Broker: Tansu 0.6.0 (in-memory), loopback, a 1-partition input topic holding $EVENTS W2 events (\`prefix_input\`). Pipeline: W2 (5 windows, 3 per-event detectors), fresh state each run."
  echo "Command: \`EVENTS=$EVENTS RUNS=$RUNS${BEFORE:+ BEFORE=...} benchmarks/drain.sh\`; medians of $RUNS runs, the builds alternating."
  for b in "${builds[@]}"; do
    echo "Runs, $b: replay ${replays[$b]}events/s; whole process ${wholes[$b]}s; drain ${drains[$b]}s."
  done
} >"$out"
cat "$out"
echo "wrote $out" >&2
