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
echo "== cargo test" >&2
cargo test --workspace --release
