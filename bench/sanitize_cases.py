"""Small calls of every CUDA kernel, for compute-sanitizer (memcheck, racecheck) in bench/gpu_check.sh.

Covers each kernel variant: kd_loss forward with and without gradient for every divergence, small and
large vocabularies (warp- and block-per-row paths), odd sizes and offsets (scalar and vector loads),
mixed dtypes, ignored rows, the in-place scale; the clipping kernels when they are present.
"""

import torch

import fastkd


def kd_cases(dev):
    g = torch.Generator(device=dev).manual_seed(0)
    for vocab in (1, 7, 769, 4099, 32000):
        for sd, td in ((torch.float32, torch.float32), (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)):
            base_s = torch.randn(5, vocab + 1, device=dev, generator=g)
            base_t = torch.randn(5, vocab + 1, device=dev, generator=g)
            for off in (0, 1):  # offset 1: misaligned rows, scalar-load path
                s = base_s[:, off:off + vocab].to(sd).requires_grad_(True)
                t = base_t[:, off:off + vocab].to(td)
                labels = torch.randint(0, vocab, (5,), device=dev, generator=g)
                labels[1] = -100
                for div, beta in (("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)):
                    for red in ("batchmean", "none"):
                        loss = fastkd.kd_loss(s, t, labels, temperature=2.0, divergence=div, beta=beta,
                                              hard_weight=0.3, reduction=red)
                        (loss * 0.5).sum().backward()
                        with torch.no_grad():
                            fastkd.kd_loss(s, t, labels, temperature=1.0, divergence=div, beta=beta)
    torch.cuda.synchronize()


def clip_cases(dev):
    if not hasattr(fastkd, "clip_grad_norm_"):
        return
    params = [torch.nn.Parameter(torch.randn(n, device=dev)) for n in (0, 1, 7, 1000, 65537)]
    params += [torch.nn.Parameter(torch.randn(33, 17, device=dev, dtype=torch.bfloat16))]
    for p in params:
        p.grad = torch.randn_like(p)
    for norm_type in (2.0, 1.0, float("inf"), 3.0):
        fastkd.clip_grad_norm_(params, 0.1, norm_type=norm_type)
        fastkd.clip_grad_norm_(params, 1e9, norm_type=norm_type)
    fastkd.clip_grad_value_(params, 0.01)
    torch.cuda.synchronize()


if __name__ == "__main__":
    dev = torch.device("cuda")
    print("backend:", fastkd.backend(dev))
    kd_cases(dev)
    clip_cases(dev)
    print("sanitize cases done")
