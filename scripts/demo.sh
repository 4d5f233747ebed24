#!/usr/bin/env bash
# The README's main command: installs what is needed, builds, and runs the two-node demo lab in network
# namespaces (the host's own namespace is never touched), then tears it down.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the demo creates network namespaces" >&2; exit 1; }
bash scripts/setup.sh
cargo build --workspace --bins --quiet
export PALISADE_BIN_DIR="$PWD/target/debug"
exec "$PALISADE_BIN_DIR/palisade-lab" demo examples/demo
