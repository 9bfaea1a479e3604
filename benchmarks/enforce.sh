#!/usr/bin/env bash
# How long an enforcement point takes to know who is blocked when it starts, with a million
# decisions on the decisions topic: reading the whole topic (`--bootstrap decisions`, what
# every start did before the enforcement state) against the enforcement-state topic plus the
# last ten minutes of decisions (`--bootstrap auto`, the default). Median of RUNS starts each.
#
#   benchmarks/enforce.sh
#   DECISIONS=1000000 PARTITIONS=4 RUNS=3 benchmarks/enforce.sh   # the default
#
# The log: DECISIONS decisions over the last 7 days (a Kafka timestamp = their processed_at),
# 80 % alerts and 20 % blocks of one hour, plus 200 blocks of 8 days from the first day (blocks
# that outlive a short retention); about 50,000 actors. The enforcement-state topic holds what
# compaction would leave of the service's records: the newest block in force per actor and
# detector (Tansu does not compact, so it is fed that directly; the service's writing of it is
# tested in crates/rampart-cli/tests/service.rs). The gateway is
# crates/rampart-enforce/examples/gateway.rs; caught up = its `/blocked` says `caught_up`, timed
# from the process start. Both starts must find the same blocked actors, or the run fails.
# Broker: Tansu 0.6.0 (in-memory) on loopback, on the same 2 cores.
# Writes benchmarks/results/enforce-DATE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/common.sh
./scripts/setup.sh
source scripts/env.sh
DECISIONS="${DECISIONS:-1000000}"
PARTITIONS="${PARTITIONS:-4}"
RUNS="${RUNS:-3}"
cargo build --release --workspace --all-targets >&2
LOAD="$CARGO_TARGET_DIR/release/rampart-load"
GATEWAY="$CARGO_TARGET_DIR/release/examples/gateway"
work="${TMPDIR:-/tmp}/rampart-enforce-bench"
rm -rf "$work"
mkdir -p "$work"

echo "== generating $DECISIONS decisions" >&2
python3 - "$DECISIONS" "$work" <<'PY'
import datetime as dt, hashlib, json, random, sys
n, out = int(sys.argv[1]), sys.argv[2]
rng = random.Random(7)
now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
start = now - dt.timedelta(days=7)
detectors = ["trail-logging-disabled", "api-rate-per-actor", "recon-denied-calls", "secrets-mass-read", "root-console-login"]
iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")
def decision(i, at, verdict, block_for):
    actor = f"arn:aws:iam::123456789012:user/u{rng.randrange(50000)}"
    detector = rng.choice(detectors)
    expires = at + block_for
    # No block ends during the benchmark (both starts must see the same ones in force).
    if now < expires < now + dt.timedelta(hours=1):
        expires = now + dt.timedelta(hours=2)
    return {
        "schema_version": 1,
        "decision_id": hashlib.sha256(f"bench-{i}".encode()).hexdigest()[:32],
        "pipeline": "cloudtrail",
        "detector": {"id": detector, "version": "3f9a0c12be47"},
        "verdict": verdict, "mode": "enforce", "severity": "high",
        "actor": actor, "key": actor, "actions": ["*"],
        "reason": f"{actor} tripped {detector}",
        "evidence": {"actor": actor, "count": rng.randrange(10, 500)},
        "event_time": iso(at), "processed_at": iso(at), "expires_at": iso(expires),
        "source": {"topic": "cloudtrail", "partition": rng.randrange(4), "offset": i},
        "guidance": "Security on-call reviews the activity and lifts the block.",
        "tags": ["bench"],
    }
span = (now - start).total_seconds()
times = sorted(start + dt.timedelta(seconds=rng.random() * span) for _ in range(n - 200))
rows = [decision(i, t, "block" if rng.random() < 0.2 else "alert", dt.timedelta(hours=1)) for i, t in enumerate(times)]
rows += [decision(n + i, start + dt.timedelta(seconds=rng.random() * 86400), "block", dt.timedelta(days=8)) for i in range(200)]
rows.sort(key=lambda d: d["processed_at"])
state = {}
for d in rows:
    if d["verdict"] == "block" and d["expires_at"] > iso(now):
        key = (d["actor"], d["detector"]["id"])
        if key not in state or d["expires_at"] > state[key]["expires_at"]:
            state[key] = d
