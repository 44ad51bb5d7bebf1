"""bench/gpu_check.sh without a GPU: its dry run (DRY_RUN=1) runs every step's CPU-side part (the
build's setuptools workaround, the CUDA tests' collection, the benchmarks' and sanitizer cases'
code on the CPU, the launch arithmetic) and writes what a GPU run writes; a spent budget skips steps
and still leaves the summary on top of the log."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastkd import _extension

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["environment", "build", "tests:kd", "tests:topk", "tests:clip", "tests:fused", "bench:kd", "launch",
         "memcheck", "racecheck", "bench:kd-grid", "bench:step", "bench:clip", "bench:topk", "bench:fused"]

pytestmark = [pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                 reason="needs bash and coreutils' timeout"),
              pytest.mark.skipif(_extension.EXT is None, reason="needs the compiled extension")]


def run_script(out: Path, **env):
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DRY_RUN="1", **env)
    full.pop("FASTKD_DISABLE_EXTENSION", None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=900, cwd=ROOT)
    summary = [line.split(None, 3) for line in (out / "summary.txt").read_text().splitlines()]
    return proc, summary, (out / "gpu_check.log").read_text()


def test_spent_budget_skips_every_step_and_keeps_the_summary(tmp_path):
    proc, summary, log = run_script(tmp_path, BUDGET_S="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [s[0] for s in summary] == STEPS
    assert all(s[1] == "SKIP" for s in summary), summary
    first = log.splitlines()[0]
    assert first.startswith("gpu_check summary (DRY RUN") and first.endswith(": OK"), first
    assert log.splitlines()[1].startswith("environment      SKIP")


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path):
    # GPU_CHECK_BUILD_COPY=1: the build copy with the pre-PEP 639 license form (setuptools < 77) too.
    proc, summary, log = run_script(tmp_path, BUDGET_S="400", GPU_CHECK_BUILD_COPY="1")
    assert [s[0] for s in summary] == STEPS, summary
    assert all(s[1] == "PASS" for s in summary), "\n".join(" ".join(s) for s in summary) + proc.stdout[-3000:]
    assert proc.returncode == 0
    lines = log.splitlines()
    assert lines[0].startswith("gpu_check summary (DRY RUN") and lines[0].endswith(": OK")
    assert [line.split()[0] for line in lines[1:1 + len(STEPS)]] == STEPS  # the summary on top
    assert 'license = {text = "Apache-2.0"}' in log  # the build copy's pyproject.toml parsed
    assert "tests collected" in dict((s[0], s[3]) for s in summary)["tests:kd"]
    assert "h200" in log and "blocks_per_sm" in log  # the launch table
    # What a GPU run brings back: at most 8 files, every one written.
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(["gpu_check.log", "summary.txt", "cuda_tests.log", "sanitizer.log", "kd_headline_cpu.csv",
                            "kd_loss_cpu.csv", "step_cpu.csv", "clip_cpu.csv"]), files
    assert all((tmp_path / f).stat().st_size > 0 for f in files)
