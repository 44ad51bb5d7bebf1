#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (NVIDIA H200: torch 2.11 + CUDA 13.0, Python 3.12,
# nvcc, ninja, pybind11, pytest, compute-sanitizer; no internet). From the repo root:
#
#     OUT=/path/to/results bash bench/gpu_check.sh        # on the GPU machine
#     DRY_RUN=1 OUT=/tmp/dry bash bench/gpu_check.sh      # anywhere: every step's CPU-side part
#
# Steps, in order of value; each writes what it measured as it goes (a line in $OUT/summary.txt when
# it ends, its output in the logs below), and a step that fails or finds no time left stops nothing:
#   environment   GPU, Python, torch, setuptools, nvcc, compute-sanitizer; Liger-Kernel's import error
#   build         the extension for sm_90 (setuptools < 77 rejects pyproject.toml's license string:
#                 then it builds in a copy whose license is the older table form)
#   tests:*       pytest -m cuda, one process per file, the KD kernels' file first, then the top-k KD
#                 kernel's, clipping's and the fused linear + KD loss's (a sticky CUDA error ends that file only); SIGINT at the time limit, so pytest
#                 still prints its summary
#   bench:kd      the headline: KD loss 8192 x 128256 bf16 fwd and fwd+bwd (fastkd, eager, Liger)
#   launch        the launch configurations and cudaOccupancyMaxActiveBlocksPerMultiprocessor for them
#   memcheck      compute-sanitizer on fastkd's kernels (KD, top-k KD, clipping, fused linear + KD),
#                 PYTORCH_NO_CUDA_MEMORY_CACHING=1
#   racecheck     the same on the kernels' shared memory (the trimmed case list)
#   bench:*       the rest of the KD grid (torch.compile included), the training step, clipping, the top-k
#                 KD loss and the fused linear + KD loss (their tables in gpu_check.log only: the 8 files
#                 below are taken)
# The files under $OUT (the device tool brings back 8): gpu_check.log (the summary on top, then all
# that was printed), summary.txt, cuda_tests.log, sanitizer.log, kd_headline_cuda.csv,
# kd_loss_cuda.csv, step_cuda.csv, clip_cuda.csv. Plots are made elsewhere from the CSVs:
#     python -m bench.report OUT/*.csv --no-readme --md OUT/report.md
# Budget: BUDGET_S seconds (default 400: the whole run under 7 minutes). Each step has its own limit,
# cut to what is left of the budget, and is skipped when less is left than it needs to finish; what
# the budget leaves out comes last (the KD grid's torch.compile cases, the step, clip and top-k benchmarks).
# The build's nvcc flags are setup.py's (what CI builds); NVCC_APPEND_FLAGS passes more to nvcc.
#
# Liger-Kernel is not installed there and the machine has no internet: before the run, fetch its wheel
# here into the git-ignored .whl/ and name .whl in the device tool's `carry`:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel
# (it needs torch and triton, which the GPU machine's torch 2.11 brings).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$PWD/bench/results/gpu_run}
DRY=${DRY_RUN:-0}
[ "$DRY" = 1 ] || DRY=0
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
NOTES=$(mktemp -d)  # the steps' scratch files (never in $OUT: only 8 files come back)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
: >"$OUT/cuda_tests.log"
: >"$OUT/sanitizer.log"
exec 3>&1 4>&2
exec > >(tee "$LOG") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # this checkout's fastkd and bench, never an installed one
PY=${PYTHON:-python3}
START=$SECONDS
END=$((SECONDS + ${BUDGET_S:-400}))
FAILED=0
BUILD_OK=1

