#!/usr/bin/env bash
# Everything a GPU measures, in one call: the CUDA tests, then the engine benchmarks on the
# device. Logs and JSON go under OUT_DIR (summary.txt lists each step's exit status and time).
# Each step has its own time limit and a failing step does not stop the others (their limits
# add up to 8 minutes; on one H200 the first five steps took 250 s on 2026-12-04, the last
# three have not run on a GPU yet).
#
#   scripts/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick]
#
# On a lent GPU machine: scripts/device_wheels.sh here first (the wheels it lacks), then one
# device call as that script's header shows.
# --device cpu runs the same steps on CPU (the CUDA tests skip), to try the script without a
# GPU; --quick uses the small shape and few repeats. PYTHON picks the interpreter (default:
# .venv/bin/python when present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick]}
shift
device=cuda
quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The benches write their JSON under OUT_DIR, never over the figures kept in bench/results.
export LORACAT_BENCH_RESULTS="$out"
summary="$out/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  echo "== $name: $*" | tee -a "$summary"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - started)) s" | tee -a "$summary"
  tail -n 25 "$out/$name.log"
}

"$PYTHON" - <<'EOF' > "$out/device.txt" 2>&1
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0))
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("no triton")
import transformers, peft; print("transformers", transformers.__version__, "peft", peft.__version__)
EOF
cat "$out/device.txt"

if [ "$quick" = 1 ]; then
  shape=(--shape small); reps=(--prefill-repeats 3 --decode-repeats 5 --peft-repeats 2)
  attach_reps=(--repeats 5 --small)
else
  shape=(); reps=(--prefill-repeats 20 --decode-repeats 50 --peft-repeats 5)
  attach_reps=(--repeats 50)
fi
mixed=(--device "$device" --no-peft-default --no-forced-paths)

step cuda_tests 240 "$PYTHON" -m pytest -q -x -p no:cacheprovider \
  tests/engine/test_cuda.py tests/engine/test_graphs.py "tests/engine/test_moe.py::test_mixed_batch_on_cuda"
step attach 150 "$PYTHON" bench/bench_attach.py --device "$device" "${attach_reps[@]}"
step mixed_r8 200 "$PYTHON" bench/bench_mixed_batch.py "${mixed[@]}" --rows 8 "${shape[@]}" "${reps[@]}"
step mixed_r32 200 "$PYTHON" bench/bench_mixed_batch.py "${mixed[@]}" --rows 32 "${shape[@]}" "${reps[@]}"
if [ "$quick" = 1 ]; then large=(--shape small); else large=(--shape large); fi
step mixed_large 110 "$PYTHON" bench/bench_mixed_batch.py "${mixed[@]}" --rows 8 "${large[@]}" "${reps[@]}"
if [ "$quick" = 1 ]; then
  handoff=(--small --runs 2); moe=(--experts 8 --repeats 1); sweep=(--adapters 200)
else
  handoff=(--runs 3); moe=(--experts 64 --repeats 3); sweep=(--adapters 5000)
fi
# The S3 setting needs SeaweedFS's server binary, which the GPU machine lacks: colocated only.
step handoff 90 "$PYTHON" bench/bench_handoff.py --device "$device" --settings colocated "${handoff[@]}"
step moe_attach 90 "$PYTHON" bench/bench_moe_attach.py --device "$device" "${moe[@]}"
step sweep 60 "$PYTHON" bench/bench_sweep.py --device "$device" "${sweep[@]}"

echo "done: $summary"
