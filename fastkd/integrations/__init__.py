"""Adapters for the trainers people already use, each imported only when asked for (its trainer is an
optional dependency: the extras ``fastkd[hf]``, ``fastkd[trl]``, ``fastkd[lightning]``):

    transformers.py  DistillationTrainer: a transformers.Trainer distilling with fastkd.kd_loss
    trl.py           generalized_jsd_loss (TRL's GKD loss on fastkd's kernels), GKDLossMixin, and
                     DistillationLossMixin (trl.DistillationTrainer's loss on fastkd.kd_loss)
    lightning.py     DistillationModule: a LightningModule distilling with fastkd.kd_loss

docs/integrations.md says what each does for the user and which pitfalls of hand-written versions it avoids.
"""
