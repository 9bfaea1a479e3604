#!/usr/bin/env bash
# Installs what building Rampart needs on a fresh Debian machine, idempotently:
# mold (the linker .cargo/config.toml asks for) and libclang (RocksDB's bindings, later issues).
set -euo pipefail
need=()
for pkg in mold libclang-dev clang pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
for tool in cargo rustfmt cargo-clippy; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is missing (install the Rust toolchain with rustup)" >&2; exit 1; }
done
