"""TEMPORARY: replaced by the clip branch.

Stand-ins for ``fastkd.clip_grad_norm_`` / ``fastkd.clip_grad_value_`` that delegate to torch, so the
trainer can be written against the public fastkd API before the fused ops land. The lead drops this
file when merging the clip branch; nothing else imports it directly.
"""

from __future__ import annotations

import torch

__all__ = ["clip_grad_norm_", "clip_grad_value_"]


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> torch.Tensor:
    """TEMPORARY: torch.nn.utils.clip_grad_norm_, returning the fp32 total norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type,
                                          error_if_nonfinite=error_if_nonfinite, foreach=foreach).float()


def clip_grad_value_(parameters, clip_value: float, foreach: bool | None = None) -> None:
    """TEMPORARY: torch.nn.utils.clip_grad_value_."""
    torch.nn.utils.clip_grad_value_(parameters, clip_value, foreach=foreach)
