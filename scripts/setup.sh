#!/usr/bin/env bash
# Create .venv and install loracat with everything it needs (idempotent; fast when up to date).
# torch is pinned to 2.13.0: its CPU wheel is what this project is tested with, and an unpinned
# torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LORACAT_VENV:-.venv}
stamp="$VENV/.loracat-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/loracat" ]; then
  exit 0
fi
echo "setting up $VENV (one-time; a few minutes)..." >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
