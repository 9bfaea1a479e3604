#!/usr/bin/env bash
# Coverage-guided fuzzing of Rampart's parsers with cargo fuzz (libFuzzer).
#
#   scripts/fuzz.sh [--check] [SECONDS] [TARGET...]
#   scripts/fuzz.sh --reproduce TARGET FILE
#
# Runs each target (all of them by default: decode mapping pipeline_toml detector test_cases
# enforce) for SECONDS (default 60) on one core, starting from its corpus in fuzz/corpus/TARGET
# (committed; seeded from the repository's own pipelines and data) and adding what it finds
# there. With --check (what scripts/test.sh runs) the corpus is copied aside first and left
# as it is. A crash stops with the input saved in fuzz/artifacts/TARGET/; replay it with
# --reproduce, fix it, and keep it as a regression test in the crate it crashed (docs/security.md).
# Prints, per target, the inputs run and the executions per second (libFuzzer's final stats).
#
# The build instruments every crate, DataFusion included: the first one takes a while. Its
# target directory is kept in ~/.cache/rampart/fuzz-target.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export CARGO_TARGET_DIR="${RAMPART_FUZZ_TARGET:-$HOME/.cache/rampart/fuzz-target}"
ALL=(decode mapping pipeline_toml detector test_cases enforce)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz (from crates.io)" >&2
  cargo install cargo-fuzz --locked --version 0.13.2
fi
# libFuzzer's instrumentation works with the stable compiler when no sanitizer is asked for;
# `fuzzing` is a cfg of cargo fuzz's own that needs no nightly feature.
FUZZ=(cargo fuzz)
BUILD=(--fuzz-dir fuzz --sanitizer none --release --debug-assertions)

if [[ "${1:-}" == "--reproduce" ]]; then
  target=$2 file=$3
  "${FUZZ[@]}" run "${BUILD[@]}" "$target" "$file"
  exit
fi

check=false
if [[ "${1:-}" == "--check" ]]; then
  check=true
  shift
fi
seconds=${1:-60}
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${ALL[@]}")

echo "== building the fuzz targets" >&2
"${FUZZ[@]}" build "${BUILD[@]}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

status=0
for target in "${targets[@]}"; do
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  if $check; then
    cp -r "$corpus" "$scratch/$target"
    corpus="$scratch/$target"
  fi
  log="${TMPDIR:-/tmp}/rampart-fuzz-$target.log"
  echo "== $target: ${seconds}s" >&2
  if "${FUZZ[@]}" run "${BUILD[@]}" "$target" "$corpus" -- \
      -max_total_time="$seconds" -print_final_stats=1 -timeout=30 -rss_limit_mb=4096 \
      -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1; then
    runs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
    speed=$(grep -m1 'stat::average_exec_per_sec' "$log" | awk '{print $2}')
    corpus_n=$(find "$corpus" -type f | wc -l)
    echo "$target: ${runs:-?} inputs in ${seconds}s (${speed:-?}/s), corpus $corpus_n, no crash"
  else
    status=1
    echo "$target: CRASH (log: $log; input in fuzz/artifacts/$target/)"
    grep -m5 -E 'panicked|ERROR|SUMMARY' "$log" || true
  fi
done
exit "$status"