# Every step ends with one summary line: name, PASS / FAIL / TIMEOUT / SKIP, seconds, a note.
record() { printf '%-16s %-7s %4ss  %s\n' "$1" "$2" "$3" "${4:-}" >>"$SUMMARY"; }
header() { echo; echo "=== $1 ($(date -u +%H:%M:%S), ${SECONDS}s of the run)"; }
# limit WANT MIN: WANT seconds or what is left of the budget; 0 when under MIN seconds are left.
limit() { local left=$((END - SECONDS)); if [ "$left" -lt "$2" ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi; }
# step NAME WANT MIN NOTE_FILE CMD...: CMD with at most WANT seconds (SIGINT at the limit, SIGKILL 15 s
# later), skipped when under MIN seconds are left (it could not finish); its status goes to the
# summary, with the last line of NOTE_FILE (or '-') as the note.
step() {
  local name=$1 want=$2 min=$3 note_file=$4; shift 4
  header "$name"
  local t; t=$(limit "$want" "$min")
  if [ "$t" -eq 0 ]; then
    echo "SKIPPED: $((END - SECONDS)) s of the budget left, the step needs $min"
    record "$name" SKIP 0 "budget: $((END - SECONDS)) s left, needs $min"; return 0
  fi
  local t0=$SECONDS rc
  rm -f "$NOTES/note"
  # A child bash runs the step (functions exported): timeout signals its whole process group, and
  # every tee inside a step ignores SIGINT (-i), so a cut pytest still gets its summary out.
  timeout -s INT -k 15 "$t" bash -c '"$@"' _ "$@"
  rc=$?
  local note="-"
  [ "$note_file" != - ] && [ -s "$note_file" ] && note=$(grep -v '^\s*$' "$note_file" | tail -1 | cut -c1-110)
  if [ "$rc" -eq 0 ]; then record "$name" PASS $((SECONDS - t0)) "$note"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then record "$name" TIMEOUT $((SECONDS - t0)) "cut at ${t}s: $note"; FAILED=1
  else record "$name" FAIL $((SECONDS - t0)) "exit $rc: $note"; FAILED=1
  fi
  return 0
}
skip() { header "$1"; echo "SKIPPED: $2"; record "$1" SKIP 0 "$2"; }

finish() {
  trap - EXIT INT TERM
  rm -rf "$NOTES"
  header "done: $(find "$OUT" -maxdepth 1 -type f | wc -l) files in \$OUT"
  exec 1>&3 2>&4 3>&- 4>&-
  for _ in $(seq 50); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done
  local body; body=$(mktemp)
  cat "$LOG" >"$body"
  {
    echo "gpu_check summary ($([ "$DRY" = 1 ] && echo "DRY RUN: CPU-side parts only" || echo "GPU run")," \
         "git $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +dirty)," \
         "$((SECONDS - START)) s of a ${BUDGET_S:-400} s budget): $( [ "$FAILED" = 0 ] && echo OK || echo FAILURES)"
    cat "$SUMMARY"
    echo "-------------------------------------------------------------------------------------------"
    cat "$body"
  } >"$LOG"
  rm -f "$body"
  cat "$SUMMARY"
  exit "$FAILED"
}
trap finish EXIT
trap 'echo "interrupted"; FAILED=1; exit' INT TERM

export OUT PY DRY ROOT NOTES

# ---- environment ------------------------------------------------------------------------------------
env_info() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  else echo "nvidia-smi: not found"; fi
  $PY - <<'EOF'
import platform, sys
import setuptools, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| setuptools", setuptools.__version__, "|", platform.machine())
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible")
try:
    import liger_kernel.transformers  # noqa: F401
    import liger_kernel
    print("liger-kernel", getattr(liger_kernel, "__version__", "?"), "importable")
except Exception as exc:
    print(f"liger-kernel not importable: {type(exc).__name__}: {exc}")
EOF
  if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not found"; fi
  if command -v compute-sanitizer >/dev/null; then compute-sanitizer --version | tail -1; else echo "compute-sanitizer: not found"; fi
  echo "git $(git rev-parse --short HEAD 2>/dev/null)"
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  header "wheels carried in .whl (Liger-Kernel)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export -f env_info
step environment 20 5 - env_info

# ---- build ------------------------------------------------------------------------------------------
# setuptools >= 77 reads `license = "Apache-2.0"` (PEP 639); older ones reject it when setup.py loads
# pyproject.toml. Then the build runs in a copy with the table form, and the modules are copied back.
old_setuptools() { $PY -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) >= 77)"; }
prepare_build_copy() {  # prints the folder
  local dir; dir=$(mktemp -d)
  cp -r setup.py pyproject.toml README.md csrc fastkd "$dir"/
  sed -i 's/^license = "\([^"]*\)"/license = {text = "\1"}/' "$dir/pyproject.toml"
  echo "$dir"
}
build() {
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FASTKD_REQUIRE_CUDA=1
  local src=$ROOT
  if old_setuptools || [ "${GPU_CHECK_BUILD_COPY:-0}" = 1 ]; then
    src=$(prepare_build_copy)
    echo "building in a copy ($src): $(grep '^license' "$src/pyproject.toml")"
    $PY -c "import tomllib, sys; tomllib.load(open(sys.argv[1], 'rb'))" "$src/pyproject.toml" || return 1
  fi
  if [ "$DRY" = 1 ]; then
    echo "dry run: not compiling; the extension already built here:"
  else
    # fastkd._C (CPU + CUDA sources in parallel), then the module fastkd._C_avx512 (csrc/**/*_avx512.cpp).
    (cd "$src" && $PY setup.py -q build_ext --inplace) || return 1
    [ "$src" = "$ROOT" ] || cp "$src"/fastkd/_C*.so "$ROOT/fastkd/"
  fi
  FASTKD_REQUIRE_EXTENSION=1 $PY -c "import fastkd; print('kernels:', fastkd.kernel_info())" || return 1
  [ "$DRY" = 1 ] || FASTKD_REQUIRE_EXTENSION=1 $PY -c "import fastkd, sys; sys.exit(fastkd.kernel_info()['cuda'] != 'cuda')"
}
export -f old_setuptools prepare_build_copy build
step build 240 60 - build
grep -q '^build .*PASS' "$SUMMARY" || BUILD_OK=0
export FASTKD_REQUIRE_EXTENSION=1

