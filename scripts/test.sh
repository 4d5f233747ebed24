#!/usr/bin/env bash
# The README's test command: installs what is needed, builds, runs every test of the workspace.
# Root is required: the network-namespace tests create namespaces (never touching the host's own).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the tests create network namespaces" >&2; exit 1; }
bash scripts/setup.sh
cargo build --workspace --bins
cargo test --workspace --no-fail-fast
bash scripts/deploy-check.sh
