"""Top-k teacher outputs and how the full distribution is rebuilt from them.

A top-k cache stores a :class:`TopK` (the k largest logits and their classes); the response
losses accept one wherever they accept logits. :class:`TopK` lives here, on the losses' floor,
so that a loss never imports the teacher protocol: :mod:`kdkit.teachers.base` imports it from
here (downward).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kdkit.errors import KDError
from kdkit.losses._common import upcast

__all__ = [
    "TeacherLogits",
    "TopK",
    "topk_to_logits",
    "topk_to_probs",
    "as_topk",
    "full_teacher_logits",
    "tail_fill",
]

log = logging.getLogger(__name__)


class TopK(NamedTuple):
    """Top-k teacher logits: ``values`` (N, k, ...) and their class ``indices`` (N, k, ...).

    The probability mass not covered by the k classes is spread evenly over the others (see
    :class:`kdkit.losses.SoftTargetKL`).
    """

    values: torch.Tensor
    indices: torch.Tensor


TeacherLogits = torch.Tensor | TopK | tuple[torch.Tensor, torch.Tensor]

# With k = 1 the top-k carries no information about the spread of the logits; the tail is
# set this many temperatures below the top logit, i.e. it gets e^-50 of its mass (one-hot).
_K1_GAP = 50.0


def as_topk(teacher: object) -> TopK | None:
    if isinstance(teacher, tuple) and len(teacher) == 2:
        return TopK(*teacher)
    return None


def tail_fill(values: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """One logit for every class outside the top k, shape (N, 1, ...); see topk_to_logits."""
    k = values.shape[1]
    v = values.sort(dim=1, descending=True).values
    v_min = v[:, -1:]
    if k == 1:
        return v_min - _K1_GAP * temperature
    skip = 1 if k >= 3 else 0  # the top class usually sits far above the bulk: leave it out
    ranks = torch.arange(1 + skip, k + 1, dtype=torch.float64, device=v.device)
    q = torch.special.ndtri(1.0 - (ranks - 0.375) / (num_classes + 0.25)).to(v.dtype)
    q = q.view(1, -1, *([1] * (v.dim() - 2)))
    y = v[:, skip:]
    q_mean, y_mean = q.mean(), y.mean(dim=1, keepdim=True)
    sigma = ((y - y_mean) * (q - q_mean)).sum(dim=1, keepdim=True) / ((q - q_mean) ** 2).sum()
    sigma = sigma.clamp_min(1e-6)  # ties: degenerate fit, the cap below takes over
    mu = y_mean - sigma * q_mean
    z_b = (v_min - mu) / sigma
    # T * log E[exp(z / T) | z < v_min] for z ~ N(mu, sigma^2)
    fill = (
        mu
        + sigma**2 / (2 * temperature)
        + temperature
        * (torch.special.log_ndtr(z_b - sigma / temperature) - torch.special.log_ndtr(z_b))
    )
    return torch.minimum(fill, v_min)


def topk_to_logits(
    values: torch.Tensor, indices: torch.Tensor, num_classes: int, temperature: float = 1.0
) -> torch.Tensor:
    """Full (N, C, ...) teacher logits rebuilt from its top-k ``values`` and ``indices``.

    The k stored classes keep their logits, so their probabilities relative to each other are
    exact. The other C - k classes all get one fill logit f, chosen so that their total mass
    matches the mass a Gaussian fit of the logits predicts below the k-th largest:
    the sorted top-k logits are regressed on normal quantiles at their ranks among C (Blom
    plotting positions, leaving out the top class, which is usually an outlier), and
    ``f = T log E[exp(z/T) | z < v_min]`` under that fit, capped at ``v_min`` (no tail class can
    exceed the smallest stored one). With k = C nothing is filled (exact); with k = 1 there is
    no spread to fit and the tail gets e^-50 of the top class (a one-hot target).

    Measured (total variation between rebuilt and true softmax(z/T); 0 is exact): on trained
    Fashion-MNIST MLP logits (C=10, k=5) 0.006 at T=1 and 0.058 at T=4, against 0.017 / 0.111
    for the simpler f = v_min; on C=1000 logits with a normal bulk and a peaked class (k=20,
    T=1) 0.091 against 0.373 (spreading the true tail mass evenly, the best any fill can do,
    gives 0.076). The fit assumes a roughly normal bulk: on heavy-tailed (Student-t) logits at
    T=4 it was worse than f = v_min (0.35 against 0.28).
    """
    values = upcast(values)
    if values.shape != indices.shape or values.dim() < 2:
        raise KDError(
            f"top-k values {tuple(values.shape)} and indices {tuple(indices.shape)} must have "
            "the same shape (N, k, ...)"
        )
    if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise KDError(f"top-k indices must be integers, got {indices.dtype}")
    k = values.shape[1]
    if indices.numel() and int(indices.min()) < 0:
        raise KDError(
            f"top-k class indices must be >= 0, got {int(indices.min())}; the cache or "
            "teacher output is corrupt (verify it with `kdkit cache verify`)"
        )
    if k > num_classes or (indices.numel() and int(indices.max()) >= num_classes):
        raise KDError(
            f"top-k teacher (values {tuple(values.shape)}, class indices up to "
            f"{int(indices.max())}) does not fit a student with {num_classes} classes; "
            "was the cache made with another teacher?"
        )
    indices = indices.long()
    if k == num_classes:
        return torch.zeros_like(values).scatter(1, indices, values)
    fill = tail_fill(values, num_classes, temperature)
    full = fill.expand(values.shape[0], num_classes, *values.shape[2:])
    return full.scatter(1, indices, values)


def topk_to_probs(
    values: torch.Tensor, indices: torch.Tensor, num_classes: int, temperature: float = 1.0
) -> torch.Tensor:
    """Full (N, C, ...) teacher probabilities ``softmax(logits / T)`` from a top-k.

    See :func:`topk_to_logits` for how the classes outside the top k are filled.
    """
    full = topk_to_logits(values, indices, num_classes, temperature)
    return F.softmax(full / temperature, dim=1)


def full_teacher_logits(
    teacher: TeacherLogits, student: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Teacher logits with the student's shape (a top-k is rebuilt); KDError on mismatch."""
    topk = as_topk(teacher)
    if topk is not None:
        teacher = topk_to_logits(topk.values, topk.indices, student.shape[1], temperature)
        if teacher.shape != student.shape:
            raise KDError(
                f"top-k teacher {tuple(topk.values.shape)} does not match student logits "
                f"{tuple(student.shape)} outside the class dim"
            )
        return teacher
    if not isinstance(teacher, torch.Tensor):
        raise KDError(f"expected teacher logits or a TopK, got {type(teacher).__name__}")
    if teacher.shape != student.shape:
        raise KDError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            f"differ (classes in dim 1: {student.shape[1]} vs "
            f"{teacher.shape[1] if teacher.dim() > 1 else '?'}); both must predict the same "
            "classes in the same order"
        )
    return upcast(teacher)
