#!/usr/bin/env bash
# Workload W4: W2's window state as distinct actors grow. For each count in ACTORS, a generated
# log in which every event has a new actor (round robin, 5,000 events per second of event time)
# is replayed through W2 with a persistent state: size on disk after compaction, peak resident
# memory of the replay (and, as a baseline, of the same input through W1's per-event detectors
# alone), its events/s. Writes benchmarks/results/state-DATE.md.
#
#   benchmarks/state.sh                          # 1M, 5M and 10M actors (about an hour, 8 GB of inputs)
#   ACTORS=1000000 benchmarks/state.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source benchmarks/common.sh
ACTORS="${ACTORS:-1000000 5000000 10000000}"
BENCH="$HOME/.cache/rampart/bench"
cargo build --release --workspace --all-targets >&2
# Above 5M actors the input (1.3 GB per million) is not kept: the generator streams it into
# the replay (it takes about a third of a core, which the replay's events/s then lacks).
replay_rss() { # PIPELINE N STATE_DIR -> the replay's summary and /usr/bin/time -v report
  local pipeline=$1 n=$2 state=$3 input="$BENCH/cloudtrail-rr-$n.jsonl"
  local args=(--events "$n" --actors "$n" --round-robin --rate 5000)
  if [ "$n" -le 5000000 ]; then
    generated "$input" "${args[@]}"
    /usr/bin/time -v taskset -c "$SUT_CPUS" "$RAMPART" replay "$pipeline" --state "$state" --state-stats \
      --input "$input" --output /dev/null --dead-letters /dev/null 2>&1 >/dev/null
  else
    python3 benchmarks/generate.py "${args[@]}" --out /dev/stdout |
      /usr/bin/time -v taskset -c "$SUT_CPUS" "$RAMPART" replay "$pipeline" --state "$state" --state-stats \
        --input - --output /dev/null --dead-letters /dev/null 2>&1 >/dev/null
  fi
}
rss_mib() { echo $(($(sed -n 's/.*Maximum resident set size (kbytes): //p' <<<"$1") / 1024)); }
rows=()
for n in $ACTORS; do
  state_dir="$BENCH/w4-state"
  rm -rf "$state_dir"
  summary=$(replay_rss benchmarks/pipelines/w2 "$n" "$state_dir")
  disk_mb=$(du -sm "$state_dir" | cut -f1)
  rm -rf "$state_dir"
  # The same input through the per-event detectors alone (W1): what the replay holds besides
  # the window state (input buffers in flight, decoded batches, DataFusion).
  baseline=$(replay_rss benchmarks/pipelines/w1 "$n" "$state_dir")
  rm -rf "$state_dir"
  rss=$(rss_mib "$summary")
  base=$(rss_mib "$baseline")
  rate=$(rate_of "$summary")
  rows+=("| $n | $disk_mb MB ($((disk_mb * 1000000 / n)) MB per million) | $rss MiB | $base MiB | **$((rss - base)) MiB** | $rate |")
  echo "W4 at $n actors: $disk_mb MB on disk, $rss MiB peak RSS ($base MiB without windows), $rate events/s" >&2
done
out="benchmarks/results/state-$(date +%F).md"
{
  echo "# W4: W2 window state by distinct actors ($(date +%F))"
  echo
  machine_line
  pinning_line
  echo "Input: \`benchmarks/generate.py --events N --actors N --round-robin --rate 5000\` (every event a new actor). Command: \`ACTORS=\"$ACTORS\" benchmarks/state.sh\`. One run each."
  echo
  echo "| distinct actors | state on disk (compacted) | peak RSS of the W2 replay | of the W1 replay (no windows) | the window state's share | W2 events/s |"
  echo "| --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
  echo
  echo "The window state's share of memory is the W2 replay's peak RSS minus the W1 replay's (the same input through the per-event detectors alone). It is bounded by \`state.cache_mb\` (default 256 MiB of hot keys) plus RocksDB's memtables and block cache, whatever the number of actors."
  echo
  echo "Targets (benchmark issue): at most 200 MB on disk and 256 MiB resident per million active actors."
} >"$out"
cat "$out"
