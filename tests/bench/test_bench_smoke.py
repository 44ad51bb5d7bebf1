"""The benchmark grid runs (tiny cases, every benchmark) and writes what it claims; timings are not
checked here: speed is shown in bench/, never in tests."""

import copy
import csv

import pytest
import torch

import bench.__main__ as grid
from bench import bench_step, common, registry, report
from fastkd.data import TeacherCache
from fastkd.demos.byte_lm import ByteLM

MACHINE = ["cpu", "cores", "threads", "gpu", "torch", "cuda", "git", "date"]


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m bench --quick` into a temporary folder (torch.compile left out: its compiles take
    longer than the rest together); README.md, docs/benchmarks.md and bench/results must stay as they were."""
    out = tmp_path_factory.mktemp("bench")
    readme, docs = report.README.read_bytes(), report.DOCS.read_bytes()
    results = sorted((p.name, p.stat().st_mtime_ns) for p in common.RESULTS.iterdir())
    rc = grid.main(["--quick", "--device", "cpu", "--out-dir", str(out), "--kd-providers",
                    "fastkd,fastkd_dense,eager"])
    assert report.README.read_bytes() == readme and report.DOCS.read_bytes() == docs
    assert sorted((p.name, p.stat().st_mtime_ns) for p in common.RESULTS.iterdir()) == results
    return rc, out


def test_grid_writes_every_file(quick_run):
    rc, out = quick_run
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "cache_cpu_quick.csv", "clip_cpu_quick.csv", "clip_cpu_quick.png", "fused_linear_cpu_quick.csv",
        "fused_linear_cpu_quick.png", "hf_step_cpu_quick.csv", "kd_loss_causal_cpu_quick.csv", "kd_loss_cpu_quick.csv",
        "kd_loss_cpu_quick.png", "report_quick.md", "step_cpu_quick.csv", "topk_kd_loss_cpu_quick.csv",
        "trl_loss_cpu_quick.csv"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report_quick.md").read_text()
    for stem in ("headline", "kd_loss_cpu_quick", "kd_loss_causal_cpu_quick", "topk_kd_loss_cpu_quick",
                 "clip_cpu_quick", "step_cpu_quick", "cache_cpu_quick", "fused_linear_cpu_quick", "trl_loss_cpu_quick"):
        assert f"## {stem}\n" in md
    for stem in ("kd_loss_cpu_quick", "clip_cpu_quick", "fused_linear_cpu_quick"):
        assert f"![{stem}]({stem}.png)" in md
    assert "| provider" in md and "torch " + torch.__version__ in md


def test_fused_linear_rows(quick_run):
    rows = rows_of(quick_run[1] / "fused_linear_cpu_quick.csv")
    assert {r["provider"] for r in rows} >= {"fastkd", "fastkd_unfused", "eager", "gemms"}
    assert len({r["rows"] for r in rows}) >= 2  # memory and time against N
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert all(float(r["vs_gemms"]) == 1.0 for r in rows if r["provider"] == "gemms")


def test_kd_causal_rows(quick_run):
    """The causal-shift KD benchmark: logits[:, :-1] views (S = 16 in the quick run), fwd+bwd only."""
    rows = rows_of(quick_run[1] / "kd_loss_causal_cpu_quick.csv")
    assert {r["layout"] for r in rows} == {"causal 16"} and {r["mode"] for r in rows} == {"fwd+bwd"}
    assert {"fastkd", "eager"} <= {r["provider"] for r in rows}
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_kd_rows(quick_run):
    rows = rows_of(quick_run[1] / "kd_loss_cpu_quick.csv")
    assert {r["provider"] for r in rows} == {"fastkd", "eager"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert len({r["vocab"] for r in rows}) >= 2  # the plot's vocabulary axis
    assert len(rows) == len({(r["provider"], r["rows"], r["vocab"], r["dtype"], r["mode"]) for r in rows})
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert all(k in r for k in MACHINE) and r["torch"] == torch.__version__ and r["cpu"]
        if r["mode"] == "bwd":  # bwd is different work per provider: no GB/s and no ratio
            assert r["gbps"] == "" and r["fastkd_speedup"] == ""
        else:
            assert float(r["gbps"]) > 0 and float(r["fastkd_speedup"]) > 0


def test_topk_rows(quick_run):
    rows = rows_of(quick_run[1] / "topk_kd_loss_cpu_quick.csv")
    assert {r["provider"] for r in rows} == {"fastkd", "fastkd_dense", "eager"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert len(rows) == len({(r["provider"], r["rows"], r["vocab"], r["k"], r["dtype"], r["mode"]) for r in rows})
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert float(r["gbps"]) > 0 and float(r["fastkd_speedup"]) > 0 and int(r["k"]) <= int(r["vocab"])
        assert all(k in r for k in MACHINE)
    dense = {r["mode"]: float(r["gbps"]) * float(r["median_ms"]) for r in rows if r["provider"] == "fastkd_dense"}
    sparse = {r["mode"]: float(r["gbps"]) * float(r["median_ms"]) for r in rows if r["provider"] == "fastkd"}
    assert all(dense[m] > sparse[m] for m in dense)  # the dense loss's bytes count the whole teacher


def test_clip_rows(quick_run):
    rows = rows_of(quick_run[1] / "clip_cpu_quick.csv")
    assert {r["provider"] for r in rows} == {"fastkd", "torch_foreach", "torch_loop"}
    sweep = [r for r in rows if r["sweep"] == "True"]
    assert len({r["tensors"] for r in sweep}) >= 2 and len({r["elements"] for r in sweep}) == 1
    assert {r["clipped"] for r in rows} == {"True", "False"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["gbps"]) > 0 and all(k in r for k in MACHINE)


def test_step_rows(quick_run):
    rows = rows_of(quick_run[1] / "step_cpu_quick.csv")
    assert [(r["provider"], r["teacher"], r["head"]) for r in rows] == [
        ("reference", "online", "logits"), ("fastkd", "online", "logits"), ("fastkd", "online", "fused"),
        ("fastkd", "offline top-64 cache", "logits")]
    ref, fkd, fused, offline = rows
    assert float(offline["loss"]) > 0 and float(offline["grad_norm"]) > 0  # (checked against the oracle in the run)
    assert float(ref["loss"]) == pytest.approx(float(fkd["loss"]), rel=1e-4)
    assert float(fused["loss"]) == pytest.approx(float(fkd["loss"]), rel=1e-4)
    assert float(ref["grad_norm"]) == pytest.approx(float(fkd["grad_norm"]), rel=1e-3)
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and int(r["tokens"]) == int(r["batch"]) * int(r["seq"])
        assert all(k in r for k in MACHINE)


def test_hf_step_rows(quick_run):
    rows = rows_of(quick_run[1] / "hf_step_cpu_quick.csv")
    assert [r["provider"] for r in rows] == ["textbook", "fastkd"]
    assert float(rows[0]["first_loss"]) == pytest.approx(float(rows[1]["first_loss"]), rel=1e-3)
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["tokens_per_s"]) > 0 and all(k in r for k in MACHINE)


def test_trl_loss_rows(quick_run):
    rows = rows_of(quick_run[1] / "trl_loss_cpu_quick.csv")
    assert [r["provider"] for r in rows] == ["trl", "fastkd", "fastkd_fused"]
    for r in rows[1:]:
        assert float(r["loss"]) == pytest.approx(float(rows[0]["loss"]), rel=1e-5, abs=1e-6)
    for r in rows:
        assert float(r["median_ms"]) > 0 and int(r["tokens"]) == int(r["batch"]) * int(r["completion"])
        assert all(k in r for k in MACHINE)


def test_cache_rows(quick_run):
    rows = rows_of(quick_run[1] / "cache_cpu_quick.csv")
    assert [r["part"] for r in rows] == ["size"] * 3 + ["read"] * 3 + ["precision"] * 6
    for r in rows[:3]:  # the payload and a little header and offsets
        payload = int(r["top_k"]) * 6
        assert int(r["payload_bytes_per_token"]) == payload < float(r["bytes_per_token"]) < payload + 8
    assert [r["provider"] for r in rows[3:6]] == ["tokens", "tokens+cache", "tokens+cache, first read"]
    for r in rows[3:6]:
        assert float(r["median_ms"]) > 0 and float(r["verify_gbps"]) > 0 and all(k in r for k in MACHINE)
    for f16, bf16 in zip(rows[6::2], rows[7::2]):  # float16 keeps 3 more bits than bfloat16
        assert (f16["dtype"], bf16["dtype"]) == ("float16", "bfloat16") and f16["logit_std"] == bf16["logit_std"]
        assert 0 < float(f16["max_abs_err"]) < float(bf16["max_abs_err"]) / 4
        assert 0 < float(f16["kl_t1"]) < float(bf16["kl_t1"]) / 10


def test_step_refuses_an_offline_loss_that_is_not_the_oracles(tmp_path):
    torch.manual_seed(0)
    teacher, student = ByteLM(16, 1, seq_len=8, vocab=100), ByteLM(16, 1, seq_len=8, vocab=100)
    ids, labels = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    cache = TeacherCache.build(tmp_path / "c", teacher, [(ids[b], labels[b]) for b in range(2)],
                               top_k=bench_step.TOP_K, progress=False)
    loss, _ = bench_step.make_offline_step(copy.deepcopy(student), cache, ids, labels)()
    bench_step.check_offline_maths(student, cache, ids, labels, float(loss))
    with pytest.raises(RuntimeError, match="not the float64 top-k oracle's"):
        bench_step.check_offline_maths(student, cache, ids, labels, float(loss) * 1.001)


def test_step_refuses_different_maths():
    same = (torch.tensor(2.0), torch.tensor(0.5))
    steps = {"reference": lambda: same, "fastkd": lambda: (torch.tensor(2.1), torch.tensor(0.5))}
    with pytest.raises(RuntimeError, match="different things"):
        bench_step.check_same_maths(steps)
    agreed = bench_step.check_same_maths({"reference": lambda: same, "fastkd": lambda: same})
    assert agreed == {"reference": (2.0, 0.5), "fastkd": (2.0, 0.5)}


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="sees no CUDA GPU"):
        grid.main(["--quick", "--device", "cuda", "--only", "step", "--no-readme"])


def test_unknown_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit):
        grid.main(["--quick", "--only", "kd,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


def test_every_registered_benchmark_runs_alone():
    """A registry line names a module that `python -m` runs alone and a CSV stem the report knows."""
    assert [b.name for b in registry.BENCHES] == grid.NAMES
    for b in registry.BENCHES:
        assert callable(b.load().main)
        assert registry.of_csv(f"{b.stem}_cpu") is b and registry.of_csv(f"{b.stem}_cuda_quick") is b
        assert report.kind_of(common.RESULTS / f"{b.stem}_cpu.csv") == b.stem
    assert registry.of_csv("nothing_cpu") is None


def test_headline_is_fastkd_against_the_fastest_other_provider():
    """The headline row of a case: fastkd's median against the fastest other provider's median and
    fastkd_speedup, exactly as the CSV has them; the first matching case in the CSV's order."""
    def row(provider, rows, ms, speedup):
        return {"loss": "kl", "mode": "fwd+bwd", "dtype": "float32", "provider": provider, "rows": rows,
                "vocab": "32000", "median_ms": ms, "fastkd_speedup": speedup}

    rows = [row("fastkd", "4096", "83.3", "1.0"), row("eager", "4096", "2254", "27.1"),
            row("compile", "4096", "978", "11.7"), row("fastkd", "1024", "19.7", "1.0"),
            row("compile", "1024", "228", "11.5"), {**row("eager", "4096", "9", "0.1"), "mode": "fwd"}]
    (got,) = report.headline_rows(rows, registry.BY_NAME["kd"])
    assert got == {"what": "KD loss, fwd+bwd", "case": "4096 x 32000, float32", "fastkd median_ms": 83.3,
                   "fastest alternative": "compile", "its median_ms": 978.0, "fastkd_speedup": 11.7}


def test_report_refreshes_docs_and_readme_blocks_from_full_runs_only(quick_run, tmp_path, monkeypatch):
    """bench.report with no arguments: the CSVs of bench/results (here a stand-in folder) go into their
    blocks of docs/benchmarks.md with their plot linked, and their headline rows into the README's one
    block with the CSV linked; text outside the markers and *_quick.csv stay as they were."""
    results, readme, docs = tmp_path / "results", tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    results.mkdir()
    docs.parent.mkdir()
    for stem in ("kd_loss_cpu", "step_cpu"):
        (results / f"{stem}.csv").write_bytes((quick_run[1] / f"{stem}_quick.csv").read_bytes())
    (results / "clip_cpu_quick.csv").write_bytes((quick_run[1] / "clip_cpu_quick.csv").read_bytes())
    before = ("intro\n<!-- bench:kd_loss_cpu -->\nold\n<!-- /bench:kd_loss_cpu -->\nmiddle\n"
              "<!-- bench:step_cpu -->\n<!-- /bench:step_cpu -->\n<!-- bench:clip_cpu_quick -->\nkeep\n"
              "<!-- /bench:clip_cpu_quick -->\nend\n")
    docs.write_text(before)
    readme.write_text("front\n<!-- bench:headline -->\nold\n<!-- /bench:headline -->\nback\n")
    monkeypatch.setattr(common, "RESULTS", results.resolve())
    monkeypatch.setattr(report, "README", readme)
    monkeypatch.setattr(report, "DOCS", docs)
    assert report.main(["--no-readme"]) == 0  # the old flag still leaves both files alone
    assert docs.read_text() == before and "\nold\n" in readme.read_text()
    assert report.main([]) == 0
    text = docs.read_text()
    kd = text.split("<!-- bench:kd_loss_cpu -->\n")[1].split("<!-- /bench:kd_loss_cpu -->")[0]
    step = text.split("<!-- bench:step_cpu -->\n")[1].split("<!-- /bench:step_cpu -->")[0]
    assert "old" not in kd and "| provider" in kd and "(../results/kd_loss_cpu.png)" in kd
    assert (results / "kd_loss_cpu.png").exists() and not (results / "clip_cpu_quick.png").exists()
    assert "tokens_per_s" in step and "reference" in step and "fastkd" in step
    assert text.startswith("intro\n") and text.endswith("\nend\n")
    assert "\nmiddle\n" in text and "\nkeep\n" in text
    front = readme.read_text()
    top = front.split("<!-- bench:headline -->\n")[1].split("<!-- /bench:headline -->")[0]
    assert front.startswith("front\n") and front.endswith("\nback\n") and "old" not in top
    assert "KD loss, fwd+bwd" in top and "distillation training step" in top and "clip" not in top
    assert "[kd_loss_cpu.csv](results/kd_loss_cpu.csv)" in top
    assert "[step_cpu.csv](results/step_cpu.csv)" in top
    assert "`kd_loss_cpu.csv`: Machine: " in top and "torch " + torch.__version__ in top
