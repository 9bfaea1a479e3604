#!/usr/bin/env bash
# Windowed detectors: workload W2 (benchmarks/pipelines/w2: 3 per-event + 5 sliding-window
# detectors, counts, sums and distinct counts per actor and per source IP) over generated
# CloudTrail-shaped events with Zipf-distributed actors. Reports, in one run:
#   1. replay events/s with the keyed incremental evaluator (median of RUNS runs, EVENTS events);
#   2. the same workload through the naive evaluator (re-runs each window's SQL over all kept
#      rows every batch) and the keyed one on the first NAIVE_EVENTS events, as a ratio;
#   3. window state at 1M distinct actors: size on disk (RocksDB, compacted) and peak resident
#      memory of the replay, keys held in memory.
# Writes benchmarks/results/windows-DATE.md.
#
#   benchmarks/windows.sh
#   EVENTS=200000 RUNS=3 NAIVE_EVENTS=20000 benchmarks/windows.sh   # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source benchmarks/common.sh
EVENTS="${EVENTS:-1000000}"
RUNS="${RUNS:-5}"
NAIVE_EVENTS="${NAIVE_EVENTS:-50000}"
STATE_ACTORS="${STATE_ACTORS:-1000000}"
BENCH="$HOME/.cache/rampart/bench"
INPUT="$BENCH/cloudtrail-$EVENTS.jsonl"
STATE_INPUT="$BENCH/cloudtrail-rr-$STATE_ACTORS.jsonl"
PIPELINE=benchmarks/pipelines/w2
mkdir -p benchmarks/results
generated "$INPUT" --events "$EVENTS"
generated "$STATE_INPUT" --events "$STATE_ACTORS" --actors "$STATE_ACTORS" --round-robin --rate 5000
cargo build --release --workspace --all-targets >&2

# 1. Throughput, keyed evaluator.
rates=()
for i in $(seq "$RUNS"); do
  summary=$(pinned "$RAMPART" replay "$PIPELINE" --input "$INPUT" --output /dev/null --dead-letters /dev/null 2>&1 >/dev/null)
  rates+=("$(rate_of "$summary")")
  echo "keyed run $i: ${rates[-1]} events/s" >&2
done
keyed=$(median "${rates[@]}")
keyed_summary="$summary"

# 2. Naive against keyed on a prefix (the naive evaluator is too slow for the whole log).
prefix="$BENCH/w2-prefix-$NAIVE_EVENTS.jsonl"
head -n "$NAIVE_EVENTS" "$INPUT" > "$prefix"
naive_rates=(); keyed_prefix_rates=()
for i in $(seq 3); do
  s=$(pinned "$RAMPART" replay "$PIPELINE" --evaluator naive --input "$prefix" --output "$BENCH/naive.jsonl" --dead-letters /dev/null 2>&1 >/dev/null)
  naive_rates+=("$(rate_of "$s")")
  s=$(pinned "$RAMPART" replay "$PIPELINE" --input "$prefix" --output "$BENCH/keyed.jsonl" --dead-letters /dev/null 2>&1 >/dev/null)
  keyed_prefix_rates+=("$(rate_of "$s")")
  echo "prefix run $i: naive ${naive_rates[-1]}, keyed ${keyed_prefix_rates[-1]} events/s" >&2
done
naive=$(median "${naive_rates[@]}")
keyed_prefix=$(median "${keyed_prefix_rates[@]}")
same=$(python3 - "$BENCH/naive.jsonl" "$BENCH/keyed.jsonl" <<'PY'
import json, sys
def ids(p):
    return sorted(json.loads(l)["decision_id"] for l in open(p))
a, b = ids(sys.argv[1]), ids(sys.argv[2])
print(f"identical ({len(a)} decisions)" if a == b else f"DIFFERENT ({len(a)} vs {len(b)})")
PY
)
ratio=$(awk -v k="$keyed_prefix" -v n="$naive" 'BEGIN {printf "%.1f", k / n}')

# 3. State at 1M distinct actors (persistent state, compacted before measuring).
state_dir="$BENCH/w2-state"
rm -rf "$state_dir"
state_summary=$( { /usr/bin/time -v taskset -c "$SUT_CPUS" "$RAMPART" replay "$PIPELINE" --state "$state_dir" --state-stats \
  --input "$STATE_INPUT" --output /dev/null --dead-letters /dev/null >/dev/null; } 2>&1 )
state_line=$(grep '^window state:' <<<"$state_summary")
rss_kb=$(sed -n 's/.*Maximum resident set size (kbytes): //p' <<<"$state_summary")
state_rate=$(rate_of "$state_summary")
disk_mb=$(du -sm "$state_dir" | cut -f1)

out="benchmarks/results/windows-$(date -u +%Y-%m-%d).md"
{
  echo "# Windowed detectors (W2), $(date -u +%Y-%m-%d)"
  echo
  machine_line
  pinning_line
  echo "Workload: \`$PIPELINE\` (3 per-event, 5 sliding windows: API calls per actor over 1 min, failed calls per actor over 15 min (sum), distinct APIs per source IP over 10 min, denied reconnaissance per actor over 10 min, distinct secrets per actor over 1 h)."
  echo "Input: \`benchmarks/generate.py --events $EVENTS\` (10 000 Zipf(1.1) actors, 1000 events/s of event time, $(du -h "$INPUT" | cut -f1))."
  echo "Command: \`EVENTS=$EVENTS RUNS=$RUNS NAIVE_EVENTS=$NAIVE_EVENTS benchmarks/windows.sh\`"
  echo
  echo "| measure | result | target |"
  echo "| --- | --- | --- |"
  echo "| replay, keyed evaluator, $EVENTS events (runs: ${rates[*]}) | **$keyed events/s** | 500 000 events/s |"
  echo "| first $NAIVE_EVENTS events: keyed / naive evaluator | $keyed_prefix / $naive events/s = **${ratio}x**; decisions $same | |"
  echo "| state at $STATE_ACTORS distinct actors, on disk (RocksDB, compacted) | **$disk_mb MB** | 200 MB |"
  echo "| state at $STATE_ACTORS distinct actors, peak resident memory of the whole replay | **$((rss_kb / 1024)) MiB** | 256 MiB (state) |"
  echo "| same run: $state_line; $state_rate events/s | | |"
  echo
  echo "Last keyed run's summary:"
  echo
  echo '```'
  echo "$keyed_summary"
  echo '```'
} > "$out"
cat "$out"
