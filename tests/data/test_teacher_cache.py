"""fastkd.TeacherCache: the stored top-k are the teacher's own torch.topk, builds resume and reuse, other
caches and damaged files are refused, and the wrapper dataset pairs examples with their entries.

The teacher is an embedding table read as logits (token -> a row of V logits): its output does not depend
on how examples are batched, so the cache can be compared bit for bit with torch.topk of each example."""

import json
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import fastkd
from fastkd.data import CachedExample, TeacherCacheError, teacher_cache

V, K = 37, 5


class TableLM(torch.nn.Module):
    """Logits [batch, seq, V] = table[ids]; counts its calls and, when told, fails after some."""

    def __init__(self, seed=0, scale=8.0, output="tensor"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=g) * scale)
        self.output, self.calls, self.fail_after, self.modes = output, 0, None, []

    def forward(self, input_ids):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.modes.append(self.training)
        logits = self.table[input_ids]
        if self.output == "object":
            return types.SimpleNamespace(logits=logits)
        if self.output == "tuple":
            return logits, None
        return logits


def tokens(n, length=6, seed=1):
    """n examples of token ids; length an int, or a function of the example's index."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (length(i) if callable(length) else length,), generator=g) for i in range(n)]


def lm_data(n, length=6, seed=1):
    return [(ids, ids.roll(-1)) for ids in tokens(n, length, seed)]


def expected(teacher, ids, dtype=torch.float16, k=K):
    top = teacher.table.detach()[ids].reshape(-1, V).topk(k)
    return top.values.to(dtype), top.indices.to(torch.int32)


def build(path, teacher, data, **kw):
    kw = {"top_k": K, "batch_size": 4, "progress": False, **kw}
    return fastkd.TeacherCache.build(path, teacher, data, **kw)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_entries(cache, teacher, inputs, dtype=torch.float16):
    assert len(cache) == len(inputs)
    for i, ids in enumerate(inputs):
        values, indices = cache[i]
        want_v, want_i = expected(teacher, ids, dtype)
        assert values.dtype == dtype and indices.dtype == torch.int32
        assert torch.equal(values, want_v) and torch.equal(indices, want_i), i


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_is_the_teachers_topk(tmp_path, dtype):
    teacher, data = TableLM(), lm_data(10)
    cache = build(tmp_path / "c", teacher, data, dtype=dtype)
    assert_entries(cache, teacher, [ids for ids, _ in data], dtype)
    assert (cache.top_k, cache.vocab_size, cache.dtype, cache.num_tokens) == (K, V, dtype, 60)
    assert cache.nbytes == sum(p.stat().st_size for p in (tmp_path / "c").glob("shard-*.safetensors"))
    assert cache.bytes_per_token == cache.nbytes / 60 and cache.bytes_per_token >= K * (2 + 4)
    assert teacher.calls == 3  # 10 examples in batches of 4
    reopened = fastkd.TeacherCache(tmp_path / "c", verify="open")
    assert_entries(reopened, teacher, [ids for ids, _ in data], dtype)
    values, _ = reopened[-1]
    assert torch.equal(values, expected(teacher, data[-1][0], dtype)[0])


def test_variable_lengths_and_empty_examples(tmp_path):
    teacher = TableLM()
    inputs = tokens(11, length=lambda i: [3, 0, 7, 1, 3][i % 5])
    cache = build(tmp_path / "c", teacher, [(x,) for x in inputs], batch_size=5, shard_bytes=300)
    assert_entries(cache, teacher, inputs)
    assert [cache[i][0].shape for i in range(5)] == [torch.Size([n, K]) for n in (3, 0, 7, 1, 3)]
    assert cache.num_tokens == sum(len(x) for x in inputs)
    assert len(cache.manifest["shards"]) > 1
    # Per batch of 5, one teacher call per distinct length: 4 + 4 + 1.
    assert teacher.calls == 9


@pytest.mark.parametrize("form", ["pair", "single", "dict", "bare", "object", "tuple"])
def test_item_and_output_forms(tmp_path, form):
    teacher = TableLM(output={"object": "object", "tuple": "tuple"}.get(form, "tensor"))
    inputs = tokens(5)
    items = {"pair": [(x, x) for x in inputs], "single": [(x,) for x in inputs],
             "dict": [{"input_ids": x, "labels": x} for x in inputs]}.get(form, inputs)
    cache = build(tmp_path / "c", teacher, items)
    assert_entries(cache, teacher, inputs)


def test_classifier_has_one_position_per_example(tmp_path):
    torch.manual_seed(0)
    teacher = torch.nn.Linear(3, V)
    xs = [(torch.randn(3), torch.tensor(i % V)) for i in range(6)]
    cache = build(tmp_path / "c", teacher, xs, batch_size=4)
    with torch.no_grad():
        logits = teacher(torch.stack([x for x, _ in xs]))
    for i in range(6):
        values, indices = cache[i]
        want = logits[i : i + 1].topk(K)
        assert values.shape == (1, K)
        # The stored values are the rounded logits of the teacher's batched call.
        assert torch.equal(values, want.values.half()) and torch.equal(indices, want.indices.int())


def test_resume_after_a_crash_runs_only_the_rest(tmp_path):
    data = lm_data(10)
    crashing = TableLM()
    crashing.fail_after = 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(tmp_path / "c", crashing, data, batch_size=3, shard_bytes=1)  # a shard per batch
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert not manifest["complete"] and [s["num_examples"] for s in manifest["shards"]] == [3, 3]
    with pytest.raises(TeacherCacheError, match="incomplete: its build stopped after 6 of 10"):
        fastkd.TeacherCache(tmp_path / "c")

    teacher = TableLM()
    cache = build(tmp_path / "c", teacher, data, batch_size=3, shard_bytes=1)
    assert teacher.calls == 2  # examples 6..8 and 9
    assert_entries(cache, teacher, [ids for ids, _ in data])
    whole = build(tmp_path / "whole", TableLM(), data, batch_size=3, shard_bytes=1)
    assert snapshot(tmp_path / "c") == snapshot(tmp_path / "whole")  # the same bytes, manifest included
    assert whole.manifest == cache.manifest


KILL_MID_WRITE = """
import os, signal, sys
import fastkd
# (On the way: `import fastkd` loads neither the cache nor safetensors; fastkd.TeacherCache does.)
assert "safetensors" not in sys.modules and "fastkd.data" not in sys.modules
fastkd.TeacherCache
assert "safetensors" in sys.modules
sys.path.insert(0, {here!r})
import test_teacher_cache as t
fsyncs, real_fsync = [0], os.fsync
def fsync(fd):  # the writes: manifest, then per shard the shard file and the manifest, each file + folder
    fsyncs[0] += 1
    if fsyncs[0] == 7:  # shard 1's file, written but not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync
