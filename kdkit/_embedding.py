"""Runs whose student outputs an embedding, not class logits (the Jetson tutorial's recipe).

``resnet18(num_classes=512)`` distilled with ``{("fc", "embedding"): FeatureMSE()}`` outputs
a 512-d embedding. A cross-entropy of that output against class labels would treat the 512
dimensions as classes, and its top-1 would rank epochs by noise. So such a run
(:func:`output_pair`) gets no task loss, and is scored by what means something for it:

- the teacher's own head on the student's embedding (a CLIP teacher's probe or zero-shot
  classifier, ``teacher.head``): top-1 / top-5 / loss, best epoch by top-1;
- otherwise the pair's loss on the validation data (``pair_loss``, lower is better).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from kdkit.capture import resolve_module
from kdkit.metrics import classification_metrics
from kdkit.pairs import Pair

__all__ = ["output_pair", "best_metric_for", "evaluate_embedding"]


def _last_leaf(student: nn.Module) -> str:
    leaves = [n for n, m in student.named_modules() if n and not any(True for _ in m.children())]
    return leaves[-1] if leaves else ""


def output_pair(student: nn.Module, pairs: Sequence[Pair]) -> Pair | None:
    """The pair that distils the student's output (``""`` or its last layer) into a teacher
    *feature* (not the teacher's logits), or None: then the output is an embedding."""
    last = _last_leaf(student)
    for p in pairs:
        if p.teacher and p.student in ("", last):
            return p
    return None


def best_metric_for(teacher: Any, student: nn.Module, pair: Pair) -> tuple[str, bool]:
    """Top-1 through the teacher's head when it has one that takes the student's output
    (same width: no adapter between them), else the pair's val loss."""
    if not callable(getattr(teacher, "head", None)):
        return ("pair_loss", False)
    layer = resolve_module(student, pair.student) if pair.student else None
    width, dim = getattr(layer, "out_features", None), getattr(teacher, "embedding_dim", None)
    fits = width is None or dim is None or width == dim
    return ("top1", True) if fits else ("pair_loss", False)


@torch.no_grad()
def evaluate_embedding(
    distiller: Any,
    pair: Pair,
    batches: Iterable[Any],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """``pair_loss`` (mean over rows) of the student against the teacher on ``batches``, and
    with a teacher head, the classification scores of ``head(student embedding)``."""
    head = distiller.teacher.head if distiller.best_metric[0] == "top1" else None
    total = {"loss": 0.0, "rows": 0}

    def logits() -> Iterable[tuple[torch.Tensor, Any]]:
        for b in batches:
            with autocast():
                run = distiller.forward_both(b.x, b.index, b.view_ids, with_teacher=False)
                teacher_out = distiller.teacher_forward(b.x, b.index, b.view_ids)
                run = dataclasses.replace(run, teacher=teacher_out)  # also before start_epoch
                value = distiller.pair_loss(run, pair, b.labels)
            total["loss"] += float(value) * len(b.x)
            total["rows"] += len(b.x)
            if callable(head):
                yield head(run.output), b.labels

    scores: dict[str, float] = {}
    if callable(head):
        scores = classification_metrics(logits(), lambda z: z)
        scores.pop("images")
    else:
        for _ in logits():
            pass
    scores["pair_loss"] = total["loss"] / max(total["rows"], 1)
    return scores
