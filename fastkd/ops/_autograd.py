"""The autograd of the fused KD-loss ops (``fastkd::kd_loss_fwd``, ``fastkd::topk_kd_loss_fwd``).

Such an op returns (loss, grad), or (loss, grad, terms) for its ``*_terms_fwd`` twin (the soft and hard terms,
for logging: never differentiated): its kernel computes d(loss)/d(student) in the forward, for grad_output = 1,
when its last argument ``with_grad`` is true. The backward scales that saved gradient in place by the
incoming grad_output (``fastkd::kd_loss_scale_``, free when it is 1) and hands it to autograd, which adopts
it as the student's ``.grad`` without a copy. The student is the op's first input; no other input gets a
gradient.
"""

from __future__ import annotations

import torch

__all__ = ["register_fused_gradient"]


def register_fused_gradient(op: str, public: str, oracle: str) -> None:
    """Registers that autograd on ``fastkd::<op>``; ``public`` (e.g. ``"fastkd.kd_loss"``) and ``oracle`` (its
    reference, e.g. ``"fastkd.reference.kd_loss"``) name the wrapper and the alternative in the errors."""

    def setup_context(ctx, inputs, output):
        grad = output[1]
        ctx.mark_non_differentiable(*output[1:])
        # The second output never gets a gradient; materialising one would allocate and zero a tensor
        # as large as the logits on every backward.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad)
        ctx.with_grad = inputs[-1]
        ctx.n_inputs = len(inputs)
        ctx.consumed = False

    def backward(ctx, grad_loss, *_not_differentiable):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{public} does not support double backward (create_graph=True): its gradient is computed by a "
                f"fused kernel. Use {oracle} (or float64 inputs, which run it) for higher-order derivatives."
            )
        if not ctx.with_grad:
            raise RuntimeError(
                f"{public}: the gradient was not computed in the forward (with_grad=False); call the op through "
                f"{public}, which sets it when student_logits requires grad."
            )
        if ctx.consumed:
            raise RuntimeError(
                f"{public}: backward through the same loss twice (retain_graph=True) is not supported: the fused "
                "gradient is scaled in place by the first backward. Recompute the loss instead."
            )
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        rest = (None,) * (ctx.n_inputs - 1)
        if grad_loss is None:  # the loss did not reach the differentiated output
            return (None, *rest)
        # In place: free when grad_loss == 1 (loss.backward()), one pass over the gradient otherwise.
        torch.ops.fastkd.kd_loss_scale_(grad, grad_loss)
        return (grad, *rest)

    torch.library.register_autograd(f"fastkd::{op}", backward, setup_context=setup_context)
