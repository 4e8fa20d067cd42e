"""Label checks at the boundary: class ids or -1 (unlabeled), refused early with a clear line."""

from __future__ import annotations

import torch

from kdkit.errors import KDError

__all__ = ["check_labels"]


def check_labels(labels: torch.Tensor, num_classes: int | None = None) -> None:
    """Labels are integer class ids in ``[0, num_classes)`` or ``-1`` (unlabeled); anything
    else (float labels, -5, a class id past the logits) is refused instead of being taken as
    unlabeled or failing deep in cross-entropy. Read on the CPU copy: no device sync (the
    input pipeline calls it before the step, on the host)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise KDError(
            f"labels must be integer class ids (int64), got {labels.dtype}; convert them with "
            "labels.long() (use -1 for unlabeled rows)"
        )
    if labels.device.type != "cpu" or not labels.numel():
        return
    low, high = int(labels.min()), int(labels.max())
    if low < -1 or (num_classes is not None and high >= num_classes):
        limit = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise KDError(
            f"labels must be class ids in {limit} or -1 for unlabeled rows; got values in "
            f"[{low}, {high}]"
        )
