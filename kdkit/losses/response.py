"""Response-based losses: the student matches the teacher's output distribution.

Every loss takes ``(student, teacher, labels=None)`` with logits of shape (N, C, ...): the class
dim is 1 and any trailing dims (pixels, tokens) are positions, each averaged like a sample.
Inputs in bf16/fp16 are upcast to fp32 before any softmax, so mixed precision changes only the
rounding of the inputs, never the loss formula.

The teacher may also be a :class:`~kdkit.teachers.base.TopK` (from a top-k cache): see
:func:`topk_to_logits` for how the full distribution is rebuilt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import KDError
from kdkit.teachers.base import TopK

__all__ = ["SoftTargetKL", "HardLabel", "DKD", "topk_to_logits", "topk_to_probs"]

TeacherLogits = torch.Tensor | TopK | tuple[torch.Tensor, torch.Tensor]

# With k = 1 the top-k carries no information about the spread of the logits; the tail is
# set this many temperatures below the top logit, i.e. it gets e^-50 of its mass (one-hot).
_K1_GAP = 50.0


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half types (softmax in bf16 loses ~3 digits); fp64 stays fp64 (gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_temperature(temperature: float) -> float:
    """A finite number > 0 (NaN, inf, 0, negatives and non-numbers are refused)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise KDError(f"temperature must be a number > 0, got {temperature!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise KDError(f"temperature must be a finite number > 0 (e.g. 4.0), got {temperature}")
    return float(temperature)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p * (log p - log q)`` with ``0 * log 0 = 0``: a teacher logit of -inf (a masked
    class) has p = 0 and contributes nothing, instead of NaN from ``0 * -inf``."""
    p = log_p.exp()
    # ``p == 0`` (not ``p > 0``) so that a NaN teacher still propagates NaN and is caught
    return torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q))


def _check_logits(student: torch.Tensor) -> None:
    if student.dim() < 2:
        raise KDError(
            f"expected student logits of shape (N, C, ...), got {tuple(student.shape)}; "
            "the class dim must be dim 1"
        )


def _as_topk(teacher: object) -> TopK | None:
    if isinstance(teacher, tuple) and len(teacher) == 2:
        return TopK(*teacher)
    return None


def _tail_fill(values: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
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
    values = _upcast(values)
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
    fill = _tail_fill(values, num_classes, temperature)
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


def _full_teacher_logits(
    teacher: TeacherLogits, student: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Teacher logits with the student's shape (a top-k is rebuilt); KDError on mismatch."""
    topk = _as_topk(teacher)
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
    return _upcast(teacher)


class SoftTargetKL(nn.Module):
    """Hinton soft targets: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged per sample.

    ``T^2`` keeps the gradient scale independent of the temperature, so the loss can be mixed
    with a hard-label loss without retuning the weight. "batchmean": the KL is summed over
    classes and averaged over every position (N * prod(...) for (N, C, ...) inputs), never
    divided by C.

    The teacher may be logits (default), a :class:`TopK` (rebuilt by :func:`topk_to_logits`
    at this temperature; its values are always logits), or, with ``teacher_probs=True``,
    probabilities that are used as-is:
    they must already be ``softmax(logits / T)`` at the temperature you want; the student is
    still divided by T and T^2 still applies.

    Ref: Hinton et al. 2015, arXiv:1503.02531.
    """

    def __init__(self, temperature: float = 1.0, teacher_probs: bool = False) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.teacher_probs = bool(teacher_probs)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, teacher_probs={self.teacher_probs}"

    def forward(
        self,
        student: torch.Tensor,
        teacher: TeacherLogits,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = self.temperature
        student = _upcast(student)
        _check_logits(student)
        log_q = F.log_softmax(student / t, dim=1)
        if self.teacher_probs and _as_topk(teacher) is None:
            p = _full_teacher_logits(teacher, student, t)  # same shape checks, as-is values
            kl = torch.xlogy(p, p) - p * log_q
        else:
            log_p = F.log_softmax(_full_teacher_logits(teacher, student, t) / t, dim=1)
            kl = _kl_terms(log_p, log_q)
        return kl.sum(dim=1).mean() * (t * t)


class HardLabel(nn.Module):
    """DeiT hard distillation: cross-entropy of the student against the teacher's argmax.

    Ignores ``labels`` (the true-label loss is the student's own task loss). Works with logits,
    probabilities or a :class:`TopK` teacher (argmax of the stored values, not assumed sorted).

    Ref: Touvron et al. 2021, arXiv:2012.12877.
    """

    def forward(
        self,
        student: torch.Tensor,
        teacher: TeacherLogits,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        student = _upcast(student)
        _check_logits(student)
        topk = _as_topk(teacher)
        if topk is not None:
            target = topk.indices.long().gather(1, topk.values.argmax(dim=1, keepdim=True))
            target = target.squeeze(1)
            if target.shape != student.shape[:1] + student.shape[2:]:
                raise KDError(
                    f"top-k teacher {tuple(topk.values.shape)} does not match student logits "
                    f"{tuple(student.shape)} outside the class dim"
                )
            if target.numel() and (int(target.min()) < 0 or int(target.max()) >= student.shape[1]):
                raise KDError(
                    f"top-k teacher predicts class {int(target.max())} but the student has "
                    f"{student.shape[1]} classes (logits {tuple(student.shape)})"
                )
        else:
            target = _full_teacher_logits(teacher, student, 1.0).argmax(dim=1)
        return F.cross_entropy(student, target)


class DKD(nn.Module):
    """Decoupled KD: ``alpha * TCKD + beta * NCKD``, each times T^2, averaged per sample.

    TCKD is the KL between the binary (target, rest) distributions of teacher and student;
    NCKD the KL between their distributions over the non-target classes only. Splitting them
    lets NCKD ("dark knowledge") be weighted up (beta = 8) without the teacher's confidence
    suppressing it. The target class is the label where ``labels >= 0`` and the teacher's
    argmax elsewhere (unlabeled rows, ``-1``) or when no labels are given.

    Ref: Zhao et al. 2022, arXiv:2203.08679.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        for name, w in (("alpha", alpha), ("beta", beta)):
            if not math.isfinite(w) or w < 0:
                raise KDError(f"{name} must be a finite number >= 0, got {w}")
        self.alpha, self.beta = float(alpha), float(beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"

    def _target(self, teacher: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        target = teacher.argmax(dim=1)
        if labels is None:
            return target
        if labels.shape != target.shape:
            raise KDError(
                f"labels {tuple(labels.shape)} do not match logits {tuple(teacher.shape)} "
                f"(expected {tuple(target.shape)})"
            )
        labels = labels.to(target.device).long()
        if labels.numel() and int(labels.max()) >= teacher.shape[1]:
            raise KDError(
                f"label {int(labels.max())} is out of range for {teacher.shape[1]} classes"
            )
        return torch.where(labels >= 0, labels, target)

    def forward(
        self,
        student: torch.Tensor,
        teacher: TeacherLogits,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = self.temperature
        student = _upcast(student)
        _check_logits(student)
        if student.shape[1] < 2:
            raise KDError(f"DKD needs at least 2 classes, got logits {tuple(student.shape)}")
        teacher = _full_teacher_logits(teacher, student, t)
        target = self._target(teacher, labels).unsqueeze(1)
        mask = torch.zeros_like(student, dtype=torch.bool).scatter(1, target, True)
        tckd = _binary_kl(teacher / t, student / t, mask, target)
        log_p = F.log_softmax((teacher / t).masked_fill(mask, float("-inf")), 1).masked_fill(
            mask, 0
        )
        log_q = F.log_softmax((student / t).masked_fill(mask, float("-inf")), 1).masked_fill(
            mask, 0
        )
        nckd = _kl_terms(log_p, log_q).masked_fill(mask, 0).sum(dim=1)
        return (self.alpha * tckd + self.beta * nckd).mean() * (t * t)


def _binary_kl(
    zt: torch.Tensor, zs: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """KL between (p_target, 1 - p_target) of teacher and student, in log space (stable)."""

    def log_split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.logsumexp(z, dim=1)
        return (
            z.gather(1, target).squeeze(1) - lse,
            torch.logsumexp(z.masked_fill(mask, float("-inf")), dim=1) - lse,
        )

    lp_gt, lp_rest = log_split(zt)
    lq_gt, lq_rest = log_split(zs)
    return _kl_terms(lp_gt, lq_gt) + _kl_terms(lp_rest, lq_rest)
