#!/usr/bin/env bash
# Download, into .whl/, the cp312 wheels a lent GPU machine lacks for the catalog and the engine
# (its Python has torch, transformers, peft and Triton, but not these, or too old), so that one
# device call can install them offline:
#
#   scripts/device_wheels.sh            # here, once (about 14 MB)
#   # then, on the device, in the checkout copy (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:$PWD PYTHON=python3 scripts/gpu_check.sh "$OUT/gpu"
#
# The set (scripts/device_wheels.txt) is the one recorded as working in ../shared/ENVIRONMENT.md. .whl/ is
# ignored by git, so the device call names it in carry.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t wheels < <(grep -v '^#' scripts/device_wheels.txt | grep -v '^$')
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for wheel in "${wheels[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$wheel"
done
ls -1 .whl
