#!/usr/bin/env bash
# Everything a GPU measures, in one call: the CUDA tests, then the engine benchmarks on the
# device. Logs and JSON go under OUT_DIR (summary.txt lists each step's exit status and time),
# written as each step ends, so a call cut short still returns what it measured.
# Each step has its own time limit, cut to what is left of the whole run's budget (--budget,
# default 480 s: a device call may run 600 s); a step that would get under 20 s is skipped and
# said so; a failing step does not stop the others. Steps run most telling first: the CUDA
# tests, the LoRA kernels' launch settings per module group (bench_lora_kernels.py, which
# writes the best as lora_kernels_best.env), the mixed batch at the floors' shapes, the attach,
# the mixed batch again under that best setting, then the rest.
#
#   scripts/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick] [--budget SECONDS]
#
# On a lent GPU machine: scripts/device_wheels.sh here first (the wheels it lacks), then one
# device call, with the checkout copied to .gpusrc and carried (see docs/PERFORMANCE.md,
# "Engine on a GPU"), writing straight under $OUT:
#   cd .gpusrc && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:$PWD PYTHON=python3 scripts/gpu_check.sh "$OUT/gpu"
# --device cpu runs the same steps on CPU (the CUDA tests skip; the kernel step runs Triton's
# interpreter on the small shape), to try the script without a GPU; --quick uses the small
# shape and few repeats. PYTHON picks the interpreter (default: .venv/bin/python when present,
# else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick] [--budget SECONDS]}
shift
device=cuda
quick=0
budget=480
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --budget) budget=$2; shift 2 ;;
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
  local left=$((budget - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left} s of the ${budget} s budget left" | tee -a "$summary"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local started=$SECONDS
  echo "== $name (limit ${limit} s): $*" | tee -a "$summary"
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
  shape=(--shape small); large=(--shape small)
  reps=(--prefill-repeats 3 --decode-repeats 5 --peft-repeats 2)
  attach_reps=(--repeats 5 --small); kernels=(--quick)
  handoff=(--small --runs 2); moe=(--experts 8 --repeats 1); sweep=(--adapters 200)
else
  shape=(); large=(--shape large)
  reps=(--prefill-repeats 20 --decode-repeats 50 --peft-repeats 5)
  attach_reps=(--repeats 50); kernels=()
  handoff=(--runs 3); moe=(--experts 64 --repeats 3); sweep=(--adapters 5000)
fi
[ "$device" = cpu ] && kernels=(--quick --interpret)
mixed=(--device "$device" --no-peft-default --no-forced-paths)
best="$out/lora_kernels_best.env"
rm -f "$best"

step cuda_tests 180 "$PYTHON" -m pytest -q -x -p no:cacheprovider \
  tests/engine/test_cuda.py tests/engine/test_graphs.py "tests/engine/test_moe.py::test_mixed_batch_on_cuda"
step lora_kernels 150 "$PYTHON" bench/bench_lora_kernels.py --device "$device" "${kernels[@]}" \
  --best-out "$best"
step mixed_r8 120 "$PYTHON" bench/bench_mixed_batch.py "${mixed[@]}" --rows 8 "${shape[@]}" "${reps[@]}"
step mixed_large 90 "$PYTHON" bench/bench_mixed_batch.py "${mixed[@]}" --rows 8 "${large[@]}" "${reps[@]}"
step attach 90 "$PYTHON" bench/bench_attach.py --device "$device" "${attach_reps[@]}"
if [ -s "$best" ]; then
  # The same two runs under the kernel step's best setting (tagged "tuned" in their JSON names).
  tuned=$(sed -n 's/^LORACAT_LORA_KERNELS=//p' "$best")
  echo "   best kernel setting: $tuned" | tee -a "$summary"
  step mixed_r8_tuned 120 env LORACAT_LORA_KERNELS="$tuned" "$PYTHON" bench/bench_mixed_batch.py \
    "${mixed[@]}" --rows 8 "${shape[@]}" "${reps[@]}" --tag tuned
  step mixed_large_tuned 90 env LORACAT_LORA_KERNELS="$tuned" "$PYTHON" bench/bench_mixed_batch.py \
    "${mixed[@]}" --rows 8 "${large[@]}" "${reps[@]}" --tag tuned
fi
step mixed_r32 120 "$PYTHON" bench/bench_mixed_batch.py "${mixed[@]}" --rows 32 "${shape[@]}" "${reps[@]}"
# The S3 setting needs SeaweedFS's server binary, which the GPU machine lacks: colocated only.
step handoff 90 "$PYTHON" bench/bench_handoff.py --device "$device" --settings colocated "${handoff[@]}"
step moe_attach 90 "$PYTHON" bench/bench_moe_attach.py --device "$device" "${moe[@]}"
step sweep 60 "$PYTHON" bench/bench_sweep.py --device "$device" "${sweep[@]}"

echo "done in $SECONDS s: $summary" | tee -a "$summary"
