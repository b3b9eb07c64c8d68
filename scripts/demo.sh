#!/usr/bin/env bash
# The main job: set up, then run the end-to-end demo on the embedded default (file store, LMDB,
# real gRPC on loopback, a small resident base). Extra arguments go to `loracat demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/loracat demo "$@"
