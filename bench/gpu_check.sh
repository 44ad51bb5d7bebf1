#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (NVIDIA H200: torch 2.11 + CUDA 13.0, Python 3.12,
# nvcc, ninja, pybind11, pytest, compute-sanitizer; no internet). From the repo root:
#
#     OUT=/path/to/results bash bench/gpu_check.sh
#
# Builds the extension for sm_90, runs the CUDA tests (under sync-debug "error", in the tests), runs
# compute-sanitizer memcheck and racecheck on small cases of every kernel, then the CUDA benchmarks.
# Writes at most 8 files under $OUT (the device tool brings back 8): gpu_check.log (everything
# printed), cuda_tests.log, memcheck.log, racecheck.log, kd_loss_cuda.csv, clip_cuda.csv, env.txt.
# Budget: under 8 minutes; every step has its own timeout and a failing step does not stop the rest.
#
# Liger-Kernel is not installed there and the machine has no internet: before the run, fetch its wheel
# here into the git-ignored .whl/ and name .whl in the device tool's `carry`:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel
# (it needs torch and triton, which the GPU machine's torch 2.11 brings).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench/results/gpu_run}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
status=0

step environment
{ nvidia-smi; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; nvcc --version | tail -2; git rev-parse --short HEAD; } 2>&1 | tee "$OUT/env.txt"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  step "wheels carried in .whl (Liger-Kernel)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build (sm_90)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FASTKD_REQUIRE_CUDA=1
if ! timeout 120 $PY setup.py -q build_ext --inplace; then echo "BUILD FAILED"; exit 1; fi
$PY -c "import fastkd; print('backend cuda:', fastkd.backend('cuda'), '| extension error:', fastkd.extension_error())"
export FASTKD_REQUIRE_EXTENSION=1

step "CUDA tests (pytest -m cuda)"
timeout 90 $PY -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.log" || status=1

step "compute-sanitizer memcheck"
timeout 45 compute-sanitizer --tool memcheck --error-exitcode 9 $PY bench/sanitize_cases.py >"$OUT/memcheck.log" 2>&1 || status=1
tail -5 "$OUT/memcheck.log"
step "compute-sanitizer racecheck"
timeout 45 compute-sanitizer --tool racecheck --error-exitcode 9 $PY bench/sanitize_cases.py >"$OUT/racecheck.log" 2>&1 || status=1
tail -5 "$OUT/racecheck.log"

step "KD loss benchmark (CUDA)"
timeout 120 $PY -m bench.bench_kd_loss --device cuda --out "$OUT/kd_loss_cuda.csv" || status=1
if [ -f bench/bench_clip.py ]; then
  step "clipping benchmark (CUDA)"
  timeout 45 $PY -m bench.bench_clip --device cuda --out "$OUT/clip_cuda.csv" || status=1
fi
step "done (status $status)"
exit $status
