"""The fused loss's arguments, checked before any work: every mistake is a one-line
:class:`~kdkit.errors.KDError` naming the argument (:func:`kdkit.lm.token_divergence`)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.lm.align import IGNORE_INDEX as _IGNORE  # the one -100 of kdkit.lm
from kdkit.lm.divergence import check_divergence
from kdkit.lm.logits import IDENTITY, OutputTransform
from kdkit.lm.targets import TeacherTarget, head_parts
from kdkit.losses._common import check_temperature

__all__ = ["Arguments", "check_arguments"]


class Arguments(NamedTuple):
    """The checked, normalized arguments: ``mask`` / ``labels`` flattened to ``[tokens]``
    (labels as int64 on the student's device), ``vocab`` the real shared vocabulary."""

    divergence: str
    temperature: float
    ce_weight: float
    weight: torch.Tensor
    bias: torch.Tensor | None
    lead: tuple[int, ...]
    vocab: int
    mask: torch.Tensor | None
    labels: torch.Tensor | None
    transform: OutputTransform = IDENTITY


def check_arguments(
    student_hidden: Any,
    student_head: nn.Linear | torch.Tensor,
    target: Any,
    *,
    divergence: str,
    mask: torch.Tensor | None,
    temperature: float,
    beta: float,
    skew: float,
    memory_budget_mb: float,
    vocab_size: int | None,
    labels: torch.Tensor | None,
    ce_weight: float,
    reduction: str,
    student_transform: OutputTransform | None = None,
) -> Arguments:
    """Every argument of :func:`kdkit.lm.token_divergence` (see there), checked."""
    divergence = check_divergence(divergence, beta=beta, skew=skew)
    temperature = check_temperature(temperature)
    ce_weight = _check_number("ce_weight", ce_weight, 0.0, 1.0)
    if reduction not in ("mean", "sum"):
        raise KDError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)):
        raise KDError(f"memory_budget_mb must be a number > 0 (e.g. 256), got {memory_budget_mb!r}")
    if not memory_budget_mb > 0:
        raise KDError(f"memory_budget_mb must be > 0 (e.g. 256), got {memory_budget_mb}")
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.dim() not in (2, 3):
        got = (
            tuple(student_hidden.shape)
            if isinstance(student_hidden, torch.Tensor)
            else student_hidden
        )
        raise KDError(f"student_hidden must be [tokens, H] or [B, L, H], got {got}")
    if not student_hidden.is_floating_point():
        raise KDError(f"student_hidden must be a float tensor, got {student_hidden.dtype}")
    weight, bias = head_parts(student_head, "student_head")
    if weight.shape[1] != student_hidden.shape[-1]:
        raise KDError(
            f"student_hidden size {student_hidden.shape[-1]} does not match the student head's "
            f"input size {weight.shape[1]} (head weight {tuple(weight.shape)})"
        )
    if not isinstance(target, TeacherTarget):
        raise KDError(
            f"target must be DenseTeacher(hidden, head), DenseLogits(logits) or a TeacherTarget, "
            f"got {type(target).__name__}"
        )
    check = getattr(target, "check_use", None)
    if check is not None:  # a cached target says what it can give exactly
        check(temperature, divergence)
    lead = tuple(student_hidden.shape[:-1])
    if tuple(target.shape) != lead:
        raise KDError(f"teacher tokens {tuple(target.shape)} do not match the student's {lead}")
    vocab = _resolve_vocab(vocab_size, weight.shape[0], target.vocab_rows)
    flat_mask = _flat_tokens("mask", mask, lead)
    if flat_mask is not None and flat_mask.dtype != torch.bool:
        raise KDError(
            f"mask must be a bool tensor (True = train on the token), got {flat_mask.dtype}"
        )
    flat_labels = _flat_tokens("labels", labels, lead)
    if flat_labels is not None:
        if flat_labels.is_floating_point() or flat_labels.dtype == torch.bool:
            raise KDError(
                f"labels must be integer token ids (-100 = ignore), got {flat_labels.dtype}"
            )
        # checked where it costs no device sync: on the host. Labels already on an accelerator
        # are trusted (kdkit's own come from a tokenizer that check_vocab bounded by the head)
        if flat_labels.device.type == "cpu":
            bad = (flat_labels != _IGNORE) & ((flat_labels < 0) | (flat_labels >= vocab))
            if bool(bad.any()):
                first = int(flat_labels[bad][0])
                raise KDError(f"labels must be in [0, {vocab}) or -100, got {first}")
        flat_labels = flat_labels.to(device=student_hidden.device, dtype=torch.long)
    if ce_weight > 0 and flat_labels is None:
        raise KDError(f"ce_weight={ce_weight} needs labels= (next-token ids, -100 = ignore)")

    transform = IDENTITY if student_transform is None else student_transform
    if not isinstance(transform, OutputTransform):
        raise KDError(
            "student_transform must be a kdkit.lm.logits.OutputTransform (output_transform(model))"
            f", got {type(transform).__name__}"
        )
    return Arguments(
        divergence,
        temperature,
        ce_weight,
        weight,
        bias,
        lead,
        vocab,
        flat_mask,
        flat_labels,
        transform,
    )


def _check_number(name: str, x: object, lo: float, hi: float) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (lo <= x <= hi):
        raise KDError(f"{name} must be a number in [{lo:g}, {hi:g}], got {x!r}")
    return float(x)


def _resolve_vocab(vocab_size: int | None, student_rows: int, teacher_rows: int) -> int:
    if vocab_size is None:
        if student_rows != teacher_rows:
            raise KDError(
                f"student head has {student_rows} vocabulary rows but the teacher has "
                f"{teacher_rows}; pass vocab_size= (the real shared vocabulary, e.g. the "
                "tokenizer's length) to mask the padded rows"
            )
        return student_rows
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise KDError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if vocab_size > min(student_rows, teacher_rows):
        raise KDError(
            f"vocab_size={vocab_size} is larger than the student head ({student_rows} rows) or "
            f"the teacher ({teacher_rows}); use at most {min(student_rows, teacher_rows)}"
        )
    return vocab_size


def _flat_tokens(name: str, x: torch.Tensor | None, lead: tuple[int, ...]) -> torch.Tensor | None:
    """``x`` of the leading shape (or already flat), flattened to ``[tokens]``."""
    if x is None:
        return None
    n = math.prod(lead)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) not in (lead, (n,)):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KDError(f"{name} must have the tokens' shape {lead} (or ({n},)), got {got}")
    return x.reshape(-1)
