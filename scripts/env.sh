# Sourced by the other scripts: one build cache outside the clone, shared by every checkout and
# by CI, so that rebuilds are incremental (a cold DataFusion build takes ~25 minutes here).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rampart/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
RAMPART="$CARGO_TARGET_DIR/release/rampart"
