"""The fused, memory-bounded token-level distillation loss: LM head + divergence in one pass.

Why fused: a language model's logits are the largest tensor of a distillation step. At N=2048
tokens and V=32000 a dense loss (student logits, teacher logits, softmaxes, their gradients)
peaked at 2,250 MiB of CPU memory, 9x the 250 MiB logits tensor (docs: LM-ANCHORS.md, finding
3). :func:`token_divergence` instead walks the tokens in chunks; for each chunk it projects the
student (and, for :class:`DenseTeacher`, the teacher) hidden states through the head, computes
the divergence and its closed-form gradient (:func:`kdkit.lm.divergence.value_and_grad`), pushes
that gradient through the head at once (``dL/dh = G W``, ``dL/dW += G^T h``, ``dL/db += sum G``)
and drops the chunk. Nothing of size ``[tokens, V]`` is ever alive; the backward pass only scales
the stored gradients by ``grad_output``. Measured (benchmarks/bench_lm_loss.py, CPU, fp32, one
thread, jsd beta=0.5, default budget; peak RSS over 4 calls): 268 MiB at N=2048/V=32000 and
266 MiB at N=1024/V=128256, against TRL's dense ``generalized_jsd_loss`` 4,303 / 8,538 MiB
(0.062x / 0.031x) and Liger's chunked loss at its best chunk (128 rows) 826 / 1,266 MiB
(0.33x / 0.21x), at 0.35x / 0.40x the dense time; same loss to 6 digits.

All ``[rows, V]`` buffers (five) are one workspace allocated per call and reused by every chunk
(:func:`kdkit.lm.divergence.value_and_grad_into`): with per-chunk temporaries glibc's heap
fragmented and the same call peaked at 461 MiB instead of 246 MiB.

Chunk size comes from a memory budget, not a fixed row count (Liger's default of 1024 rows is
the whole problem at V=128256 and peaks at 0.81x dense): the gradient accumulators (``[V, H]``
for the head, ``[N, H]`` for the hidden states) are charged to the budget first, and the rest is
split into rows of ``_TEMPS`` fp32 ``[rows, V]`` temporaries (the number this loop keeps alive at
once, counted from the code and checked by ``benchmarks/bench_lm_loss.py``), never fewer than
``_MIN_ROWS`` rows.

Vocabulary: with ``vocab_size`` set, head rows ``>= vocab_size`` (padded vocabularies, e.g.
Qwen2.5's 152064 vs 151936) are excluded from both softmaxes, which is exactly masking them with
``-inf`` (they get probability 0 and gradient 0), never zero-padding (a zero logit would take
student mass). They are excluded by slicing the head, so they also cost no compute.

Matmuls run in the head's dtype (bf16 heads stay bf16, as under autocast); every softmax,
divergence and gradient accumulator is fp32 (float64 when the inputs are float64, which is how
the tests check the loop against a float64 dense reference to 1e-6).

Targets are a small protocol (:class:`TeacherTarget`): the loop asks a target only for the
teacher's log-probabilities of a set of token rows. :class:`DenseTeacher` projects teacher
hidden states chunk by chunk under ``no_grad``; :class:`DenseLogits` slices precomputed logits.
A top-k cached target (``TopKTarget(ids, logprobs, tail_logmass)`` with its tail policies) is
one more implementation of :meth:`TeacherTarget.log_probs`; the loop does not change.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.lm._fused_args import check_arguments
from kdkit.lm.align import IGNORE_INDEX as _IGNORE  # the one -100 of kdkit.lm
from kdkit.lm.divergence import log_softmax_, value_and_grad_into
from kdkit.lm.logits import IDENTITY, OutputTransform
from kdkit.lm.targets import DenseLogits, DenseTeacher, TeacherTarget, project_into

__all__ = [
    "TeacherTarget",
    "DenseTeacher",
    "DenseLogits",
    "LossOutput",
    "token_divergence",
    "chunk_rows",
]

log = logging.getLogger(__name__)

# [rows, V] buffers of the fused loop, allocated once per call and reused by every chunk:
# teacher log p, student log q, and the three of value_and_grad_into
_TEMPS = 5
_MIN_ROWS = 8


@dataclass(frozen=True)
class LossOutput:
    """The loss and its detached diagnostics.

    ``loss``: scalar, differentiable w.r.t. the student hidden states and head. ``kl``: mean over
    the masked tokens of the chosen divergence at the temperature, without T^2 (for ``"ce"`` the
    true forward KL). ``tokens``: masked token count. ``ce``: mean hard-label cross-entropy at
    T=1 over masked tokens with a label, or None without labels. ``agree``: fraction of masked
    tokens where the student's and the teacher's argmax agree. ``router_aux``: a mixture-of-experts
    student's router load-balancing loss (added to ``loss`` by :class:`~kdkit.lm.LMTask`).
    """

    loss: torch.Tensor
    kl: torch.Tensor
    tokens: int
    ce: torch.Tensor | None = None
    agree: torch.Tensor | None = field(default=None)
    router_aux: torch.Tensor | None = None
    #: the hidden-state pairs' loss per token (:mod:`kdkit.lm.hidden`; added to ``loss``)
    hidden: torch.Tensor | None = None


# -- the loop ----------------------------------------------------------------------------------
def chunk_rows(
    memory_budget_mb: float,
    vocab: int,
    *,
    tokens: int,
    hidden: int,
    head_rows: int,
    itemsize: int,
    extra_per_row: int = 0,
) -> int:
    """Rows per chunk so that the loss's working memory stays within ``memory_budget_mb``.

    The gradient accumulators (head ``[head_rows, hidden]``, hidden ``[tokens, hidden]``) are
    charged first; the rest buys rows of ``_TEMPS`` ``[rows, vocab]`` temporaries plus
    ``extra_per_row`` elements a target allocates per row (a cross-tokenizer target's teacher
    vocabulary). At least ``_MIN_ROWS`` rows (logged when the budget asks for fewer), at most
    ``tokens``.
    """
    budget = memory_budget_mb * 2**20
    fixed = (head_rows + tokens) * hidden * itemsize
    rows = int((budget - fixed) // ((_TEMPS * vocab + extra_per_row) * itemsize))
    if rows < _MIN_ROWS:
        log.info(
            "memory_budget_mb=%s leaves room for %d rows at V=%d; using %d rows per chunk",
            memory_budget_mb,
            max(rows, 0),
            vocab,
            _MIN_ROWS,
        )
        rows = _MIN_ROWS
    return max(1, min(rows, tokens))


@dataclass
class _Stats:
    """Sums over the chunks, kept on the device (float64): the loss never reads the host in
    its chunk loop, so a GPU step does not stall once per chunk."""

    value_sum: torch.Tensor
    kl_sum: torch.Tensor
    ce_sum: torch.Tensor
    ce_count: torch.Tensor
    agree: torch.Tensor
    chunks: int = 0

    @classmethod
    def on(cls, device: torch.device) -> _Stats:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(*(zero.clone() for _ in range(5)))


@dataclass(frozen=True)
class _Plan:
    divergence: str
    temperature: float
    beta: float
    skew: float
    vocab: int
    kd_scale: float  # (1 - ce_weight) * T^2 (or 1) / denominator
    ce_scale: float  # ce_weight / denominator
    rows: int
    need_h: bool
    need_w: bool
    need_b: bool
    transform: OutputTransform = IDENTITY  # the student's, after its head


def _chunk(
    plan: _Plan,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lp: torch.Tensor,
    labels: torch.Tensor | None,
    work: list[torch.Tensor],
    stats: _Stats,
    sparse: tuple[Any, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One chunk: the divergence and ``dL/ds`` (a view of one of ``work``) for the rows of ``h``.

    ``work`` holds four ``[rows, V]`` buffers: the student's log q and three for the divergence;
    ``lp`` is clobbered. ``sparse`` = ``(target, rows)`` for a target that gives the value and
    gradient itself (a top-k cache's ``bucket`` / ``drop`` tail policy); ``lp`` is unused then.
    """
    lq, *bufs = work
    b = None if bias is None else bias[: plan.vocab]
    project_into(lq, h, weight[: plan.vocab], b)
    capped = plan.transform.softcap is not None
    shift = lq.new_empty(lq.shape[0]) if capped else None  # [rows]: f recovered from log q
    plan.transform.apply_(lq)
    log_softmax_(lq, plan.temperature, bufs[0], shift=shift)
    if sparse is not None:
        target, rows = sparse
        value, kl, grad, *top = target.value_and_grad(
            plan.divergence,
            lq,
            rows,
            temperature=plan.temperature,
            beta=plan.beta,
            skew=plan.skew,
            grad_out=bufs[0],
        )
        if top:  # a target may name its top-1 (in the student's ids) as a fourth value
            stats.agree += (lq.argmax(-1) == top[0].to(lq.device)).sum()
        elif getattr(target, "ids", None) is not None:  # NoTeacher (scratch): no agreement
            top1 = target.ids.index_select(0, rows.to(target.ids.device))[:, 0]
            stats.agree += (lq.argmax(-1) == top1.to(lq.device)).sum()
        free = bufs[1:]
    else:
        # an explicit -inf teacher logit (DenseLogits) would make 0 * -inf; a finite floor
        # keeps p = 0 and every 0 * log 0 term exactly 0
        floor = torch.finfo(lp.dtype).min / 4
        lp.clamp_(min=floor)
        stats.agree += (lq.argmax(-1) == lp.argmax(-1)).sum()
        value, kl, grad, free = value_and_grad_into(
            plan.divergence, lq, lp, tuple(bufs), beta=plan.beta, skew=plan.skew
        )
    stats.value_sum += value.sum(dtype=torch.float64)
    stats.kl_sum += kl.sum(dtype=torch.float64)
    # dD/ds = dD/dz / T
    grad.mul_(plan.kd_scale / plan.temperature)
    if labels is not None:
        valid = labels != _IGNORE
        # (no `if valid.any()`: a host read per chunk; ignored rows are zeroed below)
        # hard-label CE at T=1: log_softmax(s) = log_softmax(T * log q); its gradient
        # softmax(s) - onehot(label) is added into the same buffer
        if plan.temperature == 1.0:
            ls = lq
        else:
            ls = log_softmax_(torch.mul(lq, plan.temperature, out=free[0]), 1.0, free[1])
        safe = labels.clamp(min=0)
        nll = -ls.gather(1, safe.unsqueeze(1)).squeeze(1)
        stats.ce_sum += torch.where(valid, nll, 0.0).sum(dtype=torch.float64)
        stats.ce_count += valid.sum()
        if plan.ce_scale:
            soft = torch.exp(ls, out=free[0])  # never over log q: a soft-cap still needs it
            arange = torch.arange(soft.shape[0], device=soft.device)
            soft[arange, safe] -= 1.0
            soft.mul_(valid.unsqueeze(1).to(soft.dtype))
            grad.add_(soft, alpha=plan.ce_scale)
    if not plan.transform.identity:  # dL/df -> dL/dz through what the model does after its head
        plan.transform.chain_(grad, lq, shift, plan.temperature, free[0])
    return grad


