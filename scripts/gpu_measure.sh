#!/usr/bin/env bash
# Every GPU measurement README's "Performance" quotes, in one run on a CUDA machine:
#
#   1. the CUDA tests: the Triton kernels compiled, on CUDA tensors, against the reference
#      formulas, and the memory test (tests/test_triton.py, test_fused.py, test_label_smoothing.py);
#   2. benchmarks/bench_loss.py --device cuda: N = 400k and 2M, float32 and bfloat16;
#   3. benchmarks/bench_launch.py: the Triton kernels' launch sweep, N = 2M, float32 and bfloat16;
#   4. benchmarks/bench_train.py --device cuda at 800 px, float32 and AMP, 3 rounds each;
#   5. the suites' Triton cases compiled (test_fused.py, test_label_smoothing.py,
#      test_class_balanced.py -k triton: without CUDA they run through Triton's interpreter;
#      here conftest.use_triton moves each launch's tensors to the GPU), last, after the
#      measurements.
#
#   bash scripts/gpu_measure.sh [RESULTS_DIR [STEP...]]   # default benchmarks/results, every step
#
# STEPs, in this order by default: cuda_tests bench_loss launch_sweep bench_train bench_train_amp
# triton_tests (steps 1-4 took 4 min 34 s on the lent H200; name some to split the run, e.g.
# where one command may run only so long).
#
# PYTHON (default .venv/bin/python where it exists, else python3) runs everything, with this
# checkout first on PYTHONPATH; on a machine without network, PYTHONPATH names the folder
# scripts/pack_offline_deps.sh made. Each step's output is added to RESULTS_DIR/gpu_measure.log
# as well; a failed step does not stop the others, and the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
# The checkout itself is importable (focal_det2, for the benchmarks), also where it is not installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

results=${1:-benchmarks/results}
all_steps=(cuda_tests bench_loss launch_sweep bench_train bench_train_amp triton_tests)
steps=("${@:2}")
((${#steps[@]})) || steps=("${all_steps[@]}")
for name in "${steps[@]}"; do
  if [[ " ${all_steps[*]} " != *" $name "* ]]; then
    echo "gpu_measure.sh: unknown step '$name'; steps are: ${all_steps[*]}" >&2
    exit 2
  fi
done
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
mkdir -p "$results"
log=$results/gpu_measure.log
echo "== gpu_measure.sh at $(date -u '+%F %T') UTC: ${steps[*]}" >>"$log"
failed=()

step() {
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$log"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  ((rc == 0)) || failed+=("$name")
}

step machine "$python" -c 'import torch, triton, detectron2, fvcore, pycocotools
assert torch.cuda.is_available(), "no CUDA device: these measurements need one"
print(torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(),
      "CPU", torch.backends.cpu.get_cpu_capability())'
if [[ ${failed[*]-} == machine ]]; then
  echo "gpu_measure.sh: the machine check failed (see above); nothing measured" >&2
  exit 1
fi
cuda_tests() {
  "$python" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_fused.py \
    tests/test_label_smoothing.py -k cuda
}
triton_tests() {
  "$python" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_label_smoothing.py \
    tests/test_class_balanced.py -k triton
}
bench_loss() { "$python" benchmarks/bench_loss.py --device cuda --out "$results/bench_loss_cuda.json"; }
launch_sweep() { "$python" benchmarks/bench_launch.py --out "$results/bench_launch_cuda.json"; }
bench_train() {
  "$python" benchmarks/bench_train.py --device cuda --inputs coco800 --rounds 3 --iters 30 \
    --out "$results/bench_train_cuda.json"
}
bench_train_amp() {
  "$python" benchmarks/bench_train.py --device cuda --inputs coco800 --rounds 3 --iters 30 --amp \
    --out "$results/bench_train_cuda_amp.json"
}
for name in "${steps[@]}"; do
  step "$name" "$name"
done

if ((${#failed[@]})); then
  echo "gpu_measure.sh: failed: ${failed[*]} (log: $log)" >&2
  exit 1
fi
echo "gpu_measure.sh: every step passed (log: $log)"
