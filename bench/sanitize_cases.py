"""Small calls of every CUDA kernel, for compute-sanitizer (memcheck, racecheck) in bench/gpu_check.sh.

    python -m bench.sanitize_cases [--trim] [--only kd,topk,clip] [--device cuda|cpu]

Covers each kernel variant: kd_loss forward with and without gradient for every divergence, small and
large vocabularies (warp- and block-per-row paths, row caches that hold all or part of a row), the
sizes whose row cache lies in the shared-memory opt-in window ((48 KiB - static, 48 KiB]: fp32 6100,
16-bit 12200, mixed 16/32-bit 8100), odd sizes, offset views (scalar heads and tails), padded row
strides (the gradient's rows at another phase than the inputs'), rows in blocks (logits[:, :-1] and a
transpose of (B, S, V) tensors, read in place) with the terms output, mixed dtypes, ignored rows, the
in-place scale; topk_kd_loss forward with and without gradient (KL and JSD) on both row paths with
both duplicate-index checks (pairwise, and the shared-memory bitmap, in the opt-in window too: 400000
entries), labels inside and outside the support, value and index dtypes, more rows than the persistent
grid holds (bitmaps reused across rows); fused_linear_kd_loss and fused_linear_topk_kd_loss (fp32 and bf16, both reductions' paths); the
clipping kernels, also captured in a CUDA graph and replayed.

--trim: the cases racecheck gets (it tracks every shared-memory access: the KD block kernel's ~227 KiB
row cache makes the full set too slow): the KD block-per-row sizes and the top-k kernel's bitmap and
pairwise paths, two rows each. --device cpu runs the
same calls on the CPU: the GPU check's dry run (it checks this script, not the kernels).
memcheck must run with PYTORCH_NO_CUDA_MEMORY_CACHING=1: an access past a tensor's end that stays
inside a block of the caching allocator is otherwise not reported.
"""

from __future__ import annotations

import argparse
import time

import torch

