#!/usr/bin/env bash
# Workloads W1 and W3: replay throughput with per-event rules only (W1: the cloudtrail
# pipeline's 17 per-event detectors), and as detectors are added (W3: 1, 8, 32 and 64
# detectors; 1 is W2's per-actor API rate window, 8 is W2, 32 and 64 add variants of W2's five
# windows: the same key and window with a different final condition, as an analyst's
# candidate rules would be; they share their base's window state). 64 is measured a second
# time with distinct windows (each variant's frame a few seconds longer: its own frame and
# accumulators over the rows its base keeps), and a third time with each variant also reading
# the events through a filter of its own (distinct rows: nothing shared). And a
# realistic rule suite: 200 per-event detectors, the 17 shipped ones and variants of them naming
# other API calls (rules_pipeline in common.sh, benchmarks/rules.py).
# Same generated input as windows.sh. Median of RUNS runs each.
# Writes benchmarks/results/scaling-DATE.md.
#
#   benchmarks/scaling.sh
#   EVENTS=200000 RUNS=3 benchmarks/scaling.sh   # the default
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source benchmarks/common.sh
EVENTS="${EVENTS:-200000}"
RUNS="${RUNS:-3}"
INPUT=$(prefix_input "$EVENTS")
cargo build --release --workspace --all-targets >&2
work="${TMPDIR:-/tmp}/rampart-scaling"
rm -rf "$work"
mkdir -p "$work"

# pipeline N: a copy of W2 with N detectors (w3_pipeline in common.sh).
make_pipeline() { w3_pipeline "$work/w3-$1" "$1"; }

measure() {
  local dir=$1 rates=()
  "$RAMPART" check "$dir" >/dev/null
  for _ in $(seq "$RUNS"); do
    rates+=("$(rate_of "$(pinned "$RAMPART" replay "$dir" --input "$INPUT" --output /dev/null --dead-letters /dev/null 2>&1)")")
  done
  median "${rates[@]}"
}

declare -A rate
rate[w1]=$(measure benchmarks/pipelines/w1)
rate[rules]=$(measure "$(rules_pipeline "$work/rules-200" 200 "$INPUT")")
echo "200 per-event detectors: ${rate[rules]} events/s" >&2
for n in 1 8 32 64; do
  rate[$n]=$(measure "$(make_pipeline "$n")")
  echo "W3 with $n detectors: ${rate[$n]} events/s" >&2
done
rate[d64]=$(measure "$(w3_pipeline "$work/w3-distinct-64" 64 distinct)")
echo "W3 with 64 detectors, distinct windows: ${rate[d64]} events/s" >&2
rate[u64]=$(measure "$(w3_pipeline "$work/w3-unshared-64" 64 unshared)")
echo "W3 with 64 detectors, distinct windows over distinct rows: ${rate[u64]} events/s" >&2
share=$(python3 -c "print(f'{100 * ${rate[64]} / ${rate[8]}:.0f}')")
distinct=$(python3 -c "print(f'{100 * ${rate[d64]} / ${rate[8]}:.1f}')")
unshared=$(python3 -c "print(f'{100 * ${rate[u64]} / ${rate[8]}:.1f}')")
out="benchmarks/results/scaling-$(date +%F).md"
{
  echo "# W1 and W3: replay throughput by detector count ($(date +%F))"
  echo
  machine_line
  pinning_line
  echo "Input: the first $EVENTS events of \`benchmarks/generate.py --events 1000000\` (10k Zipf actors). Median of $RUNS runs. Command: \`EVENTS=$EVENTS RUNS=$RUNS benchmarks/scaling.sh\`."
  echo
  echo "| workload | detectors | events/s |"
  echo "| --- | --- | --- |"
  echo "| W1 | 17 per-event | ${rate[w1]} |"
  echo "| rule suite | 200 per-event (\`benchmarks/rules.py\`) | ${rate[rules]} |"
  for n in 1 8 32 64; do
    echo "| W3 | $n | ${rate[$n]} |"
  done
  echo "| W3 distinct windows | 64 | ${rate[d64]} |"
  echo "| W3 distinct windows over distinct rows | 64 | ${rate[u64]} |"
  echo
  echo "64 detectors run at **${share}%** of the throughput of 8 (target: at least 40%): the 56 added"
  echo "detectors are thresholds on W2's five windows and share their state. With 64 distinct windows"
  echo "(each its own frame and accumulators; the rows kept once per base window), **${distinct}%**; when"
  echo "each also reads the events through a filter of its own (nothing shared), **${unshared}%**. The suite"
  echo "of 200 per-event detectors: ${rate[rules]} events/s (target: at least 150,000)."
} >"$out"
cat "$out"
