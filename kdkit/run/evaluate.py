"""Top-1 / top-5 / cross-entropy of any logits function on a labeled loader (``kdkit eval``).

The counting is :func:`kdkit.metrics.classification_metrics`, the Trainer's own, so
``kdkit eval RUN`` reproduces the val top-1 stored in the run's ``best.pt`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from kdkit.data.pipeline import InputPipeline
from kdkit.metrics import classification_metrics
from kdkit.train.precision import Precision

__all__ = ["evaluate_logits"]


@torch.no_grad()
def evaluate_logits(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """``logits_of(normalised batch)`` scored on ``loader``'s labeled rows (-1 rows skipped)."""
    inputs = InputPipeline(None, mean, std, device=device)
    batches = ((b.x, b.labels) for b in (inputs(batch, augment=False) for batch in loader))
    return classification_metrics(batches, logits_of, Precision(precision, device).autocast)
