#!/usr/bin/env bash
# The demo: builds rampart, checks and tests the cloudtrail pipeline, then replays the real
# Stratus Red Team attack logs through it, printing each decision and the replay summary; then
# the threshold (sliding-window) pipeline over three detonations, with its first decisions.
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
echo "== rampart replay pipelines/cloudtrail --input data/cloudtrail/stratus-detonation-logs/" >&2
"$RAMPART" replay pipelines/cloudtrail \
  --input data/cloudtrail/stratus-detonation-logs/ \
  --output "$out/decisions.jsonl" --dead-letters "$out/dead-letters.jsonl"
echo >&2
echo "== decisions (full JSON in $out/decisions.jsonl)" >&2
python3 - "$out/decisions.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    print(f"{d['verdict']:<6} {d['severity']:<8} {d['detector']['id']:<36} {d['reason']}")
PY

echo >&2
echo "== sliding windows: rampart replay pipelines/cloudtrail-thresholds over three detonations" >&2
"$RAMPART" test pipelines/cloudtrail-thresholds
"$RAMPART" replay pipelines/cloudtrail-thresholds \
  --input data/cloudtrail/stratus-detonation-logs/aws.credential-access.ec2-get-password-data.json \
          data/cloudtrail/stratus-detonation-logs/aws.credential-access.secretsmanager-retrieve-secrets.json \
          data/cloudtrail/stratus-detonation-logs/aws.discovery.ec2-download-user-data.json \
  --output "$out/threshold-decisions.jsonl"
python3 - "$out/threshold-decisions.jsonl" <<'PY'
import json, sys
seen = set()
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d['detector']['id'] not in seen:  # the first decision of each detector
        seen.add(d['detector']['id'])
        print(f"{d['verdict']:<6} {d['severity']:<8} {d['detector']['id']:<36} {d['reason']}")
PY
