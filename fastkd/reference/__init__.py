"""Pure-PyTorch maths of every fastkd op, one module per op family (mirroring ``fastkd/ops/``).

These functions are three things at once: the fallback kernels of the ops (registered by each op's
module in ``fastkd/ops/`` for every device without a compiled kernel), the tests' oracle (run in
float64), and the benchmarks' baseline. They compute in fp32 at least (fp64 stays fp64).
"""

from .clip import clamp_grads_, clip_coef, clip_grad_norm_, clip_grad_norm_float64, grad_norm, scale_grads_
from .fused_linear import (
    fused_linear_kd_loss,
    fused_linear_kd_loss_fwd,
    fused_linear_topk_kd_loss,
    fused_linear_topk_kd_loss_fwd,
    head_logits,
)
from .kd import (
    kd_loss,
    kd_loss_and_grad,
    kd_loss_fwd,
    kd_loss_rows,
    kd_loss_scale_,
    kd_loss_terms_fwd,
    loss_terms,
    textbook_kd_loss,
)
from .topk import (
    textbook_topk_kd_loss,
    topk_kd_loss,
    topk_kd_loss_and_grad,
    topk_kd_loss_fwd,
    topk_kd_loss_rows,
    topk_kd_loss_terms_fwd,
)

__all__ = [
    "kd_loss_rows", "kd_loss", "kd_loss_and_grad", "kd_loss_fwd", "kd_loss_terms_fwd", "kd_loss_scale_", "loss_terms",
    "textbook_kd_loss",
    "topk_kd_loss_rows", "topk_kd_loss", "topk_kd_loss_and_grad", "topk_kd_loss_fwd", "topk_kd_loss_terms_fwd",
    "textbook_topk_kd_loss",
    "fused_linear_kd_loss", "fused_linear_kd_loss_fwd", "fused_linear_topk_kd_loss", "fused_linear_topk_kd_loss_fwd",
    "head_logits",
    "grad_norm", "clip_coef", "scale_grads_", "clamp_grads_", "clip_grad_norm_", "clip_grad_norm_float64",
]