# ---- CUDA tests: one pytest process per file, the KD kernels first ------------------------------------
pytest_file() {  # pytest_file FILE...: the cuda-marked tests (collection only in a dry run)
  local mode=(--durations=15 --maxfail=25)
  [ "$DRY" = 1 ] && mode=(--collect-only)
  $PY -m pytest -q -m cuda -p no:cacheprovider "${mode[@]}" "$@" 2>&1 \
    | tee -i -a "$OUT/cuda_tests.log" | tee -i "$NOTES/pytest_last.log"
  local rc=${PIPESTATUS[0]}
  grep -E '([0-9]+ (passed|failed|errors?|skipped|deselected)|tests? collected|no tests ran).* in [0-9.]+s' \
    "$NOTES/pytest_last.log" | tail -1 | tr -d '=' | sed 's/^ *//' >"$NOTES/note"
  return "$rc"
}
export -f pytest_file
if [ "$BUILD_OK" = 1 ]; then
  step tests:kd 100 30 "$NOTES/note" pytest_file tests/ops/test_kd_loss_cuda.py
  step tests:topk 90 30 "$NOTES/note" pytest_file tests/ops/test_topk_kd_loss_cuda.py
  step tests:clip 40 15 "$NOTES/note" pytest_file tests/ops/test_clip.py
  step tests:fused 40 15 "$NOTES/note" pytest_file tests/ops/test_fused_linear_kd_loss_cuda.py
else
  skip tests:kd "build failed"; skip tests:topk "build failed"; skip tests:clip "build failed"
  skip tests:fused "build failed"
fi

# ---- the headline benchmark, then the launch configurations -------------------------------------------
if [ "$DRY" = 1 ]; then
  DEV=cpu; HEADLINE="--quick --shapes 64x2048 --dtypes bfloat16"
else
  DEV=cuda; HEADLINE="--shapes 8192x128256 --dtypes bfloat16"
