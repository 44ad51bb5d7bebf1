"""What the reference modules share."""

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the maths runs in: fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


# The KD losses' argument values: one home, read by the ops' checks, the reference and the trainer.
DIVERGENCES = ("kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")
