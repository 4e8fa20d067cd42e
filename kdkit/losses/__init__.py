"""Distillation losses. Each is an ``nn.Module`` called as ``loss(student, teacher, labels=None)``
and returning a scalar; inputs may be half precision, the arithmetic is fp32. A Distiller also
takes any other ``loss(student, teacher)`` callable (``nn.MSELoss()``, a plain function): labels
go only to losses whose signature asks for them (:mod:`kdkit.losses._call`).

- response (logits): :class:`SoftTargetKL`, :class:`HardLabel`, :class:`DKD`
- feature (activations): :class:`FeatureMSE`, :class:`CosineEmbedding`,
  :class:`AttentionTransfer`, :class:`MGD`
- relational (batch geometry): :class:`RKD`

:func:`topk_to_probs` / :func:`topk_to_logits` rebuild full teacher distributions from a
top-k cache. :data:`LOSSES` maps the names configs use (``soft_kl``, ``feature_mse``...) to classes.
"""

from kdkit.losses.feature import AttentionTransfer, CosineEmbedding, FeatureMSE
from kdkit.losses.mgd import MGD
from kdkit.losses.relational import RKD
from kdkit.losses.response import DKD, HardLabel, SoftTargetKL, topk_to_logits, topk_to_probs

__all__ = [
    "SoftTargetKL",
    "HardLabel",
    "DKD",
    "FeatureMSE",
    "CosineEmbedding",
    "AttentionTransfer",
    "MGD",
    "RKD",
    "topk_to_probs",
    "topk_to_logits",
    "LOSSES",
]

#: Loss names a config may use (``distill.pairs[].loss``); ``args`` go to the constructor.
LOSSES: dict[str, type] = {
    "soft_kl": SoftTargetKL,
    "hard": HardLabel,
    "dkd": DKD,
    "feature_mse": FeatureMSE,
    "cosine": CosineEmbedding,
    "attention": AttentionTransfer,
    "rkd": RKD,
    "mgd": MGD,
}