fi
kd_headline() {  # the benchmark, then its fastkd fwd+bwd row as the step's note
  $PY -m bench.bench_kd_loss --device "$DEV" $HEADLINE --modes fwd,fwd+bwd \
    --providers fastkd,eager,liger_kl --out "$OUT/kd_headline_$DEV.csv" || return 1
  $PY - "$OUT/kd_headline_$DEV.csv" >"$NOTES/note" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
by = {(r["provider"], r["mode"]): r for r in rows}
r = by.get(("fastkd", "fwd+bwd"))
if r:
    eager = by.get(("eager", "fwd+bwd"))
    ratio = f", eager {float(eager['median_ms']) / float(r['median_ms']):.2f}x" if eager else ""
    print(f"fastkd fwd+bwd {r['rows']}x{r['vocab']} {r['dtype']}: {float(r['median_ms']):.3g} ms, "
          f"{float(r['gbps']):.3g} GB/s ({float(r['pct_copy_ceiling']):.0f}% of copy){ratio}")
PYEOF
  cat "$NOTES/note"
}
export DEV HEADLINE
export -f kd_headline
if [ "$BUILD_OK" = 1 ]; then
  step bench:kd 60 25 "$NOTES/note" kd_headline
  step launch 20 10 - $PY -m bench.launch_configs --device $DEV
else
  skip bench:kd "build failed"; skip launch "build failed"
fi

# ---- compute-sanitizer ------------------------------------------------------------------------------
sanitize() {  # sanitize TOOL ARGS...: fastkd's kernels only (kns: a substring of the kernel's name)
  local tool=$1; shift
  if [ "$DRY" = 1 ]; then
    echo "dry run: the cases on the CPU (compute-sanitizer --tool $tool not run)" | tee -a "$OUT/sanitizer.log"
    $PY -m bench.sanitize_cases --device cpu "$@" 2>&1 | tee -i -a "$OUT/sanitizer.log"
    return "${PIPESTATUS[0]}"
  fi
  echo "=== $tool" >>"$OUT/sanitizer.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --kernel-name kns=fastkd --error-exitcode 9 \
    $PY -m bench.sanitize_cases "$@" >>"$OUT/sanitizer.log" 2>&1
  local rc=$?
  grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|calls in|Error|error' "$OUT/sanitizer.log" | tail -6
  return $rc
}
export -f sanitize
if [ "$BUILD_OK" = 1 ]; then
  step memcheck 60 30 "$OUT/sanitizer.log" sanitize memcheck
  step racecheck 50 25 "$OUT/sanitizer.log" sanitize racecheck --trim
else
  skip memcheck "build failed"; skip racecheck "build failed"
fi

# ---- the rest of the benchmarks (each CSV written after every case) ------------------------------------
if [ "$BUILD_OK" = 1 ]; then
  QUICK=(); [ "$DRY" = 1 ] && QUICK=(--quick)
  KD_REST=(); [ "$DRY" = 1 ] && KD_REST=(--providers fastkd,eager)
  step bench:kd-grid 90 40 - $PY -m bench.bench_kd_loss --device $DEV ${QUICK[@]+"${QUICK[@]}"} \
    ${KD_REST[@]+"${KD_REST[@]}"} --out "$OUT/kd_loss_$DEV.csv"
  step bench:step 45 25 - $PY -m bench.bench_step --device $DEV ${QUICK[@]+"${QUICK[@]}"} --out "$OUT/step_$DEV.csv"
  step bench:clip 45 20 - $PY -m bench.bench_clip --device $DEV ${QUICK[@]+"${QUICK[@]}"} --out "$OUT/clip_$DEV.csv"
  # The top-k KD loss: its CSV stays in the scratch folder; the table it prints is in gpu_check.log.
  TOPK=(); [ "$DRY" = 1 ] && TOPK=(--quick --providers fastkd,fastkd_dense,eager)
  step bench:topk 90 40 - $PY -m bench.bench_topk --device $DEV ${TOPK[@]+"${TOPK[@]}"} --out "$NOTES/topk_kd_loss_$DEV.csv"
  # The fused linear + KD loss at Liger's shape (8192 x 4096 -> 128256, bf16): its table in gpu_check.log only.
  FUSED=(); [ "$DRY" = 1 ] && FUSED=(--quick --providers fastkd,fastkd_unfused,gemms)
  step bench:fused 90 40 - $PY -m bench.bench_fused_linear --device $DEV ${FUSED[@]+"${FUSED[@]}"} \
    --out "$NOTES/fused_linear_$DEV.csv"
else
  skip bench:kd-grid "build failed"; skip bench:step "build failed"; skip bench:clip "build failed"
  skip bench:topk "build failed"; skip bench:fused "build failed"
fi
rm -rf "$NOTES"
