#!/usr/bin/env bash
# Replay throughput of the cloudtrail pipeline (17 per-event + 6 threshold detectors) over a generated
# CloudTrail-shaped log: median of RUNS runs, written to benchmarks/results/replay-DATE.md.
#
#   benchmarks/replay.sh                 # 1M events, 5 runs
#   EVENTS=200000 RUNS=3 benchmarks/replay.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source benchmarks/common.sh
EVENTS="${EVENTS:-1000000}"
RUNS="${RUNS:-5}"
INPUT="${INPUT:-$HOME/.cache/rampart/bench/cloudtrail-$EVENTS.jsonl}"
mkdir -p benchmarks/results
generated "$INPUT" --events "$EVENTS"
cargo build --release --workspace --all-targets >&2
rates=()
for i in $(seq "$RUNS"); do
  summary=$(pinned "$RAMPART" replay pipelines/cloudtrail --input "$INPUT" --output /dev/null --dead-letters /dev/null 2>&1 >/dev/null)
  rate=$(rate_of "$summary")
  decisions=$(sed -n 's/^decisions: *\([0-9]*\)/\1/p' <<<"$summary")
  echo "run $i: $rate events/s, $decisions decisions" >&2
  rates+=("$rate")
done
median=$(median "${rates[@]}")
out="benchmarks/results/replay-$(date -u +%Y-%m-%d).md"
{
  echo "# Replay throughput, $(date -u +%Y-%m-%d)"
  echo
  machine_line
  pinning_line
  echo "Input: \`benchmarks/generate.py --events $EVENTS\` (CloudTrail-shaped JSON lines, $(du -h "$INPUT" | cut -f1))."
  echo "Command: \`EVENTS=$EVENTS RUNS=$RUNS benchmarks/replay.sh\`"
  echo
  echo "| pipeline | detectors | events | runs (events/s) | median events/s |"
  echo "| --- | --- | --- | --- | --- |"
  echo "| cloudtrail | 17 per-event + 6 sliding windows | $EVENTS | ${rates[*]} | **$median** |"
  echo
  echo "Last run's summary:"
  echo
  echo '```'
  echo "$summary"
  echo '```'
} > "$out"
echo "median: $median events/s -> $out" >&2
