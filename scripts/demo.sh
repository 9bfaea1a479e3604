#!/usr/bin/env bash
# The demo: builds rampart, checks and tests the cloudtrail pipeline, then replays the real
# Stratus Red Team attack logs through it in event-time order, printing the first decision of
# each detector and the replay summary; then stops a replay half-way and resumes it from its
# RocksDB window state.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
source scripts/env.sh
echo "== building rampart (release; the first build takes a while)" >&2
# --workspace --all-targets: the same feature set as the tests, so both share one build.
cargo build --release --workspace --all-targets
echo "== rampart check pipelines/cloudtrail" >&2
"$RAMPART" check pipelines/cloudtrail
echo "== rampart test pipelines/cloudtrail" >&2
"$RAMPART" test pipelines/cloudtrail
out="${TMPDIR:-/tmp}/rampart-demo"
mkdir -p "$out"
# The detonation files are named by technique, not time: put their records in event-time
# order, as a trail delivers them, so that the sliding windows see each burst whole.
python3 - data/cloudtrail/stratus-detonation-logs "$out/stratus-by-time.jsonl" <<'PY'
import glob, json, os, sys
records = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    d = json.load(open(f))
    records.extend(d["Records"] if isinstance(d, dict) else d)
records.sort(key=lambda r: r["eventTime"])
with open(sys.argv[2], "w") as out:
    for r in records:
        out.write(json.dumps(r, separators=(",", ":")) + "\n")
PY
echo "== rampart replay pipelines/cloudtrail --input stratus-by-time.jsonl (all 35 detonations, by event time)" >&2
"$RAMPART" replay pipelines/cloudtrail \
  --input "$out/stratus-by-time.jsonl" \
  --output "$out/decisions.jsonl" --dead-letters "$out/dead-letters.jsonl"
echo >&2
echo "== decisions (full JSON in $out/decisions.jsonl; windows: the first of each detector)" >&2
python3 - "$out/decisions.jsonl" <<'PY'
import json, sys
seen = set()
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d['detector']['id'] in seen:
        continue
    seen.add(d['detector']['id'])
    print(f"{d['verdict']:<6} {d['severity']:<8} {d['detector']['id']:<36} {d['reason']}")
PY

echo >&2
echo "== a replay stopped half-way and resumed with its RocksDB state gives the same decisions" >&2
rm -rf "$out/state"
head -n 155 "$out/stratus-by-time.jsonl" > "$out/first-half.jsonl"
tail -n +156 "$out/stratus-by-time.jsonl" > "$out/second-half.jsonl"
"$RAMPART" replay pipelines/cloudtrail --state "$out/state" --quiet \
  --input "$out/first-half.jsonl" --output "$out/resumed-1.jsonl"
"$RAMPART" replay pipelines/cloudtrail --state "$out/state" --quiet \
  --input "$out/second-half.jsonl" --output "$out/resumed-2.jsonl" --final
whole=$(wc -l < "$out/decisions.jsonl")
resumed=$(cat "$out/resumed-1.jsonl" "$out/resumed-2.jsonl" | wc -l)
echo "uninterrupted: $whole decisions; stopped and resumed: $resumed decisions" >&2
