#!/usr/bin/env bash
# Set up, then run the tests. Locally the default run skips tests marked slow; with CI=true (as
# .ci/run sets it) or --all, they run too. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/install_chromium.sh  # the report's real-browser test (skips only where none can be had)
marker=(-m "not slow")
if [ "${CI:-}" = "true" ]; then marker=(); fi
if [ "${1:-}" = "--all" ]; then marker=(); shift; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest "${marker[@]}" "$@"
