"""Teacher targets of the fused loss: where a chunk of teacher log-probabilities comes from.

The fused loop (:mod:`kdkit.lm.fused`) asks a target for ``log_softmax(teacher logits / T)`` of
a set of token rows, written into its own reusable buffer. An online teacher is its hidden
states and head (:class:`DenseTeacher`: logits computed chunk by chunk, never all at once);
precomputed logits are :class:`DenseLogits`. A cached top-k target plugs in through the same
:class:`TeacherTarget` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.lm.divergence import log_softmax_
from kdkit.lm.logits import IDENTITY, OutputTransform

__all__ = [
    "TeacherTarget",
    "DenseTeacher",
    "DenseLogits",
    "NoTeacher",
    "head_parts",
    "project_into",
]


@runtime_checkable
class TeacherTarget(Protocol):
    """What the fused loop needs from a teacher: log-probabilities for a set of token rows.

    ``shape`` is the leading (token) shape the target covers, e.g. ``(B, L)`` or ``(N,)``;
    ``vocab_rows`` the width of the teacher's vocabulary (head rows or logits columns).
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def vocab_rows(self) -> int: ...

    def log_probs(
        self,
        rows: torch.Tensor,
        *,
        vocab_size: int,
        temperature: float,
        out: torch.Tensor,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        """Write ``log_softmax(teacher_logits[rows, :vocab_size] / temperature)`` into ``out``
        (``[len(rows), vocab_size]``, the loop's dtype) and return it, without autograd.
        ``rows`` index the flattened tokens; ``scratch`` (same shape) may be clobbered."""
        ...


def head_parts(
    head: nn.Linear | torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, torch.Tensor) and head.dim() == 2 and head.is_floating_point():
        return head, None
    got = tuple(head.shape) if isinstance(head, torch.Tensor) else type(head).__name__
    raise KDError(f"{what} must be an nn.Linear or its [V, H] float weight tensor, got {got}")


def project_into(
    out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> None:
    """``out = h @ w.T (+ b)``, straight into ``out`` when the dtypes allow."""
    if h.dtype == out.dtype and w.dtype == out.dtype:
        if b is None:
            torch.matmul(h, w.T, out=out)
        else:
            torch.addmm(b.to(out.dtype), h, w.T, out=out)
    else:  # half-precision heads: the matmul in the head's dtype, then upcast (as autocast)
        out.copy_(h @ w.T if b is None else torch.addmm(b, h, w.T))


@dataclass(frozen=True)
class DenseTeacher:
    """An online teacher given as its final hidden states ``[..., Ht]``, its LM head and what
    the model does after the head (``transform``: soft-capping, logit scaling; found with
    :func:`kdkit.lm.logits.output_transform`).

    The teacher's logits are computed chunk by chunk under ``no_grad`` (never all at once).
    """

    hidden: torch.Tensor
    head: nn.Linear | torch.Tensor
    transform: OutputTransform = IDENTITY

    def __post_init__(self) -> None:
        weight, _ = head_parts(self.head, "DenseTeacher head")
        if not isinstance(self.transform, OutputTransform):
            raise KDError(
                f"DenseTeacher transform must be a kdkit.lm.logits.OutputTransform, got "
                f"{type(self.transform).__name__}"
            )
        if not isinstance(self.hidden, torch.Tensor) or self.hidden.dim() < 2:
            raise KDError("DenseTeacher hidden must be a tensor [tokens, Ht] or [B, L, Ht]")
        if self.hidden.shape[-1] != weight.shape[1]:
            raise KDError(
                f"DenseTeacher hidden size {self.hidden.shape[-1]} does not match its head's "
                f"input size {weight.shape[1]} (head weight {tuple(weight.shape)})"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.hidden.shape[:-1])

    @property
    def vocab_rows(self) -> int:
        return head_parts(self.head, "DenseTeacher head")[0].shape[0]

    def log_probs(
        self,
        rows: torch.Tensor,
        *,
        vocab_size: int,
        temperature: float,
        out: torch.Tensor,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        weight, bias = head_parts(self.head, "DenseTeacher head")
        with torch.no_grad():
            h = self.hidden.reshape(-1, self.hidden.shape[-1]).index_select(0, rows)
            h = h.to(device=weight.device, dtype=weight.dtype)
            b = None if bias is None else bias[:vocab_size]
            project_into(out, h, weight[:vocab_size], b)
            self.transform.apply_(out)
            return log_softmax_(out, temperature, scratch)


@dataclass(frozen=True)
class NoTeacher:
    """No teacher: the scratch baseline's target (``LMTask(student, None)``, ``ce_weight`` 1).
    The loop skips the divergence (value, KL and gradient 0) and computes the hard-label
    cross-entropy alone, instead of projecting the student a second time as its own teacher
    for a term that weighs 0 (about 30% of the scratch step)."""

    shape: tuple[int, ...]
    vocab_rows: int
    sparse: bool = True  # the loop asks value_and_grad, never log_probs

    def value_and_grad(
        self, divergence: str, log_q: torch.Tensor, rows: torch.Tensor, *, grad_out, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zero = log_q.new_zeros(log_q.shape[0])
        return zero, zero, grad_out.zero_()

    def log_probs(self, rows, *, vocab_size, temperature, out, scratch) -> torch.Tensor:
        raise KDError("NoTeacher has no log-probabilities: it is the scratch baseline's target")


@dataclass(frozen=True)
class DenseLogits:
    """Precomputed teacher logits ``[..., Vt]`` (any float dtype)."""

    logits: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.logits, torch.Tensor) or self.logits.dim() < 2:
            raise KDError("DenseLogits logits must be a tensor [tokens, V] or [B, L, V]")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.logits.shape[:-1])

    @property
    def vocab_rows(self) -> int:
        return self.logits.shape[-1]

    def log_probs(
        self,
        rows: torch.Tensor,
        *,
        vocab_size: int,
        temperature: float,
        out: torch.Tensor,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        with torch.no_grad():
            flat = self.logits.reshape(-1, self.logits.shape[-1])[:, :vocab_size]
            rows = rows.to(flat.device)
            if flat.dtype == out.dtype:
                torch.index_select(flat, 0, rows, out=out)
            else:
                out.copy_(flat.index_select(0, rows))
            return log_softmax_(out, temperature, scratch)


# -- output ----------------------------------------------------------------------------------
