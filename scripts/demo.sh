#!/usr/bin/env bash
# Sets everything up and runs the gateway on its embedded defaults:
# SQLite and files under ./data, a test PKI, demo accounts (listed in ./data/demo.json).
# The first run installs what is missing (Debian packages, .venv), quietly; later runs start at once.
# Usage: scripts/demo.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:-./data}
scripts/install-deps.sh run
scripts/venv.sh run
if [ ! -f "$data_dir/demo.json" ]; then
  .venv/bin/gateway --data-dir "$data_dir" init --demo
fi
echo "== demo accounts, listeners and the test CA: $data_dir/demo.json"
exec .venv/bin/gateway --data-dir "$data_dir" serve
