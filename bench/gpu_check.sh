#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (NVIDIA H200: torch 2.11 + CUDA 13.0, Python 3.12,
# nvcc, ninja, pybind11, pytest, compute-sanitizer; no internet). From the repo root:
#
#     OUT=/path/to/results bash bench/gpu_check.sh
#
# Builds the extension for sm_90, runs the CUDA tests (under sync-debug "error", in the tests), runs
# compute-sanitizer memcheck and racecheck on small cases of every kernel, then the benchmark grid on
# CUDA (`python -m bench --only ...`: KD loss fwd/bwd/fwd+bwd, the training step, clipping).
# Writes 7 files under $OUT (the device tool brings back 8): gpu_check.log (everything printed, the
# environment and the benchmark tables included), cuda_tests.log, memcheck.log, racecheck.log,
# kd_loss_cuda.csv, step_cuda.csv, clip_cuda.csv. The plots are not brought back: make them here with
#     python -m bench.report OUT/*.csv --no-readme --md OUT/report.md
# Budget: under 8 minutes. Every step has its own timeout, cut to what is left of the budget
# (BUDGET_S, default 465 s); a step that fails or finds no time left does not stop the rest.
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
step() { echo; echo "=== $* ($(date -u +%H:%M:%S), ${SECONDS}s)"; }
status=0
END=$((SECONDS + ${BUDGET_S:-465}))
# limit WANT: the seconds a step may take, WANT or what is left of the budget (0: none left).
limit() { local left=$((END - SECONDS)); if [ "$left" -lt 10 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi; }
# timed WANT CMD...: CMD under `timeout`, or skipped (a failure) when the budget is spent.
timed() { local t; t=$(limit "$1"); shift; if [ "$t" -eq 0 ]; then echo "SKIPPED (budget spent): $*"; return 1; fi; timeout "$t" "$@"; }

step environment
nvidia-smi
$PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
nvcc --version | tail -2
git rev-parse --short HEAD

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  step "wheels carried in .whl (Liger-Kernel)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build (sm_90)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FASTKD_REQUIRE_CUDA=1
# fastkd._C (CPU + CUDA sources in parallel), then the module fastkd._C_avx512 (csrc/**/*_avx512.cpp).
if ! timed 240 $PY setup.py -q build_ext --inplace; then echo "BUILD FAILED"; exit 1; fi
$PY -c "import fastkd; print('backend cuda:', fastkd.backend('cuda'), '| extension error:', fastkd.extension_error())"
export FASTKD_REQUIRE_EXTENSION=1

step "CUDA tests (pytest -m cuda)"
timed 90 $PY -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.log" || status=1

step "compute-sanitizer memcheck"
timed 45 compute-sanitizer --tool memcheck --error-exitcode 9 $PY bench/sanitize_cases.py >"$OUT/memcheck.log" 2>&1 || status=1
tail -5 "$OUT/memcheck.log"
step "compute-sanitizer racecheck"
timed 45 compute-sanitizer --tool racecheck --error-exitcode 9 $PY bench/sanitize_cases.py >"$OUT/racecheck.log" 2>&1 || status=1
tail -5 "$OUT/racecheck.log"

# The grid writes CSVs, plots and report.md into a scratch folder; only the CSVs come back (8 files at
# most). A benchmark cut short by its timeout keeps the cases it measured (CSV written after each).
SCRATCH=$(mktemp -d)
for b in "kd 120" "step 45" "clip 45"; do
  set -- $b
  step "benchmark: $1 (CUDA)"
  timed "$2" $PY -m bench --device cuda --only "$1" --out-dir "$SCRATCH" --no-readme || status=1
done
cp "$SCRATCH"/*.csv "$OUT"/ && rm -rf "$SCRATCH"
step "done (status $status): $(find "$OUT" -type f | wc -l) files in \$OUT"
exit $status
