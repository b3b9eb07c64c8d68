#!/usr/bin/env bash
# Regenerate catalog/_proto from proto/. Run from anywhere: scripts/gen_proto.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# The venv's python has grpcio-tools; fall back to whatever python is on PATH.
default_py=python
[ -x .venv/bin/python ] && default_py=.venv/bin/python
PY=${PYTHON:-$default_py}
# protoc finds its mypy plugins (protoc-gen-mypy) next to that python.
PATH="$(dirname "$(command -v "$PY")"):$PATH"
out=catalog/_proto
rm -rf "$out/loracat"
"$PY" -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" proto/loracat/v1/*.proto
# protoc emits absolute imports (`from loracat.v1 import ...`); make them package-relative.
find "$out/loracat" -name '*_pb2_grpc.py' -exec sed -i 's/^from loracat\.v1 import/from catalog._proto.loracat.v1 import/' {} +
touch "$out/__init__.py" "$out/loracat/__init__.py" "$out/loracat/v1/__init__.py"
echo "generated $(find "$out/loracat" -name '*.py' | wc -l) files in $out"
