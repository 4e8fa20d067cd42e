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

__all__ = ["DIRECTIONS", "classification_metrics", "direction", "check_best_metric", "topk_correct"]

#: Every metric kdkit logs (a ``metrics.csv`` column less its ``val_`` prefix; the training
#: losses ``loss_*`` are losses) and whether higher is better: early stopping's ``mode: auto``
#: and the task's ``best_metric`` (``best.pt``) both read it. None: a count, a speed or a
#: setting, not a score to optimize.
DIRECTIONS: dict[str, bool | None] = {
    "top1": True,  # % (image classification; an embedding student through the teacher's head)
    "top5": True,
    "agree": True,  # % top-1 agreement with the teacher (task: lm)
    "loss": False,  # mean cross-entropy (images); a task's own loss
    "pair_loss": False,  # an embedding student's distance to the teacher
    "ppl": False,  # perplexity (task: lm)
    "bpb": False,  # bits per byte of text (task: lm; compares models across tokenizers)
    "ce": False,  # cross-entropy per token (task: lm)
    "kl": False,  # mean KL(teacher || student) per token (task: lm)
    "tokens": None,
    "bytes": None,  # UTF-8 bytes of the scored tokens (task: lm)
    "images": None,
    "epoch": None,
    "epoch_time_s": None,
    "images_per_s": None,
    "tokens_per_s": None,
    "lr": None,
    "skipped_files": None,
}


def direction(column: str) -> bool | None:
    """Whether a higher value of the ``metrics.csv`` column (``val_kl``, ``loss_total``, or a
    bare name such as ``ppl``) is better; None for a count or a speed. A column kdkit does not
    log is a KDError: say which way it improves (``mode: min`` / ``max``)."""
    name = column.removeprefix("val_")
    if name.startswith("loss_"):
        return False
    if name not in DIRECTIONS:
        raise KDError(
            f"{column!r} is not a metric kdkit logs, so its direction is unknown (kdkit's: "
            f"{', '.join(k for k, v in DIRECTIONS.items() if v is not None)}); set "
            "early_stopping.mode: min or max"
        )
    return DIRECTIONS[name]


def check_best_metric(name: str, higher_is_better: bool) -> None:
    """A task's ``best_metric`` (what ``best.pt`` keeps) must run the way the table says."""
    known = DIRECTIONS.get(name)
    if known is not None and known != bool(higher_is_better):
        raise KDError(
            f"the task's best_metric ({name!r}, higher is better: {bool(higher_is_better)}) runs "
            f"the wrong way: {name} is {'higher' if known else 'lower'} is better "
            "(kdkit.metrics.DIRECTIONS); best.pt would keep the worst epoch"
        )


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
