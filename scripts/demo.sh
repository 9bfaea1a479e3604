#!/usr/bin/env bash
# The demo: Rampart as a live service on a real Kafka-protocol broker.
#
# Builds rampart, checks and tests the cloudtrail pipeline, starts a local Tansu broker, runs
# `rampart run pipelines/cloudtrail` and the example enforcement gateway, feeds the 35 real
# Stratus Red Team detonations mixed into ~24k benign CloudTrail events (timeline ending now),
# shows the decisions arriving on the decisions topic, asks the gateway about a blocked and an
# innocent actor (the gateway enforces only decisions signed by the service's key), compares a candidate rule running in shadow with what was enforced, adds a
# broken detector to the running pipeline (hot reload) and shows the blast-radius fail-safe put
# it in shadow and lift its blocks, verifies the audit log, shows health and metrics, and stops
# everything cleanly (SIGTERM: the service checkpoints and exits 0).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
source scripts/env.sh
echo "== building rampart (release; the first build takes a while)" >&2
# --workspace --all-targets: the same feature set as the tests, so both share one build.
cargo build --release --workspace --all-targets
LOAD="$CARGO_TARGET_DIR/release/rampart-load"
GATEWAY="$CARGO_TARGET_DIR/release/examples/gateway"
echo "== rampart check / test pipelines/cloudtrail" >&2
"$RAMPART" check pipelines/cloudtrail
"$RAMPART" test pipelines/cloudtrail

out="${TMPDIR:-/tmp}/rampart-demo"
rm -rf "$out"
mkdir -p "$out"
KAFKA_PORT=$(free_port)
HTTP_PORT=$(free_port)
GATEWAY_PORT=$(free_port)
BROKERS="127.0.0.1:$KAFKA_PORT"
trap stop_background EXIT

echo "== starting the Tansu broker on $BROKERS (in-memory storage)" >&2
start_tansu "$KAFKA_PORT" "$out/broker.log" cloudtrail

# The service runs a copy of the pipeline (the demo edits it live; the audit log lands there),
# with one more detector: a stricter candidate for recon-denied-calls, in shadow.
pipeline="$out/cloudtrail"
cp -r pipelines/cloudtrail "$pipeline"
rm -rf "$pipeline/state" "$pipeline/audit.log" "$pipeline/audit.log.rules"
cat > "$pipeline/detectors/recon-denied-calls-candidate.sql" <<'SQL'
-- id: recon-denied-calls-candidate
-- verdict: block
-- severity: medium
-- mode: shadow
-- reason: {{actor}} was denied {{n}} List/Describe/Get calls within 10 minutes (candidate: block from 5)
-- tags: discovery, T1580, candidate
SELECT actor, n FROM (
  SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time
         RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n
  FROM events
  WHERE error_code IN ('AccessDenied', 'Client.UnauthorizedOperation', 'UnauthorizedOperation')
    AND (action LIKE 'List%' OR action LIKE 'Describe%' OR action LIKE 'Get%'))
WHERE n >= 5
SQL

# Decisions are signed (the gateway enforces only those), and admin commands need a token.
echo "== a signing key for decisions, and an operator's admin token" >&2
"$RAMPART" keys generate --id demo-1 --dir "$out/keys"
ADMIN_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
printf 'demo %s\n' "$ADMIN_TOKEN" > "$out/admin-tokens"
chmod 600 "$out/admin-tokens"
python3 - "$pipeline/pipeline.toml" "$out" <<'PY'
import sys
path, out = sys.argv[1], sys.argv[2]
text = open(path).read()
assert "\n[service]\n" in text
text = text.replace("\n[service]\n", f'\n[service]\nadmin_tokens = "{out}/admin-tokens"\nsigning_key = "{out}/keys/demo-1.key.pem"\n', 1)
open(path, "w").write(text)
PY

echo "== rampart run $pipeline (metrics on http://127.0.0.1:$HTTP_PORT/metrics)" >&2
RAMPART_LOG=info "$RAMPART" run "$pipeline" --brokers "$BROKERS" \
  --listen "127.0.0.1:$HTTP_PORT" --state "$out/state" 2>"$out/rampart.log" &
rampart_pid=$!
pids+=($rampart_pid)
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
echo "readyz: $(curl -s "http://127.0.0.1:$HTTP_PORT/readyz")" >&2

echo "== the example gateway (an enforcement point using rampart-enforce) on 127.0.0.1:$GATEWAY_PORT" >&2
"$GATEWAY" --brokers "$BROKERS" --topic rampart.decisions --listen "127.0.0.1:$GATEWAY_PORT" \
  --trust "demo-1=$out/keys/demo-1.pub.pem" 2>"$out/gateway.log" &
pids+=($!)

echo "== feeding 35 real detonations mixed into benign traffic (20 minutes of event time, ending now)" >&2
python3 scripts/demo-feed.py --out "$out/feed.jsonl"
"$LOAD" --brokers "$BROKERS" feed --topic cloudtrail --rate 4000 "$out/feed.jsonl"

