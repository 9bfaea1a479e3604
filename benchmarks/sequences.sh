#!/usr/bin/env bash
# Sequences' cost: W2 replay alone against W2 with the cloudtrail pipeline's two sequence
# detectors added (iam-change-after-login-without-mfa: an IAM write within 10 minutes of a
# console sign-in without MFA; denied-then-allowed: a write denied 3 times within 10 minutes,
# then succeeding), on the same generated input, run alternately (W2, W2+2, W2, W2+2, ...) so
# that the host's drift hits both alike. Reports each one's median rate and the median of the
# pairwise ratios, and the decisions each made. Target (sequences issue): W2+2 within 20 % of
# W2. Writes benchmarks/results/sequences-DATE.md.
#
#   benchmarks/sequences.sh
#   EVENTS=300000 RUNS=5 benchmarks/sequences.sh   # the default
#   ADDED="trail-logging-not-restarted iam-user-without-mfa" KIND=absences benchmarks/sequences.sh
#                                                   # the two absences instead (frames that look ahead)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source benchmarks/common.sh
EVENTS="${EVENTS:-300000}"
RUNS="${RUNS:-5}"
ADDED="${ADDED:-iam-change-after-login-without-mfa denied-then-allowed}"
KIND="${KIND:-sequences}"
INPUT=$(prefix_input "$EVENTS")
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --workspace --all-targets >&2
work="${TMPDIR:-/tmp}/rampart-sequences"
rm -rf "$work"
mkdir -p "$work/w2-seq/detectors"
cp benchmarks/pipelines/w2/pipeline.toml "$work/w2-seq/"
sed -i 's/^name = "w2"/name = "w2-seq"/' "$work/w2-seq/pipeline.toml"
cp -L benchmarks/pipelines/w2/detectors/*.sql "$work/w2-seq/detectors/"
for d in $ADDED; do
  cp "pipelines/cloudtrail/detectors/$d.sql" "$work/w2-seq/detectors/"
done
"$RAMPART" check benchmarks/pipelines/w2 >/dev/null
"$RAMPART" check "$work/w2-seq" >&2

# run DIR: one replay of the input; prints "events/s decisions".
run() {
  local summary
  summary=$(pinned "$RAMPART" replay "$1" --input "$INPUT" --output "$work/out.jsonl" --dead-letters /dev/null 2>&1)
  echo "$(rate_of "$summary") $(grep -c . "$work/out.jsonl")"
}

w2=() seq=() ratios=()
for i in $(seq "$RUNS"); do
  read -r a da <<<"$(run benchmarks/pipelines/w2)"
  read -r b db <<<"$(run "$work/w2-seq")"
  w2+=("$a") seq+=("$b")
  ratios+=("$(python3 -c "print(f'{$b / $a:.3f}')")")
  echo "run $i: W2 $a events/s ($da decisions), W2+2 $KIND $b events/s ($db decisions)" >&2
done
ratio=$(median "${ratios[@]}")
out="benchmarks/results/$KIND-$(date +%F).md"
{
  echo "# W2 replay with two detectors added ($KIND, $(date +%F))"
  echo
  machine_line
  pinning_line
  echo "Input: the first $EVENTS events of \`benchmarks/generate.py --events 1000000\` (10k Zipf actors). $RUNS alternating runs each. Command: \`EVENTS=$EVENTS RUNS=$RUNS ADDED=\"$ADDED\" KIND=$KIND benchmarks/sequences.sh\`."
  echo
  echo "| pipeline | detectors | events/s (median) | decisions |"
  echo "| --- | --- | --- | --- |"
  echo "| W2 | 3 per-event + 5 windows | $(median "${w2[@]}") | $da |"
  echo "| W2 + 2 $KIND | + ${ADDED// /, } | $(median "${seq[@]}") | $db |"
  echo
  echo "W2+2 / W2, pairwise (min / median / max): $(printf '%s\n' "${ratios[@]}" | sort -n | head -1) / $ratio / $(printf '%s\n' "${ratios[@]}" | sort -n | tail -1) (target: at least 0.80)."
} >"$out"
cat "$out"
