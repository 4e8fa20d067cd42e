"""A teacher's top k at a batch's trained positions: what a cache stores and a server sends.

One computation for every place that needs the teacher's distribution as top-k ids, their
log-probabilities and the mass outside them (``kdkit lm capture`` writing a cache, ``kdkit lm
serve`` answering a trainer): the model's hidden states at the batch's trained positions
(:class:`~kdkit.lm.align.TokenBatch` ``mask``, in order), projected through its head and its
family's output transform (:func:`~kdkit.lm.logits.output_transform`: the model's own
distribution, not ``hidden @ head.T``), ``log_softmax(logits / T)`` in float32, chunk by chunk.

Entry ``j`` of a row is ``p(x[j+1] | x[<=j])`` at each trained position ``j``: the cache's
alignment (docs/lm-cache-format.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from kdkit.lm.divergence import log1mexp
from kdkit.lm.logits import output_transform, project_logits
from kdkit.lm.models import hidden_and_head
from kdkit.lm.packing import check_packing

__all__ = ["TopK", "TopKScorer", "ModuleTopK", "teacher_topk", "topk_entries"]

#: token rows projected onto the vocabulary at once (a [rows, V] fp32 block)
CHUNK = 256


@dataclass(frozen=True)
class TopK:
    """The teacher's top k for ``E`` trained positions, in the batch's mask order.

    Attributes:
        ids: ``[E, k]`` int64 token ids, by decreasing probability.
        logp: ``[E, k]`` float32 log-probabilities at the temperature asked for.
        tail: ``[E]`` float32 ``log(1 - sum exp(logp))``, the mass outside the top k.
        mass: ``[V]`` float64, every entry's whole distribution summed (the ``prior`` tail's
            shape), or None when not asked for.
        label_logp, label_rank: ``[E]`` the log-probability and 1-based rank (tokens at least
            as likely, itself included) of the token that came next, when asked for.
    """

    ids: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor
    mass: torch.Tensor | None = None
    label_logp: torch.Tensor | None = None
    label_rank: torch.Tensor | None = None


def topk_entries(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [N, k], logp [N, k], tail [N])`` of log-probs ``lp`` ``[N, V]`` (fp32): the k
    largest, sorted, and ``log(1 - sum of their p)`` computed in float64. The one rule of every
    writer and sender of top-k targets (a capture, ``kdkit lm generate``, ``kdkit lm serve``)."""
    values, index = lp.topk(k, dim=-1)
    return index, values, log1mexp(torch.logsumexp(values.double(), dim=-1)).float()


@torch.no_grad()
def teacher_topk(
    teacher: nn.Module,
    batch: Any,
    vocab: int,
    k: int,
    temperature: float,
    *,
    mass: bool = True,
    labels: bool = False,
) -> TopK:
    """The teacher's :class:`TopK` at ``batch``'s trained positions (see the module docstring).

    ``vocab``: the real vocabulary (head rows past it are padding, never a target); ``mass``:
    sum the entries' whole distributions; ``labels``: the next token's log-prob and rank too.
    """
    if batch.packed:
        check_packing(teacher, "teacher")
    out = hidden_and_head(teacher, **batch.model_inputs())
    transform = output_transform(teacher)  # the model's distribution, not hidden @ head.T
    hidden = out.hidden[batch.mask]
    targets = batch.labels[batch.mask] if labels else None
    ids, logp, tail, label_logp, label_rank = [], [], [], [], []
    total = torch.zeros(vocab, dtype=torch.float64) if mass else None
    for start in range(0, hidden.shape[0], CHUNK):
        logits = project_logits(hidden[start : start + CHUNK], out.head, transform, vocab)
        lp = torch.log_softmax(logits.float() / temperature, dim=-1)
        index, values, rest = topk_entries(lp, k)
        if total is not None:
            total += lp.double().exp().sum(0).cpu()
        if targets is not None:
            mine = lp.gather(1, targets[start : start + CHUNK].to(lp.device).unsqueeze(1))
            label_logp.append(mine.squeeze(1))
            label_rank.append((lp >= mine).sum(1))
        ids.append(index)
        logp.append(values)
        tail.append(rest)
    if not ids:  # no trained position: empty arrays of the right shapes
        empty = torch.zeros(0, k)
        extra = (torch.zeros(0), torch.zeros(0).long()) if labels else (None, None)
        return TopK(empty.long(), empty, torch.zeros(0), total, *extra)
    return TopK(
        torch.cat(ids),
        torch.cat(logp),
        torch.cat(tail),
        total,
        torch.cat(label_logp) if labels else None,
        torch.cat(label_rank) if labels else None,
    )


@runtime_checkable
class TopKScorer(Protocol):
    """Anything that gives a :class:`TopK` for a batch: a model run here (:class:`ModuleTopK`)
    or a served teacher (:class:`kdkit.lm.serve.ServedTeacher`)."""

    def topk(self, batch: Any, *, vocab: int, k: int, temperature: float, mass: bool) -> TopK: ...


@dataclass(frozen=True)
class ModuleTopK:
    """A teacher model run in this process, as a :class:`TopKScorer`."""

    teacher: nn.Module

    def topk(self, batch: Any, *, vocab: int, k: int, temperature: float, mass: bool) -> TopK:
        return teacher_topk(self.teacher, batch, vocab, k, temperature, mass=mass)
