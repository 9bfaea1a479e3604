#!/usr/bin/env bash
# Workload W4: W2's window state as distinct actors grow. For each count in ACTORS, a generated
# log in which every event has a new actor (round robin, 5,000 events per second of event time)
# is replayed through W2 with a persistent state: size on disk after compaction, peak resident
# memory of the replay, its events/s. Writes benchmarks/results/state-DATE.md.
#
#   benchmarks/state.sh                          # 1M and 5M actors (about 15 minutes, 8 GB of inputs)
#   ACTORS="1000000 5000000 10000000" benchmarks/state.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source benchmarks/common.sh
ACTORS="${ACTORS:-1000000 5000000}"
BENCH="$HOME/.cache/rampart/bench"
cargo build --release --workspace --all-targets >&2
rows=()
for n in $ACTORS; do
  input="$BENCH/cloudtrail-rr-$n.jsonl"
  generated "$input" --events "$n" --actors "$n" --round-robin --rate 5000
  state_dir="$BENCH/w4-state"
  rm -rf "$state_dir"
  summary=$( { /usr/bin/time -v "$RAMPART" replay benchmarks/pipelines/w2 --state "$state_dir" --state-stats \
    --input "$input" --output /dev/null --dead-letters /dev/null >/dev/null; } 2>&1 )
  rss_kb=$(sed -n 's/.*Maximum resident set size (kbytes): //p' <<<"$summary")
  disk_mb=$(du -sm "$state_dir" | cut -f1)
  rate=$(rate_of "$summary")
  rows+=("| $n | $disk_mb MB ($((disk_mb * 1000000 / n)) MB per million) | $((rss_kb / 1024)) MiB | $rate |")
  echo "W4 at $n actors: $disk_mb MB on disk, $((rss_kb / 1024)) MiB peak RSS, $rate events/s" >&2
  rm -rf "$state_dir"
done
out="benchmarks/results/state-$(date +%F).md"
{
  echo "# W4: W2 window state by distinct actors ($(date +%F))"
  echo
  machine_line
  echo "Input: \`benchmarks/generate.py --events N --actors N --round-robin --rate 5000\` (every event a new actor). Command: \`ACTORS=\"$ACTORS\" benchmarks/state.sh\`. One run each."
  echo
  echo "| distinct actors | state on disk (compacted) | peak RSS of the replay | events/s |"
  echo "| --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Targets (benchmark issue): at most 200 MB on disk and 256 MiB resident per million active actors."
} >"$out"
cat "$out"