echo >&2
echo "== decisions on rampart.decisions, as they arrived (the first of each detector; all in $out/decisions.jsonl)" >&2
"$LOAD" --brokers "$BROKERS" tail --topic rampart.decisions --idle 4 > "$out/decisions.jsonl"
python3 - "$out/decisions.jsonl" <<'PY'
import json, sys
seen, n = set(), 0
for line in open(sys.argv[1]):
    d = json.loads(line); n += 1
    if d['detector']['id'] in seen:
        continue
    seen.add(d['detector']['id'])
    print(f"{d['verdict']:<6} {d['severity']:<8} {d['detector']['id']:<36} {d['reason'][:110]}")
print(f"-- {n} decisions from {len(seen)} detectors", file=sys.stderr)
PY

echo >&2
echo "== the gateway refuses a blocked actor and lets an innocent one through" >&2
blocked=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["detector"]["id"] == "trail-logging-disabled":
        print(d["actor"]); break' "$out/decisions.jsonl")
echo "\$ curl -H 'X-Actor: $blocked' http://127.0.0.1:$GATEWAY_PORT/CreateAccessKey" >&2
curl -s -w '  (HTTP %{http_code})\n' -H "X-Actor: $blocked" "http://127.0.0.1:$GATEWAY_PORT/CreateAccessKey"
echo "\$ curl -H 'X-Actor: arn:aws:iam::111122223333:user/dev-3' http://127.0.0.1:$GATEWAY_PORT/ListBuckets" >&2
curl -s -w '  (HTTP %{http_code})\n' -H "X-Actor: arn:aws:iam::111122223333:user/dev-3" "http://127.0.0.1:$GATEWAY_PORT/ListBuckets"

echo >&2
echo "== shadow mode: the candidate rule's decisions are marked shadow (the gateway ignores them)" >&2
echo "\$ rampart compare $out/decisions.jsonl" >&2
"$RAMPART" compare "$out/decisions.jsonl" | sed '/^enforced/,$d' | head -n 20

echo >&2
echo "== the blast-radius fail-safe: a broken detector (it blocks every Describe call) is added to the running pipeline" >&2
cat > "$pipeline/detectors/describe-blocked.sql" <<'SQL'
-- id: describe-blocked
-- verdict: block
-- severity: high
-- reason: {{actor}} called {{action}}
SELECT actor, action FROM events WHERE action LIKE 'Describe%'
SQL
for _ in $(seq 100); do
  grep -q '"what":"describe-blocked","change":"added"' "$pipeline/audit.log" 2>/dev/null && break
  sleep 0.1
done
echo "(hot reload: $(grep -c '"kind":"rule"' "$pipeline/audit.log") rule changes in the audit log so far, the last: describe-blocked added)" >&2
python3 scripts/demo-feed.py --out "$out/more.jsonl" --benign-only --minutes 1
"$LOAD" --brokers "$BROKERS" feed --topic cloudtrail --rate 4000 "$out/more.jsonl"
"$LOAD" --brokers "$BROKERS" tail --topic rampart.decisions --idle 4 > "$out/decisions-2.jsonl"
python3 - "$out/decisions-2.jsonl" <<'PY'
import json, sys
ds = [json.loads(l) for l in open(sys.argv[1])]
mine = [d for d in ds if d["detector"]["id"] == "describe-blocked"]
count = lambda v, m: sum(1 for d in mine if d["verdict"] == v and d["mode"] == m)
for d in mine:
    if d["verdict"] == "alert":
        print(f"alert  {d['reason']}")
print(f"describe-blocked: {count('block', 'enforce')} blocks enforced before the fail-safe tripped, "
      f"{count('revoke', 'enforce')} of them revoked, {count('block', 'shadow')} more decided in shadow only")
PY
echo "readyz: $(curl -s "http://127.0.0.1:$HTTP_PORT/readyz" | tr '\n' ' ')" >&2
echo "\$ curl -X POST 'http://127.0.0.1:$HTTP_PORT/admin/rearm?detector=describe-blocked'  (no token)" >&2
curl -s -w '  (HTTP %{http_code})\n' -X POST "http://127.0.0.1:$HTTP_PORT/admin/rearm?detector=describe-blocked"
echo "\$ curl -X POST -H 'Authorization: Bearer ...' 'http://127.0.0.1:$HTTP_PORT/admin/rearm?detector=describe-blocked'  (after fixing it; here we remove it)" >&2
curl -s -X POST -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:$HTTP_PORT/admin/rearm?detector=describe-blocked"
rm "$pipeline/detectors/describe-blocked.sql"

echo >&2
echo "== health and a few metrics" >&2
echo "healthz: $(curl -s "http://127.0.0.1:$HTTP_PORT/healthz")  readyz: $(curl -s "http://127.0.0.1:$HTTP_PORT/readyz")"
curl -s "http://127.0.0.1:$HTTP_PORT/metrics" \
  | grep -E '^rampart_(events_total|bad_records_total|late_records_total|checkpoints_total|state_disk_bytes|end_to_end_latency_seconds\{quantile="0.99"\}|processing_latency_seconds\{quantile="0.99"\}) '

echo >&2
echo "== stopping: SIGTERM finishes the batch in flight, waits for the broker, checkpoints, exits 0" >&2
kill -TERM "$rampart_pid"
status=0
wait "$rampart_pid" || status=$?
tail -n 1 "$out/rampart.log" >&2
echo "rampart run exited with status $status (logs: $out/rampart.log)" >&2
echo "\$ rampart audit verify $pipeline/audit.log" >&2
"$RAMPART" audit verify "$pipeline/audit.log"
exit "$status"
