#!/usr/bin/env bash
# Sets everything up (Debian packages, virtualenv) and runs the whole test suite,
# slow tests included. Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh test
scripts/venv.sh test
# mypy --strict over gateway/ and tests/harness.py ([tool.mypy] in pyproject.toml) gates the run, as the tests do.
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