import fastkd

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def kd_layouts(base, vocab, dtype):
    """The logits of one (rows, vocab) case in three layouts, converted to `dtype` before slicing (a
    `.to(dtype)` after the slice would make them contiguous again): contiguous, a view one element
    into a wider buffer (misaligned rows), the first `vocab` columns of a buffer padded to a multiple
    of 64 (aligned input rows, gradient rows at every phase)."""
    rows = base.shape[0]
    wide = base.to(dtype)
    padded = -(-vocab // 64) * 64 + 64
    pad = torch.zeros(rows, padded, device=base.device, dtype=dtype)
    pad[:, :vocab] = wide[:, :vocab]
    return {"contiguous": wide[:, :vocab].contiguous(), "offset": wide[:, 1:vocab + 1], "padded": pad[:, :vocab]}


def kd_case_list(trim: bool):
    """(vocab, student dtype, teacher dtype, rows, layouts)."""
    if trim:  # block-per-row sizes only: the warp kernel has no shared memory for racecheck to check
        return [(4099, F32, F32, 2, ("contiguous", "offset")), (6100, F32, F32, 2, ("contiguous",)),
                (12200, BF16, BF16, 2, ("padded",)), (8100, BF16, F32, 2, ("contiguous",)),
                (32000, BF16, BF16, 2, ("contiguous", "offset")), (128256, BF16, BF16, 2, ("contiguous",))]
    cases = []
    for vocab in (1, 7, 769, 2048, 2049, 4099, 32000):
        for sd, td in ((F32, F32), (BF16, F16), (F16, BF16)):
            cases.append((vocab, sd, td, 5, ("contiguous", "offset", "padded")))
    cases += [(6100, F32, F32, 5, ("contiguous", "offset", "padded")),   # the opt-in windows
              (12200, BF16, BF16, 5, ("contiguous", "offset", "padded")),
              (8100, BF16, F32, 5, ("contiguous", "offset", "padded")),
              (8100, F32, F16, 5, ("contiguous", "padded")),
              (50257, BF16, BF16, 3, ("padded", "offset")),
              (128256, BF16, BF16, 2, ("contiguous", "offset"))]
    return cases


def kd_cases(dev, trim=False):
    g = torch.Generator(device=dev).manual_seed(0)
    calls = 0
    divergences = (("kl", 0.5), ("jsd", 0.3)) if trim else (("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3))
    for vocab, sd, td, rows, layouts in kd_case_list(trim):
        base_s = torch.randn(rows, vocab + 1, device=dev, generator=g)
        base_t = torch.randn(rows, vocab + 1, device=dev, generator=g)
        ss, ts = kd_layouts(base_s, vocab, sd), kd_layouts(base_t, vocab, td)
        labels = torch.randint(0, vocab, (rows,), device=dev, generator=g)
        labels[1] = -100
        for layout in layouts:
            s = ss[layout].detach().requires_grad_(True)
            t = ts[layout]
            for div, beta in divergences:
                for red in (("batchmean",) if trim else ("batchmean", "none")):
                    loss = fastkd.kd_loss(s, t, labels, temperature=2.0, divergence=div, beta=beta,
                                          hard_weight=0.3, reduction=red)
                    (loss * 0.5).sum().backward()  # grad_output != 1: the in-place scale kernel
                    calls += 1
                if not trim:
                    with torch.no_grad():
                        fastkd.kd_loss(s, t, labels, temperature=1.0, divergence=div, beta=beta)
                    calls += 1
    if not trim:
        calls += block_layout_cases(dev, g)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return calls


def block_layout_cases(dev, g):
    """Rows in blocks (RowBlocks: logits[:, :-1] and a transpose of (B, S, V) tensors) read in place by the KD and
    top-k KD kernels, both row paths, with the terms output (return_terms=True: row_terms)."""
    calls = 0
    for vocab in (769, 32000):
        base_s = torch.randn(3, 9, vocab, device=dev, generator=g).to(BF16)
        base_t = torch.randn(3, 9, vocab, device=dev, generator=g).to(BF16)
        for view in (lambda x: x[:, :-1], lambda x: x.transpose(0, 1)):
            s, t = view(base_s).detach().requires_grad_(True), view(base_t)
            labels = torch.randint(0, vocab, s.shape[:-1], device=dev, generator=g)
            loss, _ = fastkd.kd_loss(s, t, labels, temperature=2.0, divergence="jsd", return_terms=True)
            loss.backward()
            values, indices = t.float().topk(16, dim=-1)
            loss, _ = fastkd.topk_kd_loss(s, values, indices, labels, temperature=2.0, return_terms=True)
            loss.backward()
            calls += 2
    return calls


def topk_case_list(trim: bool):
    """(vocab, k, student dtype, values dtype, index dtype, rows, layouts)."""
    i32, i64 = torch.int32, torch.int64
    if trim:  # every kernel with shared memory: the bitmap (warp and block kernels), the block reductions
        return [(1000, 200, BF16, BF16, i64, 2, ("contiguous",)), (4099, 256, F32, F32, i64, 2, ("contiguous", "offset")),
                (32000, 64, BF16, BF16, i32, 2, ("contiguous",)), (128256, 256, BF16, BF16, i64, 2, ("contiguous",))]
    cases = []
    for vocab in (1, 7, 769, 2048, 2049, 32000):
        for k in (1, 12, 64, 256):
            if k <= vocab:
                cases.append((vocab, k, BF16 if k != 12 else F32, F16 if k == 64 else BF16, i32 if k == 64 else i64, 5,
                              ("contiguous", "offset", "padded")))
    cases += [(128256, 64, BF16, BF16, i64, 2, ("contiguous", "offset")),
              (128256, 256, BF16, F32, i32, 2, ("padded",)),
              (400000, 4096, F16, F16, i64, 2, ("contiguous",)),   # a bitmap past 48 KiB: the opt-in
              (4099, 4099, F32, F32, i64, 2, ("contiguous",)),     # K = V
              (700, 200, BF16, BF16, i64, 5000, ("contiguous",))]  # rows beyond the persistent grid
    return cases


def topk_cases(dev, trim=False):
    g = torch.Generator(device=dev).manual_seed(1)
    calls = 0
    for vocab, k, sd, vd, idt, rows, layouts in topk_case_list(trim):
        base_s = torch.randn(rows, vocab + 1, device=dev, generator=g)
        values, indices = torch.randn(rows, vocab, device=dev, generator=g).topk(k, dim=-1)
        values, indices = values.to(vd), indices.to(idt)
        labels = torch.randint(0, vocab, (rows,), device=dev, generator=g)
        labels[0] = indices[0, k // 2]  # a label inside the support
        if rows > 1:
            labels[1] = -100
        ss = kd_layouts(base_s, vocab, sd)
        for layout in layouts:
            s = ss[layout].detach().requires_grad_(True)
            for div in ("kl", "jsd"):
                loss = fastkd.topk_kd_loss(s, values, indices, labels, temperature=2.0, divergence=div, beta=0.3,
                                           hard_weight=0.3, reduction="batchmean" if trim else "none")
                (loss * 0.5).sum().backward()
                calls += 1
                if not trim:
                    with torch.no_grad():
                        fastkd.topk_kd_loss(s, values, indices, temperature=1.0, divergence=div, beta=0.3)
                    calls += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return calls


def clip_cases(dev, trim=False):
    params = [torch.nn.Parameter(torch.randn(n, device=dev)) for n in (0, 1, 7, 1000, 65537)]
    params += [torch.nn.Parameter(torch.randn(33, 17, device=dev, dtype=torch.bfloat16))]
    for p in params:
        p.grad = torch.randn_like(p)
    norm_types = (2.0,) if trim else (2.0, 1.0, float("inf"), 3.0)
    for norm_type in norm_types:
        fastkd.clip_grad_norm_(params, 0.1, norm_type=norm_type)
        fastkd.clip_grad_norm_(params, 1e9, norm_type=norm_type)
    fastkd.clip_grad_value_(params, 0.01)
    calls = 2 * len(norm_types) + 1
    if dev.type == "cuda":
        # Captured in a CUDA graph (the table written by kernels, the ticket counter reset by the last
        # block) and replayed twice.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fastkd.clip_grad_norm_(params, 0.1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fastkd.clip_grad_norm_(params, 0.1)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
        calls += 3
    return calls


def fused_linear_cases(dev, trim=False):
    """fused_linear_kd_loss and fused_linear_topk_kd_loss: fp32 and bf16 (the cublasGemmEx fp32 weight-gradient path), biases, softcap,
    chunks that do not divide the rows, ignored rows, reduction "none" (the backward's second pass)."""
    g = torch.Generator(device=dev).manual_seed(0)
    calls = 0
    for dtype in (F32, BF16):
        for vocab in ((2049,) if trim else (7, 2049, 32000)):
            rows, hs, ht = 11, 40, 24
            s_h = torch.randn(rows, hs, device=dev, generator=g).to(dtype).requires_grad_(True)
            s_w = (torch.randn(vocab, hs, device=dev, generator=g) * 0.2).to(dtype).requires_grad_(True)
            s_b = torch.randn(vocab, device=dev, generator=g).to(dtype).requires_grad_(True)
            t_h = torch.randn(rows, ht, device=dev, generator=g).to(dtype)
            t_w = (torch.randn(vocab, ht, device=dev, generator=g) * 0.2).to(dtype)
            labels = torch.randint(0, vocab, (rows,), device=dev, generator=g)
            labels[2] = -100
            for reduction, softcap in (("batchmean", None), ("none", 3.0)):
                loss, _ = fastkd.fused_linear_kd_loss(s_h, s_w, t_h, t_w, labels, student_bias=s_b, temperature=2.0,
                                                      hard_weight=0.3, reduction=reduction, softcap=softcap,
                                                      chunk_size=4, return_terms=True)  # (row_terms per chunk)
                loss.sum().backward()
                values, indices = (t_h.float() @ t_w.float().T).topk(min(vocab, 64), dim=-1)
                loss = fastkd.fused_linear_topk_kd_loss(s_h, s_w, values.to(dtype), indices, labels,
                                                        student_bias=s_b, temperature=2.0, hard_weight=0.3,
                                                        reduction=reduction, softcap=softcap, chunk_size=4)
                loss.sum().backward()
                calls += 2
    return calls


CASES = {"kd": kd_cases, "topk": topk_cases, "clip": clip_cases, "fused_linear": fused_linear_cases}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--trim", action="store_true", help="the shared-memory cases only, two rows each (racecheck)")
    ap.add_argument("--only", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    print("backend:", fastkd.backend(dev), "| kernels:", fastkd.kernel_info(), flush=True)
    for name in args.only.split(","):
        t0 = time.perf_counter()
        calls = CASES[name](dev, trim=args.trim)
        print(f"{name}: {calls} calls in {time.perf_counter() - t0:.1f} s", flush=True)
    print("sanitize cases done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
