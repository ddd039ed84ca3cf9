#!/usr/bin/env bash
# Creates .venv with Python >= 3.11 and installs the gateway into it (with test extras when asked),
# once: a stamp file named after pyproject.toml's digest records the install, so the next run
# starts at once, and pip's output goes to .venv/install.log, shown only when the install fails.
# Usage: scripts/venv.sh [run|test]
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
case "$mode" in run|test) ;; *) echo "usage: scripts/venv.sh [run|test]" >&2; exit 2 ;; esac
digest=$(sha1sum pyproject.toml | cut -c1-12)
# A test install holds everything a run install does.
if [ -f ".venv/.installed-$mode-$digest" ] || { [ "$mode" = run ] && [ -f ".venv/.installed-test-$digest" ]; }; then
  exit 0
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY=$candidate; break
    fi
  done
fi
[ -n "$PY" ] || { echo "Python 3.11 or newer is required (apt-get install python3)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
extra=""
[ "$mode" = test ] && extra="[test]"
echo "== installing the gateway into .venv (once; log: .venv/install.log)" >&2
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONWARNINGS=ignore
if ! { .venv/bin/python -m pip install -q --upgrade pip \
       && .venv/bin/python -m pip install -q --no-warn-script-location -e ".$extra"; } >.venv/install.log 2>&1; then
  cat .venv/install.log >&2
  echo "== the install failed; the output above is in .venv/install.log" >&2
  exit 1
fi
rm -f .venv/.installed-"$mode"-*
touch ".venv/.installed-$mode-$digest"
