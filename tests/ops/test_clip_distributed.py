"""Global-norm clipping of sharded gradients: 2 CPU processes (gloo) spawned from pytest on a free
port, against the unsharded result computed in one process.

Three ways of sharding: plain local shards with ``process_group=``, DTensor gradients (Shard(0) and
Replicate placements on a 1-D mesh), and FSDP2 ``fully_shard``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import fastkd
from fastkd import reference

WORLD = 2
INF = float("inf")
SHAPES = [(6, 5), (9,), (4, 3, 7), (1, 11), (8,)]  # dim 0 of (1, 11) has one row: rank 1's shard is empty


def _full_grads(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(s, generator=g) * (i + 1)).to(dtype) for i, s in enumerate(SHAPES)]


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    # torch.chunk along dim 0, as DTensor's Shard(0) and FSDP2 split (the last ranks may get less or nothing)
    pieces = torch.chunk(t, WORLD, dim=0)
    return pieces[rank].clone() if rank < len(pieces) else t[0:0].clone()


def _with_grad(g):
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g
    return p


def _expected(max_norm, norm_type, dtype=torch.float32):
    full = _full_grads(dtype)
    norm, clipped = reference.clip_grad_norm_float64(full, max_norm, norm_type)
    return float(norm), clipped


def _check_process_group(rank):
    for norm_type in (1.0, 2.0, 3.0, INF):
        for dtype in (torch.float32, torch.bfloat16):
            exact, _ = _expected(1.0, norm_type, dtype)
            max_norm = 0.5 * exact
            _, clipped = _expected(max_norm, norm_type, dtype)
            params = [_with_grad(_shard(g, rank)) for g in _full_grads(dtype)]
            norm = fastkd.clip_grad_norm_(params, max_norm, norm_type, process_group=dist.group.WORLD)
            assert norm.dtype == torch.float32
            assert abs(float(norm) - exact) <= 2e-6 * exact, (rank, norm_type, dtype, float(norm), exact)
            tol = 4e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
            for p, c in zip(params, clipped):
                torch.testing.assert_close(p.grad.double(), _shard(c, rank), rtol=tol, atol=1e-7)
    # a rank without any gradient still joins the all-reduce (rank 1 passes an empty list)
    full = _full_grads()
    mine = full if rank == 0 else []
    norm = fastkd.get_total_norm([_shard(g, 0) for g in mine], process_group=dist.group.WORLD)
    exact = float(torch.linalg.vector_norm(torch.cat([_shard(g, 0).flatten() for g in full]).double()))
    assert abs(float(norm) - exact) <= 2e-6 * exact


def _check_dtensor(rank):

    mesh = init_device_mesh("cpu", (WORLD,))
    for norm_type in (2.0, INF, 1.0):
        full = _full_grads()
        exact, _ = _expected(1.0, norm_type)
        max_norm = 0.25 * exact
        _, clipped = _expected(max_norm, norm_type)
        params = []
        for i, g in enumerate(full):
            placement = [Replicate()] if i == 1 else [Shard(0)]  # one replicated gradient: not counted twice
            p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), mesh, placement))
            p.grad = distribute_tensor(g, mesh, placement)
            params.append(p)
        # torch's inf-norm refuses rank 1's empty shard of the (1, 11) gradient
        theirs_norm = None if norm_type == INF else torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        norm = fastkd.clip_grad_norm_(params, max_norm, norm_type)
        assert isinstance(norm, DTensor) and norm.placements == (Replicate(),)
        assert abs(float(norm.full_tensor()) - exact) <= 2e-6 * exact, (rank, norm_type, float(norm.full_tensor()), exact)
        if theirs_norm is not None:
            torch.testing.assert_close(norm.full_tensor(), theirs_norm.full_tensor(), rtol=2e-6, atol=0)
        for p, c in zip(params, clipped):
            torch.testing.assert_close(p.grad.full_tensor().double(), c, rtol=4e-6, atol=1e-9)


def _check_fsdp2(rank):

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))

    x = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    ref = model()
    ref(x).square().sum().backward()
    ref_params = list(ref.parameters())
    exact = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ref_params]).double()))
    ref_norm = fastkd.clip_grad_norm_(ref_params, 0.1 * exact)

    m = model()
    fully_shard(m, mesh=init_device_mesh("cpu", (WORLD,)))
    m(x).square().sum().backward()  # every rank the same batch: the averaged gradient equals ref's
    norm = fastkd.clip_grad_norm_(m.parameters(), 0.1 * exact)
    torch.testing.assert_close(norm.full_tensor(), ref_norm, rtol=2e-6, atol=0)
    for p, q in zip(m.parameters(), ref_params):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7)


CHECKS = {"process_group": _check_process_group, "dtensor": _check_dtensor, "fsdp2": _check_fsdp2}


def _worker(rank, check):
    CHECKS[check](rank)


@pytest.mark.parametrize("check", list(CHECKS))
def test_sharded_global_norm(check):
    if not dist.is_available():
        pytest.fail("torch.distributed is not available in this torch build")
    spawn_ranks(_worker, check, world=WORLD)
