"""Fused global-norm gradient clipping: a drop-in for ``torch.nn.utils.clip_grad_norm_``.

The ops' one home: schemas, fallback registration (``fastkd.reference.clip``), fake kernels and the
public functions. Compiled kernels: ``csrc/clip/``.

``clip_grad_norm_(parameters, max_norm)`` is ``get_total_norm`` then ``clip_grads_with_norm_``, as in
torch. The gradients are grouped by (device, dtype) and each group costs one call of
``fastkd::grad_norm`` (one pass over its gradients) and one of ``fastkd::scale_grads_`` (which returns
at once when the coefficient is >= 1); per-group norms are combined with tensor ops in fp32. No host
synchronisation happens anywhere unless ``error_if_nonfinite=True``.

Differences from torch (docs/clipping.md): the norm is accumulated and returned in fp32 whatever the
gradient dtype (fp64 for fp64 gradients; torch returns a bf16/fp16 norm for bf16/fp16 gradients); with
DTensor gradients (FSDP2) or ``process_group=`` the returned norm is already the global one.
"""

from __future__ import annotations

import math
import sys
import types
import warnings

import torch
import torch.nn.utils.clip_grad as _torch_clip
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from ..reference import clip as reference

__all__ = [
    "clip_grad_norm_",
    "get_total_norm",
    "clip_grads_with_norm_",
    "clip_grad_value_",
    "nonfinite_flag",
    "step_if_finite",
    "patch_torch_clip_grad",
]

_LIB = torch.library.Library("fastkd", "FRAGMENT")

# ---- the ops: schemas, fallback (reference) kernels and fake kernels ---------------------------------
# One call per device/dtype group of gradients (the functions below group them): the CPU kernels are
# csrc/clip/clip_cpu.cpp, the CUDA ones csrc/clip/clip_cuda.cu (multi-tensor launches,
# csrc/common/multi_tensor.cuh).
#   grad_norm:    the group's norm (fp32; fp64 for fp64 grads) as a 0-d tensor on the group's device.
#   scale_grads_: grads *= min(max_norm / (total_norm + 1e-6), 1), the coefficient computed on the
#                 device from the 0-d total_norm; the kernels do nothing when it is >= 1.
#   clamp_grads_: grads clamped to [-clip_value, clip_value].
#   clip_grad_norm_: grad_norm then scale_grads_ in one call, for the common case of one group on one
#                 process (one list conversion and, on CUDA, one table upload instead of two).
_LIB.define("grad_norm(Tensor[] grads, float norm_type) -> Tensor")
_LIB.define("clip_grad_norm_(Tensor(a!)[] grads, float max_norm, float norm_type) -> Tensor")
_LIB.define("scale_grads_(Tensor(a!)[] grads, Tensor total_norm, float max_norm) -> ()")
_LIB.define("clamp_grads_(Tensor(a!)[] grads, float clip_value) -> ()")

_LIB.impl("grad_norm", reference.grad_norm, "CompositeExplicitAutograd")
_LIB.impl("scale_grads_", reference.scale_grads_, "CompositeExplicitAutograd")
_LIB.impl("clamp_grads_", reference.clamp_grads_, "CompositeExplicitAutograd")
_LIB.impl("clip_grad_norm_", reference.clip_grad_norm_, "CompositeExplicitAutograd")


@torch.library.register_fake("fastkd::grad_norm")
def _grad_norm_fake(grads, norm_type):
    torch._check(len(grads) > 0, lambda: "fastkd::grad_norm: empty gradient list")
    dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    return grads[0].new_empty((), dtype=dtype)


@torch.library.register_fake("fastkd::clip_grad_norm_")
def _clip_grad_norm_fake(grads, max_norm, norm_type):
    return _grad_norm_fake(grads, norm_type)


@torch.library.register_fake("fastkd::scale_grads_")
def _scale_grads_fake(grads, total_norm, max_norm):
    return None


@torch.library.register_fake("fastkd::clamp_grads_")
def _clamp_grads_fake(grads, clip_value):
    return None


