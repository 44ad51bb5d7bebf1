"""The one "did you mean" hint."""

from fastkd._suggest import did_you_mean


def test_did_you_mean():
    assert did_you_mean("max_grad_nrom", ["max_grad_norm", "clip_value"]) == " (did you mean 'max_grad_norm'?)"
    assert did_you_mean("cosin", {"constant": 1, "cosine": 2}) == " (did you mean 'cosine'?)"  # any iterable of names
    assert did_you_mean("zzz", ["adamw", "sgd"]) == ""