t.build({path!r}, t.TableLM(), t.lm_data(10), batch_size=3, shard_bytes=1)
"""


def test_a_build_killed_mid_write_resumes(tmp_path):
    """A real SIGKILL while a shard is being written: the finished shard stays, the next build removes the
    temporary file and writes the rest, and the result is the uninterrupted build's, byte for byte. (The
    killed process also checks that `import fastkd` stays light: one interpreter start for both.)"""
    here = str(Path(__file__).resolve().parent)
    folder = tmp_path / "c"
    run = subprocess.run([sys.executable, "-c", KILL_MID_WRITE.format(here=here, path=str(folder))],
                         cwd=Path(here).parents[1])
    assert run.returncode == -9
    assert [p.name for p in folder.glob(".shard-00001.safetensors.*.tmp")]
    assert [s["file"] for s in json.loads((folder / "manifest.json").read_text())["shards"]] == [
        "shard-00000.safetensors"]
    teacher = TableLM()
    build(folder, teacher, lm_data(10), batch_size=3, shard_bytes=1)
    assert teacher.calls == 3  # examples 3..5, 6..8, 9
    build(tmp_path / "whole", TableLM(), lm_data(10), batch_size=3, shard_bytes=1)
    assert snapshot(folder) == snapshot(tmp_path / "whole")


def test_leftovers_of_a_killed_build_are_removed(tmp_path):
    data = lm_data(9)
    crashing = TableLM()
    crashing.fail_after = 1
    with pytest.raises(RuntimeError):
        build(tmp_path / "c", crashing, data, batch_size=3, shard_bytes=1)
    folder = tmp_path / "c"
    # What a kill leaves: a shard being written, a manifest being written, a shard renamed but not recorded.
    (folder / ".shard-00001.safetensors.x1.tmp").write_bytes(b"partial")
    (folder / ".manifest.json.x2.tmp").write_bytes(b"{")
    (folder / "shard-00001.safetensors").write_bytes(b"unrecorded")
    cache = build(folder, TableLM(), data, batch_size=3, shard_bytes=1)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "shard-00000.safetensors",
                                                       "shard-00001.safetensors", "shard-00002.safetensors"]
    assert_entries(cache, TableLM(), [ids for ids, _ in data])
    # A kill before the first shard leaves temporary files only: the folder counts as new.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".shard-00000.safetensors.x3.tmp").write_bytes(b"partial")
    assert len(build(tmp_path / "d", TableLM(), data)) == 9
    assert not list((tmp_path / "d").glob(".*"))


def test_a_finished_cache_is_reused_without_the_teacher(tmp_path):
    data = lm_data(8)
    build(tmp_path / "c", TableLM(), data)
    before = snapshot(tmp_path / "c")
    teacher = TableLM()
    cache = build(tmp_path / "c", teacher, data)
    assert teacher.calls == 0 and snapshot(tmp_path / "c") == before
    assert_entries(cache, teacher, [ids for ids, _ in data])


@pytest.mark.parametrize("change", ["teacher", "top_k", "dtype", "length", "content", "autocast"])
def test_another_cache_is_refused_and_kept(tmp_path, change):
    data = lm_data(8)
    build(tmp_path / "c", TableLM(), data, shard_bytes=1)  # two shards of 4 examples
    before = snapshot(tmp_path / "c")
    teacher, kw = TableLM(seed=1 if change == "teacher" else 0), {"shard_bytes": 1}
    if change == "top_k":
        kw["top_k"] = K + 1
    elif change == "dtype":
        kw["dtype"] = torch.bfloat16
    elif change == "length":
        data = data[:7]
    elif change == "content":
        data = [*data[:5], (data[5][0].flip(0), data[5][1]), *data[6:]]
    elif change == "autocast":
        kw["autocast"] = torch.bfloat16
    what = {"teacher": "teacher: TableLM weights", "top_k": f"top_k: {K} in the cache, {K + 1} asked",
            "dtype": "values_dtype: 'float16' in the cache, 'bfloat16' asked",
            "length": "num_examples: 8 in the cache, 7 asked", "content": r"another dataset .*examples 4\.\.7 differ",
            "autocast": "autocast: None in the cache, 'bfloat16' asked"}[change]
    with pytest.raises(ValueError, match=what) as err:
        build(tmp_path / "c", teacher, data, **kw)
    assert "nothing was overwritten" in str(err.value) and "another folder" in str(err.value)
    assert teacher.calls == 0 and snapshot(tmp_path / "c") == before


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TeacherCacheError, match=r"not a fastkd teacher cache \(notes.txt\); nothing was overwritten"):
        build(tmp_path, TableLM(), lm_data(3))
    assert snapshot(tmp_path) == {"notes.txt": b"mine"}


def shard0(tmp_path):
    data = lm_data(8)
    build(tmp_path / "c", TableLM(), data, shard_bytes=1)
    return tmp_path / "c" / "shard-00000.safetensors"


def test_truncated_shard(tmp_path):
    shard = shard0(tmp_path)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(TeacherCacheError, match="shard-00000.safetensors is .* bytes, the manifest recorded .*truncated"):
        fastkd.TeacherCache(tmp_path / "c")
    shard.unlink()
    with pytest.raises(TeacherCacheError, match="shard-00000.safetensors is missing"):
        fastkd.TeacherCache(tmp_path / "c")


def test_corrupt_byte_in_a_shard(tmp_path):
    shard = shard0(tmp_path)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40  # in the tensors' bytes: the size and the header stay valid
    shard.write_bytes(bytes(data))
    cache = fastkd.TeacherCache(tmp_path / "c")  # lazy: shard 0 is checked on its first read
    assert cache[7][0].shape == (6, K)  # another shard reads fine
    with pytest.raises(TeacherCacheError, match="shard-00000.safetensors is corrupt"):
        cache[0]
    with pytest.raises(TeacherCacheError, match="is corrupt"):
        fastkd.TeacherCache(tmp_path / "c", verify="open")
    with pytest.raises(TeacherCacheError, match="is corrupt"):
        pickle.loads(pickle.dumps(cache))[1]


@pytest.mark.parametrize("field,value", [("vocab_size", V + 1), ("top_k", K - 1), ("num_examples", 9)])
def test_tampered_manifest(tmp_path, field, value):
    shard0(tmp_path)
    file = tmp_path / "c" / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest["identity"][field] = value
    file.write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match="modified after it was written"):
        fastkd.TeacherCache(tmp_path / "c")
    # Rewritten with a valid digest (a manifest from elsewhere): the shards' headers still disagree.
    manifest["sha256"] = teacher_cache._digest(manifest)
    file.write_text(json.dumps(manifest))
    if field == "num_examples":
        with pytest.raises(TeacherCacheError, match="shards hold 8 examples, not 9"):
            fastkd.TeacherCache(tmp_path / "c")
    else:
        cache = fastkd.TeacherCache(tmp_path / "c", verify="size")
        with pytest.raises(TeacherCacheError, match=f"header says otherwise about {field}"):
            cache[0]


def test_check_refuses_another_dataset_or_vocabulary(tmp_path):
    build(tmp_path / "c", TableLM(), lm_data(4))
    fastkd.TeacherCache(tmp_path / "c", expect_examples=4, expect_vocab=V, expect_top_k=K)
    for kw, msg in [({"expect_examples": 5}, "examples 4 \\(expected 5\\)"),
                    ({"expect_vocab": 100}, f"vocab_size {V} \\(expected 100\\)"),
                    ({"expect_top_k": 8}, f"top_k {K} \\(expected 8\\)")]:
        with pytest.raises(TeacherCacheError, match=msg):
            fastkd.TeacherCache(tmp_path / "c", **kw)
    with pytest.raises(TeacherCacheError, match="holds no teacher cache"):
        fastkd.TeacherCache(tmp_path / "nothing")


def test_indexing(tmp_path):
    cache = build(tmp_path / "c", TableLM(), lm_data(4))
    with pytest.raises(IndexError, match="example 4 out of range for a cache of 4"):
        cache[4]
    with pytest.raises(IndexError):
        cache[-5]
    with pytest.raises(TypeError, match="must be an integer"):
        cache[1.0]
    assert torch.equal(cache[torch.tensor(2)][0], cache[2][0])


@pytest.mark.parametrize("workers", [0, 2])
def test_wrapper_dataset_with_a_shuffling_loader(tmp_path, workers):
    teacher, data = TableLM(), lm_data(12)
    ds = fastkd.CachedTeacherDataset(data, build(tmp_path / "c", teacher, data))
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        assert isinstance(batch, CachedExample)
        (ids, labels), values, indices = batch
        assert values.shape == (4, 6, K) and indices.dtype == torch.int32
        want = teacher.table.detach()[ids].topk(K)
        assert torch.equal(values, want.values.half()) and torch.equal(indices, want.indices.int())
        seen += ids.tolist()
    assert sorted(seen) == sorted(ids.tolist() for ids, _ in data)
    assert seen != [ids.tolist() for ids, _ in data]  # shuffled
    with pytest.raises(TeacherCacheError, match="examples 12 \\(expected 11\\)"):
        fastkd.CachedTeacherDataset(data[:11], tmp_path / "c")


class Stream(IterableDataset):
    def __iter__(self):
        yield from lm_data(3)


def test_bad_arguments(tmp_path):
    data = lm_data(3)
    for kw, msg in [({"top_k": 0}, "top_k must be a positive integer"),
                    ({"batch_size": 0}, "batch_size must be a positive integer"),
                    ({"shard_bytes": -1}, "shard_bytes must be a positive integer"),
                    ({"dtype": torch.float32}, "dtype must be torch.float16 or torch.bfloat16"),
                    ({"autocast": "yes"}, "autocast must be 'auto', None or a torch.dtype"),
                    ({"top_k": V + 1}, f"top_k={V + 1} is more than the teacher's vocabulary \\({V} logits")]:
        with pytest.raises(ValueError, match=msg):
            build(tmp_path / "c", TableLM(), data, **kw)
    assert not list((tmp_path / "c").iterdir())  # nothing written, not even a manifest
    with pytest.raises(TypeError, match="dataset must be map-style"):
        build(tmp_path / "c", TableLM(), Stream())
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        build(tmp_path / "c", lambda x: x, data)
    with pytest.raises(ValueError, match="the dataset is empty"):
        build(tmp_path / "c", TableLM(), [])
    with pytest.raises(ValueError, match="teacher's weights are on cpu; move it first"):
        build(tmp_path / "c", TableLM(), data, device="meta")
    with pytest.raises(ValueError, match="verify must be one of lazy, open, size, got 'opn' \\(did you mean 'open'"):
        fastkd.TeacherCache(tmp_path / "c", verify="opn")


def test_logits_beyond_float16_range(tmp_path):
    teacher, data = TableLM(scale=1e5), lm_data(3)
    with pytest.raises(ValueError, match="exceed torch.float16's range; store them as torch.bfloat16"):
        build(tmp_path / "a", teacher, data)
    cache = build(tmp_path / "b", teacher, data, dtype="bfloat16")
    assert_entries(cache, teacher, [ids for ids, _ in data], torch.bfloat16)


def test_teacher_runs_in_eval_mode_and_is_restored(tmp_path):
    teacher = TableLM().train()
    build(tmp_path / "c", teacher, lm_data(5))
    assert teacher.modes == [False, False] and teacher.training