# torch's own functions, captured at import (before any patching): norm orders our kernels do not
# serve (0, -inf, negative p) are handed to torch's get_total_norm.
_TORCH_GET_TOTAL_NORM = torch.nn.utils.get_total_norm

try:  # torch.distributed is optional (some builds lack it)
    import torch.distributed as _dist
except ImportError:  # pragma: no cover - depends on the torch build
    _dist = None


def _dtensor_module():
    """``torch.distributed.tensor`` once anything has imported it, else None. No DTensor can exist before
    that module is loaded, so it is never imported here: importing it costs about a second, which
    ``import fastkd`` would otherwise pay for every user."""
    return sys.modules.get("torch.distributed.tensor")

_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _grads_of(parameters, *, warn_empty_generator: bool = False) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if warn_empty_generator and is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    grads = [p.grad for p in parameters]  # .grad is a property: read once per parameter
    return [g for g in grads if g is not None]


def _is_dtensor(t) -> bool:
    if type(t) in _PLAIN:
        return False
    mod = _dtensor_module()
    return mod is not None and isinstance(t, mod.DTensor)


def _groups(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by (device, dtype): one op call per group. torch's own grouping helper (C++,
    the one torch.nn.utils.clip_grad_norm_ and the foreach optimizers use)."""
    if not tensors:
        return []
    return [g for ([g], _) in _group_tensors_by_device_and_dtype([tensors]).values()]


def _kernel_order(p: float) -> bool:
    return p > 0  # 1, 2, inf, any p > 0: served by the ops; 0, -inf, negative p go to torch


class _Prepared:
    """The gradients of one call, grouped once for both passes: plain tensors by (device, dtype), and
    DTensors' local shards by (mesh, sharded mesh dims) then (device, dtype)."""

    __slots__ = ("plain", "domains", "device")

    def __init__(self, tensors: list[torch.Tensor]):
        self.device = tensors[0].device if tensors else None
        self.domains: list[tuple] = []
        if set(map(type, tensors)) <= _PLAIN or _dtensor_module() is None:
            self.plain = _groups(tensors)
            return
        plain, by_domain = [], {}
        for t in tensors:
            if _is_dtensor(t):
                by_domain.setdefault(_shard_groups(t), []).append(t.to_local())
            else:
                plain.append(t)
        self.plain = _groups(plain)
        self.domains = [(mesh, dims, _groups(locs)) for (mesh, dims), locs in by_domain.items()]
        if self.device is not None and _is_dtensor(tensors[0]):
            self.device = tensors[0].to_local().device

    def all_groups(self):
        yield from self.plain
        for _, _, groups in self.domains:
            yield from groups


def _combine(norms: list[torch.Tensor], p: float, device) -> torch.Tensor:
    """One norm from several (per group, per domain): fp32 (fp64 if one is fp64) tensor ops, no sync."""
    if len(norms) == 1:
        return norms[0]
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=dtype) for n in norms]), p)


