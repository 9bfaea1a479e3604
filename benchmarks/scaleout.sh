#!/usr/bin/env bash
# Scale-out on Kafka: the repartition hop's cost, restore speed from the changelog, and the time
# from a SIGKILL to the killed instance's state partitions running on another instance.
#
#   benchmarks/scaleout.sh
#   EVENTS=200000 benchmarks/scaleout.sh   # the default
#
# Input: the first EVENTS events of the generated 1M CloudTrail-shaped log (as scaling.sh),
# on a 4-partition topic of Tansu 0.6 (in memory, loopback, same 2 cores). Pipeline: W2.
#  1. One instance, `rampart run --until-end`: the single-instance drain rate.
#  2. One instance with `[kafka] state_partitions = 4` (every event forwarded to the
#     repartition topic and consumed again): time until it counted every event. The hop's cost
#     per event is the difference of the two times per event.
#  3. A new instance on an empty state directory in the same group: it restores every state
#     partition from the changelog (records and bytes from its log; time from its start to
#     every state partition running).
#  4. A second instance joins; once it runs state partitions it is killed with SIGKILL, and the
#     time until the first runs them again is taken (the group's session timeout, then the
#     restore of the changelog's tail since the victim's last checkpoint).
# Writes benchmarks/results/scaleout-DATE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/common.sh
./scripts/setup.sh
source scripts/env.sh
EVENTS="${EVENTS:-200000}"
INPUT=$(prefix_input "$EVENTS")
cargo build --release --workspace --all-targets >&2
LOAD="$CARGO_TARGET_DIR/release/rampart-load"
work="${TMPDIR:-/tmp}/rampart-scaleout"
rm -rf "$work"
mkdir -p "$work"

port=$(free_port)
BROKERS="127.0.0.1:$port"
trap stop_background EXIT
start_tansu "$port" "$work/broker.log"
"$TANSU" topic create bench.events --partitions 4 --broker "tcp://$BROKERS" >/dev/null
"$LOAD" --brokers "$BROKERS" --set linger.ms=50 --set batch.num.messages=10000 feed --topic bench.events "$INPUT"

# pipeline NAME [SETTINGS]: W2 reading bench.events in group NAME, with more [kafka] settings.
pipeline() { w2_in_group "$work/$1" "$1" "${2:-}"; }
now() { date +%s.%N; }
seconds() { python3 -c "print(f'{$2 - $1:.2f}')"; }
metric() { curl -s "http://$1/metrics" | awk -v m="$2" '$1 == m { print $2 }'; }
ready() { curl -sf "http://$1/readyz" >/dev/null 2>&1; }
# start NAME DIR: starts an instance of the pipeline DIR with state directory $work/NAME,
# listening on a free port; sets $listen and $pid.
start() {
  listen="127.0.0.1:$(free_port)"
  RAMPART_LOG=info taskset -c "$SUT_CPUS" "$RAMPART" run "$2" --brokers "$BROKERS" --listen "$listen" --state "$work/$1" \
    --audit "$work/$1.audit.log" 2>"$work/$1.log" &
  pid=$!
  pids+=("$pid")
}

echo "== 1. one instance, --until-end" >&2
single=$(pipeline bench-single)
t0=$(now)
taskset -c "$SUT_CPUS" "$RAMPART" run "$single" --brokers "$BROKERS" --listen "127.0.0.1:$(free_port)" \
  --state "$work/single" --until-end 2>"$work/single.log"
t1=$(now)
grep -q "^stopped: $EVENTS events," "$work/single.log" || { tail "$work/single.log" >&2; exit 1; }
single_s=$(seconds "$t0" "$t1")

echo "== 2. one instance, state_partitions = 4" >&2
group=$(pipeline bench-group "state_partitions = 4")
t0=$(now)
start g1 "$group"
g1=$listen
counted() { awk -v n="$(metric "$1" rampart_events_total)" -v want="$EVENTS" 'BEGIN { exit !(n + 0 >= want) }'; }
until counted "$g1"; do
  kill -0 "$pid" || { tail "$work/g1.log" >&2; exit 1; }
  sleep 0.1
done
t1=$(now)
group_s=$(seconds "$t0" "$t1")
kill -TERM "$pid"
wait "$pid"

echo "== 3. restore on an empty disk" >&2
running() { grep -c "state partition running" "$1" || true; }
loops=$(running "$work/g1.log")
t0=$(now)
start g2 "$group"
g2=$listen
g2_pid=$pid
until [ "$(running "$work/g2.log")" -ge "$loops" ]; do kill -0 "$g2_pid" || { tail "$work/g2.log" >&2; exit 1; }; sleep 0.05; done
t1=$(now)
restore_s=$(seconds "$t0" "$t1")
restored() { grep "window state restored from its changelog" "$1" | grep -o " $2=[0-9.]*" | cut -d= -f2 | awk '{ s += $1 } END { print s + 0 }'; }
records=$(restored "$work/g2.log" records)
bytes=$(restored "$work/g2.log" bytes)
applied=$(restored "$work/g2.log" applied)

echo "== 4. SIGKILL and failover" >&2
start g3 "$group"
g3_pid=$pid
until [ "$(running "$work/g3.log")" -gt 0 ] && ready "$listen"; do
  kill -0 "$g3_pid" || { tail "$work/g3.log" >&2; exit 1; }
  sleep 0.1
done
sleep 3
before=$(running "$work/g2.log")
t0=$(now)
kill -KILL "$g3_pid"
until [ "$(running "$work/g2.log")" -gt "$before" ]; do
  kill -0 "$g2_pid" || { tail "$work/g2.log" >&2; exit 1; }
  sleep 0.05
done
until ready "$g2"; do sleep 0.05; done
t1=$(now)
failover_s=$(seconds "$t0" "$t1")
kill -TERM "$g2_pid"
wait "$g2_pid" || true

out="benchmarks/results/scaleout-$(date -u +%F).md"
python3 - "$EVENTS" "$single_s" "$group_s" "$restore_s" "$records" "$bytes" "$applied" "$failover_s" >"$out" <<'PY'
import sys
events, single, group, restore, records, size, applied, failover = map(float, sys.argv[1:])
print("# Scale-out: repartition hop, restore, failover")
print()
print("| measure | result |")
print("|---|---:|")
print(f"| one instance, `--until-end`, {events:,.0f} events | {single:.2f} s, {events / single:,.0f} events/s |")
print(f"| one instance with 4 state partitions (the repartition hop) | {group:.2f} s, {events / group:,.0f} events/s |")
print(f"| the hop's cost per event | {(group - single) / events * 1e6:.1f} µs ({group / single:.2f}x the time) |")
print(f"| restore of every state partition on an empty disk, process start to all running | {restore:.2f} s |")
print(f"| changelog read | {records:,.0f} records ({applied:,.0f} keys applied), {size / 1e6:.1f} MB: {records / restore:,.0f} records/s, {size / 1e6 / restore:.1f} MB/s |")
print(f"| SIGKILL of one of two instances to its state partitions running on the other | {failover:.2f} s |")
PY
{
  echo
  machine_line
  echo "Broker: Tansu 0.6.0 (in-memory), loopback, input of 4 partitions. Pipeline: W2. Command: \`EVENTS=$EVENTS benchmarks/scaleout.sh\`."
  echo "Times include each process's start. The rates in the table are over the whole start-to-running time."
} >>"$out"
cat "$out"
echo "wrote $out" >&2
