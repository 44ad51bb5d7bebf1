"""What nvcc makes of the maths the CUDA kernels share with the CPU (csrc/kd_loss/kd_loss_math.h), read from
the PTX of a tiny kernel: no GPU needed, only nvcc.

The log-sum-exp merge must be bit-for-bit commutative: the two lanes of a shuffle exchange merge the
same pair in opposite orders and each normalises its own entries with the result. nvcc contracts
a * b + c * d into fma(a, b, c * d) by default, which rounds differently from fma(c, d, a * b).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")

KERNEL = r"""
#include "kd_loss/kd_loss_math.h"
extern "C" __global__ void merge(const fastkd::LseState* x, const fastkd::LseState* y, fastkd::LseState* o) {
  o[0] = fastkd::lse_merge(x[0], y[0]);
}
"""


def test_lse_merge_rounds_each_product_and_the_sum(tmp_path):
    src = tmp_path / "merge.cu"
    src.write_text(KERNEL)
    ptx = tmp_path / "merge.ptx"
    subprocess.run(["nvcc", "-arch=sm_90", "-ptx", "-O3", "-std=c++17", f"-I{ROOT / 'csrc'}", str(src), "-o", str(ptx)],
                   check=True, capture_output=True, timeout=300)
    text = ptx.read_text()
    products = re.findall(r"mul\.rn\.f32\s+(%f\d+),", text)
    sums = re.findall(r"add\.rn\.f32\s+%f\d+,\s*(%f\d+),\s*(%f\d+);", text)
    # s = x.s * exp(x.m - m) + y.s * exp(y.m - m): two explicitly rounded products (never fused
    # into a multiply-add) and their explicitly rounded sum.
    assert len(products) == 2 and len(sums) == 1, text
    assert set(sums[0]) == set(products), text