def _real_view(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor's real and imaginary parts as a real tensor of the same memory (a lazily conjugated
    view is refused by torch here, with the fix, ``resolve_conj()``; torch's clipping refuses it too)."""
    return torch.view_as_real(t)


def _for_norm(group: list[torch.Tensor], p: float) -> list[torch.Tensor]:
    """What the norm kernels read for a group: the gradients; for complex ones what torch's norm is of,
    the moduli |z| (for p = 2 the real view: the sum of re^2 + im^2, without a temporary)."""
    if not group[0].is_complex():
        return group
    return [_real_view(t) if p == 2.0 else t.abs() for t in group]


def _local_norm(groups: list[list[torch.Tensor]], p: float, device) -> torch.Tensor:
    """The p-norm of local tensors: one ``fastkd::grad_norm`` call per (device, dtype) group."""
    if not _kernel_order(p):
        return _TORCH_GET_TOTAL_NORM([t for g in groups for t in g], p, False, None)
    return _combine([torch.ops.fastkd.grad_norm(_for_norm(g, p), p) for g in groups], p, device)


def _all_reduce_norm(norm: torch.Tensor, p: float, groups) -> torch.Tensor:
    """Global norm from per-rank norms: norm^p summed over the ranks (max for inf), then the root."""
    if not groups:
        return norm
    if not _kernel_order(p):
        raise NotImplementedError(f"fastkd.clip: sharded gradients need norm_type > 0 or inf, got {p}")
    if math.isinf(p):
        val = norm.clone()
        for g in groups:
            _dist.all_reduce(val, op=_dist.ReduceOp.MAX, group=g)
        return val
    val = norm.pow(p) if p != 1.0 else norm.clone()
    for g in groups:
        _dist.all_reduce(val, op=_dist.ReduceOp.SUM, group=g)
    return val.pow(1.0 / p) if p != 1.0 else val


def _shard_groups(dt) -> tuple:
    """(mesh, mesh dims over which dt is sharded): the process groups its norm^p is summed over."""
    mod = _dtensor_module()
    dims = []
    for i, pl in enumerate(dt.placements):
        if isinstance(pl, mod.Shard) or type(pl).__name__ in ("_StridedShard",):
            dims.append(i)
        elif not isinstance(pl, mod.Replicate):
            raise NotImplementedError(
                f"fastkd.clip: DTensor gradient with placement {pl} (only Shard and Replicate are supported; "
                "a Partial gradient must be reduced before clipping)"
            )
    return dt.device_mesh, tuple(dims)


@torch.no_grad()
def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None, *,
                   process_group=None) -> torch.Tensor:
    """The ``norm_type``-norm of ``tensors`` viewed as one vector (``torch.nn.utils.get_total_norm``).

    Accumulated and returned in fp32 (fp64 when a tensor is fp64), on the first tensor's device.
    DTensor inputs (FSDP2) are reduced over their mesh's sharded dimensions; plain tensors over
    ``process_group`` when given (every rank must call). ``foreach`` is accepted and ignored: the fused
    kernels serve every device. ``error_if_nonfinite=True`` costs one host sync (as in torch).
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    return _total_norm(_Prepared(tensors), float(norm_type), error_if_nonfinite, process_group)


def _total_norm(prep: _Prepared, p: float, error_if_nonfinite: bool, process_group) -> torch.Tensor:
    parts: list[torch.Tensor] = []
    if prep.plain or process_group is not None:
        if prep.plain:
            local = _local_norm(prep.plain, p, prep.plain[0][0].device)
        else:  # this rank has no plain gradients but must still join the all-reduce
            local = torch.zeros((), device=_pg_device(process_group, prep.device or torch.device("cpu")))
        parts.append(_all_reduce_norm(local, p, [process_group] if process_group is not None else []))
    for mesh, dims, groups in prep.domains:
        local = _local_norm(groups, p, groups[0][0].device)
        parts.append(_all_reduce_norm(local, p, [mesh.get_group(d) for d in dims]))

    if not parts:
        total = torch.tensor(0.0)  # no gradients: a zero norm, as torch
    else:
        total = _combine(parts, p, parts[0].device if prep.device is None else prep.device)

    if error_if_nonfinite and not bool(torch.isfinite(total)):  # the one (opt-in) host sync
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    meshes = {id(m): m for m, _, _ in prep.domains}
    if len(meshes) == 1 and not prep.plain:
        # Every rank holds the global norm: hand it back as a replicated DTensor, as code written for
        # torch's FSDP2 path expects (``total_norm.full_tensor()``).
        (mesh,) = meshes.values()
        mod = _dtensor_module()
        total = mod.DTensor.from_local(total, mesh, [mod.Replicate()] * mesh.ndim, run_check=False)
    return total


def _pg_device(process_group, default: torch.device) -> torch.device:
    """Device of the zero norm a rank without gradients contributes to the all-reduce."""
    if default.type != "cpu":
        return default
    backend = _dist.get_backend(process_group) if _dist is not None else "gloo"
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return default


@torch.no_grad()
def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor, foreach=None) -> None:
    """Scale the gradients in place by min(max_norm / (total_norm + 1e-6), 1)
    (``torch.nn.utils.clip_grads_with_norm_``). The coefficient is computed on the device by the kernel,
    which does nothing when it is >= 1 (the gradients then stay bit-identical)."""
    _scale(_Prepared(_grads_of(parameters)), float(max_norm), total_norm)


def _scale(prep: _Prepared, max_norm: float, total_norm: torch.Tensor) -> None:
    if prep.device is None:
        return
    if _is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()
    if total_norm.dtype not in (torch.float32, torch.float64):
        total_norm = total_norm.float()  # e.g. torch's bf16 norm: fastkd's coefficient is fp32
    on_device = {total_norm.device: total_norm}
    for group in prep.all_groups():
        device = group[0].device
        norm = on_device.get(device)
        if norm is None:
            # Non-blocking only towards an accelerator: a CPU kernel reads the value right away.
            norm = on_device[device] = total_norm.to(device, non_blocking=device.type != "cpu")
        if group[0].is_complex():  # real and imaginary parts times the real coefficient
            group = [_real_view(t) for t in group]
        torch.ops.fastkd.scale_grads_(group, norm, max_norm)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None, *, process_group=None) -> torch.Tensor:
    """Clip the gradients' global norm in place; returns the total norm before clipping.

    A drop-in for ``torch.nn.utils.clip_grad_norm_`` (same arguments and coefficient
    min(max_norm / (norm + 1e-6), 1)). ``parameters``: a tensor or any iterable of tensors (a generator
    too); parameters whose ``.grad`` is None are skipped; gradients may mix dtypes and devices.
    The norm is fp32 (fp64 for fp64 gradients) whatever the gradient dtype. ``process_group``: the
    gradients are local shards of parameters sharded over that group; DTensor gradients (FSDP2) are
    reduced over their own mesh. A non-finite norm is returned and, as in torch, scales the gradients to
    NaN; ``nonfinite_flag`` / ``step_if_finite`` skip the optimizer step without a host sync.
    """
    prep = _Prepared(_grads_of(parameters, warn_empty_generator=True))
    p = float(norm_type)
    if len(prep.plain) == 1 and not prep.domains and process_group is None and _kernel_order(p) \
            and not error_if_nonfinite and not prep.plain[0][0].is_complex():
        # The common case, one (device, dtype) group on one process: norm and scale in one op call.
        return torch.ops.fastkd.clip_grad_norm_(prep.plain[0], float(max_norm), p)
    total = _total_norm(prep, p, error_if_nonfinite, process_group)
    _scale(prep, float(max_norm), total)
    return total


@torch.no_grad()
def clip_grad_value_(parameters, clip_value: float, foreach=None) -> None:
    """Clamp every gradient element to [-clip_value, clip_value] in place (``torch.nn.utils.clip_grad_value_``),
    one kernel call per (device, dtype) group. ``clip_value = nan`` makes every gradient NaN, as in torch.
    Complex gradients are refused, as by torch (``clamp`` has no meaning for them)."""
    clip_value = float(clip_value)
    groups = list(_Prepared(_grads_of(parameters)).all_groups())
    for group in groups:  # before any gradient is clamped
        if group[0].is_complex():
            raise NotImplementedError(
                f"fastkd.clip_grad_value_: a gradient is complex ({group[0].dtype}); complex numbers cannot be "
                "clamped (torch.nn.utils.clip_grad_value_ refuses them too). Clip the norm instead "
                "(fastkd.clip_grad_norm_ takes complex gradients), or clamp the real and imaginary parts: "
                "torch.view_as_real(p.grad).clamp_(-clip_value, clip_value)")
    for group in groups:
        torch.ops.fastkd.clamp_grads_(group, clip_value)


# ---- skipping a step on a non-finite norm, without a host sync ----------------------------------------
def nonfinite_flag(total_norm: torch.Tensor) -> torch.Tensor:
    """1.0 where ``total_norm`` is NaN or ±inf, else 0.0: an fp32 tensor on the norm's device, in the
    ``found_inf`` format of ``torch.amp.GradScaler`` (fused optimizers skip their update on it)."""
    if _is_dtensor(total_norm):
        total_norm = total_norm.to_local()
    return (~torch.isfinite(total_norm)).to(torch.float32)


def step_if_finite(optimizer: torch.optim.Optimizer, total_norm: torch.Tensor, closure=None):
    """``optimizer.step()`` unless ``total_norm`` (from ``clip_grad_norm_``) is non-finite.

    Fused optimizers (``torch.optim.Adam/AdamW/SGD/Adagrad(..., fused=True)``) take the decision on the
    device, with no host sync: they receive ``nonfinite_flag(total_norm)`` as GradScaler's ``found_inf``
    and leave parameters, moments and step counts untouched when it is 1. Any other optimizer costs one
    host sync (reading the flag), as GradScaler does for them. Returns what ``step`` returns (None when
    the step was skipped on the host)."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = nonfinite_flag(total_norm)
        try:
            return optimizer.step(closure) if closure is not None else optimizer.step()
        finally:
            del optimizer.found_inf
    local = total_norm.to_local() if _is_dtensor(total_norm) else total_norm
    if bool(torch.isfinite(local)):  # host sync: only for optimizers that cannot skip on the device
        return optimizer.step(closure) if closure is not None else optimizer.step()
    return None


