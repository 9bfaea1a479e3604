#!/usr/bin/env bash
# The benchmark suite in one command: replay (cloudtrail pipeline), windows (W2 keyed and naive,
# state at 1M actors), scaling (W1, W3), state (W4: 1M, 5M and 10M actors), latency (W2 through Kafka beside a broker-only
# passthrough), peers (W2 in Quix Streams on the same topic) and profiles (perf flamegraphs of
# the missed targets), one after the other on this
# machine; then benchmarks/report.py writes benchmarks/results/<date>.md with the machine,
# versions, commands, a summary against the targets, and charts (SVG).
#
#   benchmarks/run.sh --quick                 # smaller inputs, 3 runs each: about 15 minutes
#   benchmarks/run.sh                         # the full suite, 5 runs each: about an hour
#   benchmarks/run.sh --quick replay scaling  # a chosen set
set -euo pipefail
cd "$(dirname "$0")/.."
quick=false
parts=()
for arg in "$@"; do
  case "$arg" in
    --quick) quick=true ;;
    replay | windows | scaling | state | latency | drain | peers | profile) parts+=("$arg") ;;
    *) echo "usage: benchmarks/run.sh [--quick] [replay|windows|scaling|state|latency|drain|peers|profile]..." >&2; exit 2 ;;
  esac
done
[ ${#parts[@]} -gt 0 ] || parts=(replay windows scaling state latency drain peers profile)
./scripts/setup.sh
source scripts/env.sh
started=$(date -u +%FT%TZ)
commands=()
run() {
  commands+=("$*")
  echo "== $*" >&2
  env "$@"
}
for part in "${parts[@]}"; do
  if $quick; then
    case "$part" in
      replay) run EVENTS=200000 RUNS=3 benchmarks/replay.sh ;;
      windows) run EVENTS=200000 RUNS=3 NAIVE_EVENTS=20000 benchmarks/windows.sh ;;
      scaling) run EVENTS=100000 RUNS=3 benchmarks/scaling.sh ;;
      state) run ACTORS=1000000 benchmarks/state.sh ;;
      latency) run RATES=10000,50000 DURATION=10 benchmarks/latency.sh ;;
      drain) run EVENTS=200000 RUNS=2 benchmarks/drain.sh ;;
      peers) run EVENTS=10000 benchmarks/peers.sh ;;
      profile) run SECONDS_EACH=8 benchmarks/profile.sh ;;
    esac
  else
    case "$part" in
      replay) run EVENTS=1000000 RUNS=5 benchmarks/replay.sh ;;
      windows) run EVENTS=1000000 RUNS=5 benchmarks/windows.sh ;;
      scaling) run EVENTS=200000 RUNS=5 benchmarks/scaling.sh ;;
      state) run "ACTORS=1000000 5000000 10000000" benchmarks/state.sh ;;
      latency) run benchmarks/latency.sh ;;
      drain) run EVENTS=500000 RUNS=3 benchmarks/drain.sh ;;
      peers) run EVENTS=20000 benchmarks/peers.sh ;;
      profile) run benchmarks/profile.sh ;;
    esac
  fi
done
VENV="$HOME/.cache/rampart/venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import matplotlib" 2>/dev/null || "$VENV/bin/pip" install -q "matplotlib==3.9.*"
printf '%s\n' "${commands[@]}" >"${TMPDIR:-/tmp}/rampart-bench-commands.txt"
"$VENV/bin/python" benchmarks/report.py --started "$started" --commands "${TMPDIR:-/tmp}/rampart-bench-commands.txt" \
  $($quick && echo --quick)
