#!/usr/bin/env bash
# Try scripts/gpu_check.sh here, on CPU, the way a lent GPU machine will run it: from a copy of
# the committed tree (what a device call carries), in a Python that has what that machine has
# (transformers 5.17, peft 0.21.0, Triton, pytest, safetensors, fsspec, click, rich,
# prometheus-client; none of s3fs, numba, matplotlib) plus the wheel set of
# scripts/device_wheels.txt at the same versions. A missing import or a transformers 5.17
# difference shows here instead of costing device minutes. About 3 minutes after a first
# setup of .venv-device (~2 minutes; torch 2.13.0 CPU stands in for the device's CUDA build).
#
#   scripts/gpu_dry_run.sh [OUT_DIR]        # default /tmp/gpu-dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu-dry-run}
venv=$PWD/.venv-device
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  mapfile -t wheels < <(grep -v '^#' scripts/device_wheels.txt | grep -v '^$')
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0" "transformers==5.17.0" \
    "peft==0.21.0" safetensors fsspec click rich prometheus-client numpy pytest triton \
    "${wheels[@]}"
fi
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
git archive HEAD | tar -x -C "$tree"
rm -rf "$out"
(cd "$tree" && PYTHONPATH="$tree" PYTHON="$venv/bin/python" \
  scripts/gpu_check.sh "$out" --device cpu --quick) > /dev/null 2>&1 || true
cat "$out/summary.txt"
! grep -q "rc=[1-9]" "$out/summary.txt"
