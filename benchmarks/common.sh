# Sourced by the benchmark scripts.

# The events/s figure of a `rampart replay` summary.
rate_of() { sed -n 's/.*(\([0-9]*\) events\/s).*/\1/p' <<<"$1"; }

# The median of its arguments (numbers).
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# One line for a result file: CPU model, cores, memory, build.
machine_line() {
  local cpu mem
  cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
  mem=$(free -g | awk '/Mem:/ {print $2 " GiB"}')
  echo "Machine: $cpu, $(nproc) cores, $mem. Build: release (\`cargo build --release --workspace --all-targets\`)."
}

# generated FILE ARGS...: makes FILE with benchmarks/generate.py ARGS unless it already exists
# (generated inputs are cached in ~/.cache/rampart/bench and reused across runs).
generated() {
  local file=$1
  shift
  mkdir -p "$(dirname "$file")"
  [ -s "$file" ] || python3 benchmarks/generate.py "$@" --out "$file"
}

# prefix_input N: the path of the first N events of the generated 1M-event CloudTrail log
# (both made and cached in ~/.cache/rampart/bench on first use).
prefix_input() {
  local bench="$HOME/.cache/rampart/bench" input
  generated "$bench/cloudtrail-1000000.jsonl" --events 1000000
  input="$bench/cloudtrail-prefix-$1.jsonl"
  [ -s "$input" ] || head -n "$1" "$bench/cloudtrail-1000000.jsonl" >"$input"
  echo "$input"
}

# The cores every system under test runs on (`taskset -c` list; default: all of them). Every
# system in a comparison (Rampart, the naive evaluator, Quix Streams, the passthrough) is started
# with `pinned`, so each gets the same cores; the broker and the load generator are not pinned
# unless BROKER_CPUS is set (e.g. SUT_CPUS=1 BROKER_CPUS=0 keeps them off the system's core).
SUT_CPUS="${SUT_CPUS:-0-$(($(nproc) - 1))}"
# (Background processes whose pid is needed: `taskset -c "$SUT_CPUS" CMD &` directly, since a
# function run in the background is a subshell with its own pid.)
pinned() { taskset -c "$SUT_CPUS" "$@"; }
# The broker and load generator: on BROKER_CPUS when set.
helper() { if [ -n "${BROKER_CPUS:-}" ]; then taskset -c "$BROKER_CPUS" "$@"; else "$@"; fi; }
pinning_line() {
  echo "CPU pinning: systems under test on CPUs $SUT_CPUS (\`taskset -c\`)${BROKER_CPUS:+, broker and load generator on CPUs $BROKER_CPUS}."
}
# Moves the background processes started so far (the broker) to BROKER_CPUS, when set.
pin_helpers() {
  [ -n "${BROKER_CPUS:-}" ] || return 0
  local p
  for p in "${pids[@]}"; do taskset -apc "$BROKER_CPUS" "$p" >/dev/null; done
}

# w3_pipeline DIR N [MODE]: makes DIR a copy of W2 with N detectors (1: W2's per-actor API rate
# window alone; 32 and 64 add variants of W2's five windows); prints DIR. MODE `shared` (the
# default): a variant has its base's key and window with a different final condition, as an
# analyst's candidate thresholds would be (they share the base's window state). MODE `distinct`:
# each variant's frame is also i seconds longer, so every detector has its own window (its own
# frame and accumulators; the rows, the same as its base's, are kept once: one state per base).
# MODE `unshared`: as `distinct`, and each variant also reads events through a filter of its own
# that every event passes (a time bound i seconds after 2000-01-01), so no two keep the same rows.
w3_pipeline() {
  local dir=$1 n=$2 mode=${3:-shared}
  mkdir -p "$dir/detectors"
  cp benchmarks/pipelines/w2/pipeline.toml "$dir/"
  if [ "$n" = 1 ]; then
    cp -L benchmarks/pipelines/w2/detectors/api-rate-per-actor.sql "$dir/detectors/"
    echo "$dir"
    return
  fi
  cp -L benchmarks/pipelines/w2/detectors/*.sql "$dir/detectors/"
  local windows=(actions-per-origin api-rate-per-actor failure-volume-per-actor recon-denied-calls secrets-mass-read)
  for ((i = 1; i <= n - 8; i++)); do
    local base=${windows[$(((i - 1) % 5))]} frame=()
    if [ "$mode" != shared ]; then
      local length seconds
      length=$(grep -o "INTERVAL '[^']*' PRECEDING" "$dir/detectors/$base.sql" | cut -d"'" -f2)
      case "$length" in
        *minute*) seconds=$((${length%% *} * 60)) ;;
        *hour*) seconds=$((${length%% *} * 3600)) ;;
        *) echo "w3_pipeline: unknown frame length '$length' in $base" >&2; return 1 ;;
      esac
      frame=(-e "s/INTERVAL '$length' PRECEDING/INTERVAL '$((seconds + i)) seconds' PRECEDING/")
    fi
    if [ "$mode" = unshared ]; then
      frame+=(-e "s/FROM events\b/FROM (SELECT * FROM events WHERE event_time > TIMESTAMP '2000-01-01T00:00:00Z' + INTERVAL '$i seconds')/")
    fi
    sed -e "s/^-- id: $base\$/-- id: $base-v$i/" -e "\$s/\$/ AND $i > 0/" "${frame[@]}" \
      "$dir/detectors/$base.sql" >"$dir/detectors/$base-v$i.sql"
  done
  echo "$dir"
}

# rules_pipeline DIR N INPUT: makes DIR a copy of W1 with N per-event detectors, the 17 shipped
# ones and variants of them naming other API calls of INPUT (benchmarks/rules.py); prints DIR.
rules_pipeline() {
  local dir=$1 n=$2 input=$3
  rm -rf "$dir"
  mkdir -p "$dir"
  cp benchmarks/pipelines/w1/pipeline.toml "$dir/"
  python3 benchmarks/rules.py --detectors benchmarks/pipelines/w1/detectors --input "$input" \
    --count "$n" --out "$dir/detectors"
  echo "$dir"
}

# w2_in_group DIR GROUP [SETTINGS]: makes DIR a copy of W2 that consumes in group GROUP and
# publishes to its own decisions topic (bench.decisions.GROUP), with SETTINGS (lines) added to
# its [kafka] section; prints DIR.
w2_in_group() {
  local dir=$1 group=$2
  rm -rf "$dir"
  cp -rL benchmarks/pipelines/w2 "$dir"
  sed -i -e "s/^\[kafka\]\$/[kafka]\ngroup = \"$group\"\n${3:-}/" \
    -e "s/^decisions_topic = \"bench.decisions\"/decisions_topic = \"bench.decisions.$group\"/" "$dir/pipeline.toml"
  grep -q "^decisions_topic = \"bench.decisions.$group\"" "$dir/pipeline.toml"
  echo "$dir"
}
