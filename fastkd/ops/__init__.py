"""fastkd's operators, one module per op: its schemas (``torch.library``, namespace ``fastkd``), the
fallback registration of its pure-PyTorch maths (``fastkd.reference``), its fake kernels, its
autograd formula and its public wrapper. The compiled kernels (``csrc/<op>/``) register ``CPU`` and
``CUDA`` implementations of the same ops when ``fastkd._C`` loads (``fastkd/_extension.py``).

    kd.py    fastkd::kd_loss_fwd, kd_loss_terms_fwd, kd_loss_scale_-> fastkd.kd_loss, fastkd.KDLoss, fastkd.KDTerms
    topk.py  fastkd::topk_kd_loss_fwd, topk_kd_loss_terms_fwd (+ kd_loss_scale_) -> fastkd.topk_kd_loss, fastkd.TopKKDLoss
    fused_linear.py  fastkd::fused_linear_kd_loss_fwd, fused_linear_topk_kd_loss_fwd (+ kd_loss_scale_)
             -> fastkd.fused_linear_kd_loss, fastkd.FusedLinearKDLoss, fastkd.fused_linear_topk_kd_loss,
                fastkd.FusedLinearTopKKDLoss
    clip.py  fastkd::grad_norm, clip_grad_norm_, scale_grads_, clamp_grads_
                                                           -> fastkd.clip_grad_norm_ and friends
    labels.py  (no op) shift_labels: a causal LM's labels shifted, so the logits are read unsliced
"""

from . import clip, fused_linear, kd, labels, topk

__all__ = ["clip", "fused_linear", "kd", "labels", "topk"]