# ---- patching torch ------------------------------------------------------------------------------------
_PATCH_TARGETS = (
    (torch.nn.utils, "clip_grad_norm_", clip_grad_norm_),
    (_torch_clip, "clip_grad_norm_", clip_grad_norm_),
    (torch.nn.utils, "clip_grad_value_", clip_grad_value_),
    (_torch_clip, "clip_grad_value_", clip_grad_value_),
    (torch.nn.utils, "get_total_norm", get_total_norm),
    (torch.nn.utils, "clip_grads_with_norm_", clip_grads_with_norm_),
)


class _TorchClipPatch:
    """Handle returned by ``patch_torch_clip_grad``: ``restore()`` (or leaving its ``with`` block) ends it.

    Handles count, whatever order they are restored in: torch's functions are fastkd's while any handle
    is active, and become again what they were before the first one once every handle is restored."""

    def __init__(self):
        if not _ACTIVE_PATCHES:  # the first handle: keep what torch's names hold now
            _SAVED_BEFORE_PATCH[:] = [(mod, name, getattr(mod, name)) for mod, name, _ in _PATCH_TARGETS
                                      if hasattr(mod, name)]
        for mod, name, fn in _PATCH_TARGETS:
            if hasattr(mod, name):
                setattr(mod, name, fn)
        _ACTIVE_PATCHES.append(self)

    def restore(self) -> None:
        """End this handle (again: nothing); the last active handle to end puts torch's functions back."""
        if self not in _ACTIVE_PATCHES:
            return
        _ACTIVE_PATCHES.remove(self)
        if not _ACTIVE_PATCHES:
            for mod, name, old in reversed(_SAVED_BEFORE_PATCH):
                setattr(mod, name, old)
            _SAVED_BEFORE_PATCH.clear()

    @property
    def active(self) -> bool:
        return self in _ACTIVE_PATCHES

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


# The handles not yet restored, and what torch's names held before the first of them.
_ACTIVE_PATCHES: list[_TorchClipPatch] = []
_SAVED_BEFORE_PATCH: list[tuple] = []


def patch_torch_clip_grad() -> _TorchClipPatch:
    """Make ``torch.nn.utils.clip_grad_norm_`` (also ``torch.nn.utils.clip_grad.clip_grad_norm_``,
    ``clip_grad_value_``, ``get_total_norm`` and ``clip_grads_with_norm_``) call fastkd's.

    Returns a handle: ``handle.restore()`` undoes it, and ``with fastkd.patch_torch_clip_grad(): ...``
    patches for the block only. Several handles may be active, and restored in any order: torch's own
    functions come back when the last one is restored. Code that imported the function by name before patching
    (``from torch.nn.utils import clip_grad_norm_``) keeps torch's."""
    return _TorchClipPatch()

