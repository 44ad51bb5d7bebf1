"""The benchmark scripts run (a tiny case, every provider) and write what they claim; timings are not
checked here: speed is shown in bench/, never in tests."""

import csv

import torch

from bench import bench_kd_loss, report


def test_kd_loss_benchmark_smoke(tmp_path):
    out = tmp_path / "kd.csv"
    assert bench_kd_loss.main(["--quick", "--device", "cpu", "--dtypes", "float32", "--providers",
                               "fastkd,eager", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert {r["provider"] for r in rows} == {"fastkd", "eager"}
    assert {r["mode"] for r in rows} == {"fwd+bwd", "fwd"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["gbps"]) > 0
        assert r["torch"] == torch.__version__ and r["cpu"]
    md = report.markdown(rows, "kd_loss")
    assert "| provider" in md.splitlines()[2] and "fastkd" in md
