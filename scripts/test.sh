#!/usr/bin/env bash
# The whole check, as CI runs it: formatting, clippy with warnings as errors, every test
# (release profile: the same build the demo and the benchmarks use).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
source scripts/env.sh
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --release -- -D warnings
echo "== build" >&2
cargo build --workspace --all-targets --release
echo "== rampart check / rampart test on every pipeline" >&2
for p in pipelines/*/; do
  "$CARGO_TARGET_DIR/release/rampart" check "$p"
  "$CARGO_TARGET_DIR/release/rampart" test "$p"
done
for p in benchmarks/pipelines/*/; do
  "$CARGO_TARGET_DIR/release/rampart" check "$p"
done
echo "== cargo test" >&2
# No doc tests: the crates have none, and an empty doc-test run must not close the log.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --release --lib --bins --tests 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "cargo test: %d passed, %d failed\n", p, f }' "$log"
echo "== fuzz targets, briefly (scripts/fuzz.sh: their committed corpus, then 10 s of new inputs each)" >&2
./scripts/fuzz.sh --check "${RAMPART_FUZZ_SECONDS:-10}"
