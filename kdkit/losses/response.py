"""Response-based losses: the student matches the teacher's output distribution.

Every loss takes ``(student, teacher, labels=None)`` with logits of shape (N, C, ...): the class
dim is 1 and any trailing dims (pixels, tokens) are positions, each averaged like a sample.
Inputs in bf16/fp16 are upcast to fp32 before any softmax, so mixed precision changes only the
rounding of the inputs, never the loss formula.

The teacher may also be a :class:`~kdkit.losses.topk.TopK` (from a top-k cache): see
:func:`topk_to_logits` for how the full distribution is rebuilt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import KDError
from kdkit.losses._common import check_logits, check_temperature, kl_terms, upcast
from kdkit.losses.topk import (
    TeacherLogits,
    TopK,  # noqa: F401  (re-exported: kdkit.losses.response.TopK keeps working)
    as_topk,
    full_teacher_logits,
    tail_fill,  # noqa: F401  (re-exported)
    topk_to_logits,
    topk_to_probs,
)

__all__ = ["SoftTargetKL", "HardLabel", "DKD", "topk_to_logits", "topk_to_probs"]


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
        student = upcast(student)
        check_logits(student)
        if self.teacher_probs and as_topk(teacher) is None:
            p = full_teacher_logits(teacher, student, t)  # same shape checks, as-is values
            rows = _kl_rows_from_probs(p, student, t)
        else:
            rows = _kl_rows(full_teacher_logits(teacher, student, t), student, t)
        return rows.clamp_min(0).mean() * (t * t)  # a KL is >= 0; rounding must not flip it


def _kl_rows(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    """``KL(softmax(teacher/t) || softmax(student/t))`` per position, accurate at extreme
    temperatures (in the student's dtype).

    With ``d = (teacher - student) / t``, ``KL = E_p[d] - log E_q[exp(d)]``. The textbook
    ``sum p (log p - log q)`` in float32 carries a rounding error of about 1e-7 that the
    ``t**2`` factor multiplies: at t = 1000 it swamps the true value (and can be negative).
    Here the rows are computed in float64, and where every ``|d| < 1`` (high temperatures)
    ``log E_q[exp(d)]`` is taken as ``log1p(E_q[expm1(d)])``, which keeps the O(d^2) value
    instead of cancelling it away. A masked teacher class (logit -inf) has p = 0 and adds
    nothing."""
    dtype = student.dtype  # float32 (or float64, kept: gradcheck) after upcast
    teacher, student = teacher.double(), student.double()
    d = (teacher - student) / t
    p = F.softmax(teacher / t, dim=1)
    log_q = F.log_softmax(student / t, dim=1)
    masked = p == 0  # == (not <=): a NaN teacher still propagates NaN to the NaN guard
    mean_d = torch.where(masked, 0.0, p * torch.where(masked, 0.0, d)).sum(1)
    small = (torch.where(masked, 0.0, d).abs().amax(1, keepdim=True) < 1) & ~masked.any(
        1, keepdim=True
    )
    d_small = torch.where(small, d, 0.0)  # no overflow (nor NaN gradient) in the other branch
    log_small = torch.log1p((log_q.exp() * torch.expm1(d_small)).sum(1))
    log_big = torch.logsumexp(log_q + d, dim=1)
    return (mean_d - torch.where(small.squeeze(1), log_small, log_big)).to(dtype)


def _kl_rows_from_probs(p: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    """``KL(p || softmax(student/t))`` per position for given probabilities, in float64 and
    with ``p`` renormalized: float32 probabilities sum to 1 only within ~1e-7, and the
    ``t**2`` factor would multiply that into the value (4.4 instead of 0.12 at t = 1e4).
    Probabilities carry the rounding of their dtype: float64 ones give the exact value."""
    dtype = student.dtype
    p = p.double()
    p = p / p.sum(dim=1, keepdim=True)
    log_q = F.log_softmax(student.double() / t, dim=1)
    terms = torch.where(p == 0, 0.0, p * (torch.log(p) - log_q))
    return terms.sum(dim=1).to(dtype)


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
        student = upcast(student)
        check_logits(student)
        topk = as_topk(teacher)
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
            target = full_teacher_logits(teacher, student, 1.0).argmax(dim=1)
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
        student = upcast(student)
        check_logits(student)
        if student.shape[1] < 2:
            raise KDError(f"DKD needs at least 2 classes, got logits {tuple(student.shape)}")
        teacher = full_teacher_logits(teacher, student, t)
        target = self._target(teacher, labels).unsqueeze(1)
        mask = torch.zeros_like(student, dtype=torch.bool).scatter(1, target, True)
        # float64, and NCKD through the extreme-temperature KL of SoftTargetKL: the T^2 factor
        # multiplies float32 rounding into the value (0.976 vs 0.978 at T=100, < 0 at 1e5)
        s64, t64 = student.double(), teacher.double()
        tckd = _binary_kl(t64 / t, s64 / t, mask, target)
        nckd = _kl_rows(_others(t64, mask), _others(s64, mask), t)  # [positions]
        nckd = nckd.view(tckd.shape)
        loss = (self.alpha * tckd + self.beta * nckd).mean() * (t * t)
        return loss.to(student.dtype)


def _others(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The non-target logits of every position: ``(N, C, ...)`` -> ``(positions, C - 1)``,
    positions in the order of ``(N, ...)``."""
    c = z.shape[1]
    rows = z.movedim(1, -1).reshape(-1, c)
    return rows[~mask.movedim(1, -1).reshape(-1, c)].view(-1, c - 1)


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
    return kl_terms(lp_gt, lq_gt) + kl_terms(lp_rest, lq_rest)
