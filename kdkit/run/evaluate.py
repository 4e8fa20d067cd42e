"""Top-1 / top-5 / cross-entropy of any logits function on a labeled loader.

The same arithmetic as :meth:`kdkit.Trainer.evaluate` (counts, then one division), so
``kdkit eval RUN`` reproduces the val top-1 stored in the run's ``best.pt`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from kdkit.errors import KDError

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
    from kdkit.data.views import prepare_input
    from kdkit.train.metrics import topk_correct
    from kdkit.train.precision import Precision

    autocast = Precision(precision, device).autocast
    correct1 = correct5 = n = 0
    loss_sum = 0.0
    for batch in loader:
        x, y = batch[0], batch[1]
        x = prepare_input(x, None, None, None, mean, std, device)
        y = y.to(device)
        with autocast():
            logits = logits_of(x).float()
        keep = y >= 0
        logits, y = logits[keep], y[keep]
        c1, c5 = topk_correct(logits, y)
        correct1, correct5, n = correct1 + c1, correct5 + c5, n + y.numel()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
    if n == 0:
        raise KDError("the evaluation data holds no labeled images")
    return {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": loss_sum / n,
        "images": n,
    }
