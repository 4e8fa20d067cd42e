"""Distillation losses. Each is an ``nn.Module`` called as ``loss(student, teacher, labels=None)``
and returning a scalar; inputs may be half precision, the arithmetic is fp32.

- response (logits): :class:`SoftTargetKL`, :class:`HardLabel`, :class:`DKD`
- feature (activations): :class:`FeatureMSE`, :class:`CosineEmbedding`,
  :class:`AttentionTransfer`
- relational (batch geometry): :class:`RKD`

:func:`topk_to_probs` / :func:`topk_to_logits` rebuild full teacher distributions from a
top-k cache.
"""

from kdkit.losses.feature import AttentionTransfer, CosineEmbedding, FeatureMSE
from kdkit.losses.relational import RKD
from kdkit.losses.response import DKD, HardLabel, SoftTargetKL, topk_to_logits, topk_to_probs

__all__ = [
    "SoftTargetKL",
    "HardLabel",
    "DKD",
    "FeatureMSE",
    "CosineEmbedding",
    "AttentionTransfer",
    "RKD",
    "topk_to_probs",
    "topk_to_logits",
]
