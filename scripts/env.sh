# Sourced by the other scripts: one build cache outside the clone, shared by every checkout and
# by CI, so that rebuilds are incremental (a cold DataFusion build takes ~25 minutes here).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rampart/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# (Benchmarks may set RAMPART to another build, e.g. the commit before a change, for A/B runs.)
RAMPART="${RAMPART:-$CARGO_TARGET_DIR/release/rampart}"

# The Tansu broker scripts/setup.sh installs, for the demo and the latency benchmark.
TANSU="$HOME/.cache/rampart/bin/tansu"

# A free TCP port on loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Background processes to stop when the script exits (append their pids to `pids`).
pids=()
stop_background() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }

# start_tansu PORT LOG TOPIC...: starts Tansu (in-memory storage) on 127.0.0.1:PORT, logging to
# LOG, waits until it listens, and creates the topics (one partition each).
start_tansu() {
  local port=$1 log=$2 address="tcp://127.0.0.1:$1"
  shift 2
  "$TANSU" broker --listener-url "$address" --advertised-listener-url "$address" \
    --storage-engine memory://tansu/ >"$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  for topic in "$@"; do
    "$TANSU" topic create "$topic" --partitions 1 --broker "$address" >/dev/null
  done
}
