#!/usr/bin/env bash
# Where the time goes, for the targets the suite misses: CPU profiles (perf, DWARF call graphs)
# of Rampart on W2 replay, W3 with 64 detectors, W4 (every event a new actor) and the service
# at a fixed rate through Kafka, each written as a flamegraph (SVG, by inferno) and a table of
# the top symbols by self time into benchmarks/results/profile-DATE.md.
#
#   benchmarks/profile.sh                 # about 10 minutes
#   SECONDS_EACH=10 benchmarks/profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source benchmarks/common.sh
SECONDS_EACH="${SECONDS_EACH:-15}"
BENCH="$HOME/.cache/rampart/bench"
DATE=$(date +%F)
RESULTS=benchmarks/results
command -v perf >/dev/null || { echo "profile.sh needs perf (Debian: apt-get install linux-perf)" >&2; exit 1; }
command -v inferno-flamegraph >/dev/null || cargo install --quiet --locked inferno
cargo build --release --workspace --all-targets >&2
generated "$BENCH/cloudtrail-1000000.jsonl" --events 1000000
work="${TMPDIR:-/tmp}/rampart-profile"
rm -rf "$work"
mkdir -p "$work"

sections=()
# profile NAME TITLE COMMAND...: runs COMMAND under perf for at most SECONDS_EACH seconds.
profile() {
  local name=$1 title=$2
  shift 2
  echo "== profile $name: $*" >&2
  timeout --signal=INT "$((SECONDS_EACH + 5))" perf record -F 199 --call-graph dwarf,16384 -o "$work/$name.data" \
    -- timeout --signal=INT "$SECONDS_EACH" "$@" >/dev/null 2>"$work/$name.log" || true
  summarize "$name" "$title" "$*"
}

# summarize NAME TITLE COMMAND: the flamegraph and top-symbols section of a recorded profile.
summarize() {
  local name=$1 title=$2 command=$3 svg="$RESULTS/flamegraph-$1-$DATE.svg"
  # (--no-inline: resolving inlined frames takes minutes per profile on this binary.)
  perf script --no-inline -i "$work/$name.data" 2>/dev/null | inferno-collapse-perf >"$work/$name.folded"
  inferno-flamegraph --title "$title" --width 1600 <"$work/$name.folded" >"$svg"
  local top
  top=$(perf report -i "$work/$name.data" --no-inline -g none --no-children --sort comm,dso,symbol --percent-limit 1 --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | sed -n '1,25p' | sed -e 's/ *- *- *$//' -e 's/ \+/ /g')
  sections+=("## $title

\`$command\`

Flamegraph: [\`$(basename "$svg")\`]($(basename "$svg")). Top symbols by self time (thread, library, symbol):

\`\`\`
$top
\`\`\`
")
}

profile w2-replay "W2 replay (8 detectors, 5 windows), Zipf actors" \
  "$RAMPART" replay benchmarks/pipelines/w2 --input "$BENCH/cloudtrail-1000000.jsonl" --output /dev/null --dead-letters /dev/null
profile w3-64 "W3 with 64 detectors (59 windows)" \
  "$RAMPART" replay "$(w3_pipeline "$work/w3-64" 64)" --input "$BENCH/cloudtrail-1000000.jsonl" --output /dev/null --dead-letters /dev/null
python3 benchmarks/generate.py --events 300000 --actors 300000 --round-robin --rate 5000 --out "$work/rr.jsonl"
profile w4 "W4: every event a new actor (300k actors), persistent state" \
  "$RAMPART" replay benchmarks/pipelines/w2 --state "$work/w4-state" --input "$work/rr.jsonl" --output /dev/null --dead-letters /dev/null
# The service at 30k events/s through Kafka (latency.sh records the profile while its load runs).
RATES=30000 DURATION="$SECONDS_EACH" SKIP_PASSTHROUGH=1 PERF_OUT="$work/service.data" PERF_CALL_GRAPH=dwarf,16384 \
  benchmarks/latency.sh >"$work/service.log" 2>&1 || true
summarize service "W2 service (rampart run) at 30k events/s through Kafka" "RATES=30000 SKIP_PASSTHROUGH=1 PERF_OUT=... benchmarks/latency.sh"

{
  echo "# Profiles ($DATE)"
  echo
  machine_line
  echo "perf $(perf --version | awk '{print $3}'), \`perf record -F 199 --call-graph dwarf,16384\`, release build with line tables; flamegraphs by inferno $(cargo install --list | sed -n 's/^inferno v\([0-9.]*\):/\1/p'). Command: \`benchmarks/profile.sh\`."
  echo
  printf '%s\n' "${sections[@]}"
} >"$RESULTS/profile-$DATE.md"
echo "wrote $RESULTS/profile-$DATE.md" >&2