with open(f"{out}/decisions.jsonl", "w") as f:
    for d in rows:
        f.write(json.dumps(d, separators=(",", ":")) + "\n")
with open(f"{out}/state.jsonl", "w") as f:
    for d in state.values():
        f.write(json.dumps(d, separators=(",", ":")) + "\n")
print(f"{len(rows)} decisions, {len(state)} blocks in force, {len({a for a, _ in state})} actors blocked", file=sys.stderr)
PY

port=$(free_port)
BROKERS="127.0.0.1:$port"
trap stop_background EXIT
start_tansu "$port" "$work/broker.log"
"$TANSU" topic create bench.decisions --partitions "$PARTITIONS" --broker "tcp://$BROKERS" >/dev/null
"$TANSU" topic create bench.decisions.enforcement --partitions "$PARTITIONS" --broker "tcp://$BROKERS" >/dev/null
feed=(--brokers "$BROKERS" --set linger.ms=50 --set batch.num.messages=10000)
"$LOAD" "${feed[@]}" feed --topic bench.decisions --timestamp processed_at "$work/decisions.jsonl"
"$LOAD" "${feed[@]}" feed --topic bench.decisions.enforcement "$work/state.jsonl"
in_force=$(wc -l <"$work/state.jsonl")

# start MODE: seconds from the gateway's start to caught up; leaves /blocked in $work/MODE.json.
start() {
  local mode=$1 http t0 t1
  http=$(free_port)
  t0=$(date +%s.%N)
  taskset -c "$SUT_CPUS" "$GATEWAY" --brokers "$BROKERS" --topic bench.decisions --listen "127.0.0.1:$http" \
    --bootstrap "$mode" 2>"$work/gateway-$mode.log" &
  local gw=$!
  until curl -sf "http://127.0.0.1:$http/blocked" >"$work/$mode.json" 2>/dev/null && grep -q '"caught_up":true' "$work/$mode.json"; do
    kill -0 "$gw" 2>/dev/null || { cat "$work/gateway-$mode.log" >&2; echo "enforce.sh: the gateway stopped" >&2; exit 1; }
    sleep 0.02
  done
  t1=$(date +%s.%N)
  kill "$gw"
  wait "$gw" 2>/dev/null || true
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); v=d[sys.argv[2]]; print(len(v) if isinstance(v, list) else v)" "$@"; }

declare -A secs nread blocked
for mode in decisions auto; do
  times=()
  for _ in $(seq "$RUNS"); do
    times+=("$(start "$mode")")
  done
  secs[$mode]=$(median "${times[@]}")
  nread[$mode]=$(field "$work/$mode.json" decisions_read)
  blocked[$mode]=$(field "$work/$mode.json" blocked)
  echo "$mode: ${times[*]} s; read ${nread[$mode]} decisions; ${blocked[$mode]} actors blocked" >&2
done
python3 -c "import json,sys; a,b=(json.load(open(f))['blocked'] for f in sys.argv[1:]); sys.exit(0 if a==b else 'enforce.sh: the two starts do not block the same actors')" \
  "$work/decisions.json" "$work/auto.json"

out="benchmarks/results/enforce-$(date -u +%F).md"
{
  echo "# Enforcement point start: time to caught up, $DECISIONS decisions on the topic"
  echo
  machine_line
  echo "Broker: Tansu 0.6.0 (in-memory), loopback, $PARTITIONS partitions. Command: \`DECISIONS=$DECISIONS PARTITIONS=$PARTITIONS RUNS=$RUNS benchmarks/enforce.sh\`."
  echo "Blocks in force (the enforcement-state topic's records): $in_force."
  echo
  echo "| bootstrap | messages read | actors blocked | seconds to caught up (median of $RUNS) |"
  echo "|---|---:|---:|---:|"
  echo "| whole decisions topic (\`decisions\`, before) | ${nread[decisions]} | ${blocked[decisions]} | ${secs[decisions]} |"
  echo "| enforcement state + last 10 min (\`auto\`, after) | ${nread[auto]} | ${blocked[auto]} | ${secs[auto]} |"
} | tee "$out"
echo "wrote $out" >&2
