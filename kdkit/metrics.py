"""Top-1 / top-5 / cross-entropy of a classifier on labeled batches: the one evaluation loop.

On the ground floor: the image task (:mod:`kdkit.distiller`), the embedding probe and
``kdkit eval`` count with it, and none of them should import the training loop's package.

:meth:`kdkit.Distiller.evaluate` (the Trainer's val metrics) and ``kdkit eval RUN``
(:func:`kdkit.run.evaluate.evaluate_logits`) both count here (counts, then one division), so
``kdkit eval`` reproduces the val top-1 stored in a run's ``best.pt`` exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from kdkit.errors import KDError

__all__ = ["classification_metrics", "topk_correct"]


def topk_correct(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[int]:
    """Number of rows whose label is among the top-k predictions, for each k (k capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top == labels[:, None]
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def classification_metrics(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Score ``logits_of(x)`` on ``(x, labels)`` batches; rows labeled -1 are skipped.

    Returns ``top1`` and ``top5`` in percent, ``loss`` (mean cross-entropy) and ``images``.
    The model runs under ``autocast``; the scores are computed in fp32 outside it.
    """
    correct1 = correct5 = n = 0
    loss_sum = 0.0
    for x, y in batches:
        if y is None:
            raise KDError("evaluation needs labels: yield (images, labels[, indices])")
        with autocast():
            logits = logits_of(x)
        logits = logits.float()
        y = y.to(logits.device)
        keep = y >= 0
        logits, y = logits[keep], y[keep]
        c1, c5 = topk_correct(logits, y)
        correct1, correct5, n = correct1 + c1, correct5 + c5, n + y.numel()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))  # one host sync a batch
    if n == 0:
        raise KDError("the evaluation data holds no labeled samples")
    return {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": loss_sum / n,
        "images": n,
    }