class _FusedLoss(torch.autograd.Function):
    """Forward computes the loss and all gradients; backward scales them by ``grad_output``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: TeacherTarget,
        index: torch.Tensor,
        labels: torch.Tensor | None,
        plan: _Plan,
        stats: _Stats,
    ) -> torch.Tensor:
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        mm = weight.dtype
        flat = hidden.reshape(-1, hidden.shape[-1])
        g_h = torch.zeros_like(flat) if plan.need_h else None
        g_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if plan.need_w else None
        g_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if plan.need_b else None
        w = weight[: plan.vocab]
        rows_max = min(plan.rows, index.numel())
        # one allocation for every [rows, V] buffer, reused by all chunks (see value_and_grad_into)
        workspace = torch.empty(_TEMPS, rows_max, plan.vocab, dtype=dtype, device=hidden.device)
        for start in range(0, index.numel(), plan.rows):
            rows = index[start : start + plan.rows]
            work = [buf[: rows.numel()] for buf in workspace]
            h = flat.index_select(0, rows).to(mm)
            sparse = (target, rows) if getattr(target, "sparse", False) else None
            lp = work[0]
            if sparse is None:
                lp = target.log_probs(
                    rows,
                    vocab_size=plan.vocab,
                    temperature=plan.temperature,
                    out=work[0],
                    scratch=work[1],
                )
            lab = None if labels is None else labels.index_select(0, rows)
            grad = _chunk(plan, h, weight, bias, lp, lab, work[1:], stats, sparse)
            stats.chunks += 1
            gm = grad.to(mm)
            if g_h is not None:
                g_h.index_copy_(0, rows, (gm @ w).to(g_h.dtype))
            if g_w is not None:
                if acc == mm:
                    g_w[: plan.vocab].addmm_(gm.T, h)
                else:
                    g_w[: plan.vocab] += (gm.T @ h).to(acc)
            if g_b is not None:
                g_b[: plan.vocab] += grad.sum(0).to(acc)
            del grad, gm, work
        del workspace
        loss = (plan.kd_scale * stats.value_sum + plan.ce_scale * stats.ce_sum).to(dtype)
        ctx.grads = [
            None if g_h is None else g_h.view_as(hidden),
            None if g_w is None else g_w.to(weight.dtype),
            None if g_b is None else g_b.to(bias.dtype),
        ]
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None  # drop ctx's reference so autograd can take the storage
        if grads is None:
            raise RuntimeError(
                "kdkit.lm fused loss: backward called twice (retain_graph is not supported)"
            )
        # always scaled (no `if grad_output == 1`: that comparison is a host read per step)
        grads = [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads]
        return (*grads, None, None, None, None, None)


# -- public ----------------------------------------------------------------------------------
def token_divergence(
    student_hidden: torch.Tensor,
    student_head: nn.Linear | torch.Tensor,
    target: TeacherTarget,
    *,
    divergence: str = "fkl",
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    memory_budget_mb: float = 256,
    vocab_size: int | None = None,
    labels: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    reduction: str = "mean",
    t2: bool = True,
    student_transform: OutputTransform | None = None,
) -> LossOutput:
    """Token-level distillation loss through the student's LM head, never materializing [N, V].

    ``loss = (1 - ce_weight) * T^2 * mean_or_sum(D) + ce_weight * mean_or_sum(CE)``, both sums
    over the masked tokens (CE is 0 on tokens whose label is -100) and, for ``"mean"``, both
    divided by the masked token count, so ``mean == sum / tokens`` always.

    Args:
        student_hidden: final hidden states ``[tokens, H]`` or ``[B, L, H]``, any float dtype.
        student_head: the student's ``nn.Linear`` LM head (bias allowed) or its ``[V, H]`` weight.
        target: :class:`DenseTeacher`, :class:`DenseLogits` or any :class:`TeacherTarget`.
        divergence: one of :data:`kdkit.lm.divergence.DIVERGENCES`.
        mask: bool, the tokens' leading shape, True = train on it; None = every token.
        temperature: distillation temperature T (> 0), applied to both sides.
        beta: ``jsd`` teacher weight in the mixture (TRL/GKD: 0 = forward KL, 1 = reverse KL).
        skew: DistiLLM skew for ``skew_fkl`` / ``skew_rkl``, in [0, 1].
        memory_budget_mb: working memory for the loss (gradient accumulators + chunk buffers).
        vocab_size: the real shared vocabulary; head rows / logits columns beyond it are masked.
            None: student and teacher must have the same number of rows.
        labels: next-token ids (int, -100 = ignore) of the tokens' shape, for the hard-label CE.
        ce_weight: weight of the hard-label CE (at T=1), in [0, 1]; needs ``labels`` when > 0.
        reduction: ``"mean"`` (over masked tokens) or ``"sum"`` (divide by a global count later).
        t2: multiply the divergence by T^2 (keeps gradient scale independent of T).
        student_transform: what the student model does after its head (soft-capping, logit
            scaling; :func:`kdkit.lm.logits.output_transform`), applied chunk by chunk with its
            exact gradient; None = nothing. A teacher's goes into its :class:`DenseTeacher`.
    """
    args = check_arguments(
        student_hidden,
        student_head,
        target,
        divergence=divergence,
        mask=mask,
        temperature=temperature,
        beta=beta,
        skew=skew,
        memory_budget_mb=memory_budget_mb,
        vocab_size=vocab_size,
        labels=labels,
        ce_weight=ce_weight,
        reduction=reduction,
        student_transform=student_transform,
    )
    divergence, temperature, ce_weight = args.divergence, args.temperature, args.ce_weight
    weight, bias, lead, vocab = args.weight, args.bias, args.lead, args.vocab
    flat_mask, flat_labels = args.mask, args.labels

    n_all = math.prod(lead)
    if flat_mask is None:
        index = torch.arange(n_all, device=student_hidden.device)
    else:
        index = flat_mask.to(student_hidden.device).nonzero().squeeze(-1)
    tokens = int(index.numel())
    if tokens == 0:
        raise KDError(
            "every token is masked (mask is all False): nothing to distill; check the mask / "
            "labels alignment, or skip the batch"
        )
    denom = float(tokens) if reduction == "mean" else 1.0
    t_sq = temperature**2 if t2 else 1.0
    itemsize = 8 if student_hidden.dtype == torch.float64 else 4
    grad_on = torch.is_grad_enabled()
    plan = _Plan(
        divergence=divergence,
        temperature=temperature,
        beta=float(beta),
        skew=float(skew),
        vocab=vocab,
        kd_scale=(1.0 - ce_weight) * t_sq / denom,
        ce_scale=ce_weight / denom,
        rows=chunk_rows(
            memory_budget_mb,
            vocab,
            tokens=tokens,
            hidden=weight.shape[1],
            head_rows=weight.shape[0],
            itemsize=itemsize,
            extra_per_row=int(getattr(target, "extra_per_row", 0)),
        ),
        need_h=grad_on and student_hidden.requires_grad,
        need_w=grad_on and weight.requires_grad,
        need_b=grad_on and bias is not None and bias.requires_grad,
        transform=args.transform,
    )
    stats = _Stats.on(student_hidden.device)
    loss = _FusedLoss.apply(student_hidden, weight, bias, target, index, flat_labels, plan, stats)
    log.debug(
        "token_divergence: %d tokens in %d chunks of %d rows", tokens, stats.chunks, plan.rows
    )
    return LossOutput(  # device tensors: nothing here waits for the device
        loss=loss,
        kl=stats.kl_sum / tokens,
        tokens=tokens,
        # NaN when every label is -100 (no hard label to score)
        ce=None if flat_labels is None else stats.ce_sum / stats.ce_count,
        agree=stats.agree / tokens,
    )
