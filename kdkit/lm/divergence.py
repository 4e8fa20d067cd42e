"""Token-level divergences on a chunk of logits: a reference formula and an analytic gradient.

Each divergence exists twice here, on purpose:

- :func:`divergence_value` is the plain formula written with autograd-friendly torch ops. Run
  in float64 it is the reference the tests (and any reader) check the fused loss against.
- :func:`value_and_grad` gives the same per-token value *and* its gradient with respect to the
  student's temperature-scaled logits ``z = s / T``, in closed form, so that
  :mod:`kdkit.lm.fused` can compute gradients inside the forward pass, chunk by chunk, without
  keeping anything of size ``[tokens, V]`` for a backward pass.

Notation, per token: ``p = softmax(t / T)`` (teacher), ``q = softmax(s / T)`` (student); both
functions take log-probabilities (``log_p``, ``log_q``, shape ``[rows, V]``) so that masked
vocabulary entries (``-inf``) and probabilities that underflow in fp32 stay exact. ``0 log 0``
is taken as 0 everywhere. Every gradient follows from the softmax Jacobian,
``dD/dz = q * (g - <q, g>)`` with ``g = dD/dq``.

=========  ==============================================  =================================
name       value per token                                 ``dD/dz``
=========  ==============================================  =================================
fkl        KL(p || q)                                      ``q - p``
rkl        KL(q || p)                                      ``q (log q - log p - D)``
jsd        b KL(p || m) + (1-b) KL(q || m), m = b p+(1-b) q  ``q (g - <q,g>)``, g = (1-b)(log q - log m)
skew_fkl   KL(p || a p + (1-a) q)   (DistiLLM)             g = -(1-a) p / m
skew_rkl   KL(q || a q + (1-a) p)   (DistiLLM)             g = log q - log m + 1 - a q / m
tvd        0.5 sum |p - q|                                 g = 0.5 sign(q - p)
ce         -sum p log q   (soft cross-entropy)             ``q - p``
=========  ==============================================  =================================

``jsd`` follows GKD (arXiv 2306.13649, Eq. 1) exactly as TRL implements it
(``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``): ``beta`` is the teacher's weight in
the mixture, and the end points are special-cased, ``beta=0`` *is* forward KL and ``beta=1`` *is*
reverse KL. (The mixture formula itself tends to 0 at both ends, like ``beta * KL(p||q)`` near
``beta=0``, so the special cases are a discontinuity by design; we keep TRL's convention so that a
TRL user's ``beta`` means the same here.) ``ce`` has the gradient of ``fkl`` but is offset by the
teacher entropy (torchtune's ``ForwardKLLoss`` logs this number as "KL"); the fused loss logs
the true forward KL for it.
"""

from __future__ import annotations

import math

import torch

from kdkit.errors import KDError, closest_names

__all__ = [
    "DIVERGENCES",
    "check_divergence",
    "divergence_value",
    "log1mexp",
    "log_softmax_",
    "value_and_grad",
    "value_and_grad_into",
]

DIVERGENCES = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "ce")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends; -inf at x == 0 (the mass
    outside a top k from the log of the mass inside it)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def check_divergence(name: str, *, beta: float = 0.5, skew: float = 0.1) -> str:
    """The divergence name, validated together with the parameter it uses."""
    if name not in DIVERGENCES:
        close = ", ".join(closest_names(str(name), DIVERGENCES, n=3))
        raise KDError(
            f"unknown divergence {name!r}; did you mean {close}? (choose from {', '.join(DIVERGENCES)})"
        )
    for what, x in (("beta", beta), ("skew", skew)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0:
            raise KDError(f"{what} must be a number in [0, 1] (e.g. 0.5), got {x!r}")
    return name


def _xlog_ratio(x: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``x * (log_a - log_b)`` with 0 where ``x == 0`` (a masked or underflowed entry)."""
    # the inner where also keeps autograd finite: no ``0 * (-inf - -inf)`` in the backward
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return x * torch.where(x == 0, zero, log_a - log_b)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w * a + (1 - w) * b)`` from log-probabilities, stable for w in [0, 1]."""
    if w <= 0.0:
        return log_b.clone()
    if w >= 1.0:
        return log_a.clone()
    if log_a.requires_grad or log_b.requires_grad:
        # autograd of logaddexp(-inf, -inf) is NaN; the reference path sidesteps it (the fused
        # path runs without autograd and needs no copy)
        both = torch.isneginf(log_a) & torch.isneginf(log_b)
        zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
        mixed = torch.logaddexp(
            torch.where(both, zero, log_a) + math.log(w),
            torch.where(both, zero, log_b) + math.log1p(-w),
        )
        return torch.where(both, log_a, mixed)
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _jsd_endpoint(name: str, beta: float) -> str:
    if name == "jsd" and beta == 0.0:
        return "fkl"
    if name == "jsd" and beta == 1.0:
        return "rkl"
    return name


def divergence_value(
    name: str, log_q: torch.Tensor, log_p: torch.Tensor, *, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """The divergence per token (``[rows]``), as a plain differentiable formula (the reference).

    Args:
        name: one of :data:`DIVERGENCES`.
        log_q: student log-probabilities at the distillation temperature, ``[rows, V]``.
        log_p: teacher log-probabilities at the same temperature, ``[rows, V]``.
        beta: teacher weight of the ``jsd`` mixture (0 = forward KL, 1 = reverse KL).
        skew: the DistiLLM skew ``a`` of ``skew_fkl`` / ``skew_rkl``.
    """
    name = _jsd_endpoint(check_divergence(name, beta=beta, skew=skew), beta)
    p, q = log_p.exp(), log_q.exp()
    if name == "fkl":
        return _xlog_ratio(p, log_p, log_q).sum(-1)
    if name == "ce":
        return -(p * torch.where(p == 0, torch.zeros_like(p), log_q)).sum(-1)
    if name == "rkl":
        return _xlog_ratio(q, log_q, log_p).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        kl_p = _xlog_ratio(p, log_p, log_m).sum(-1)
        kl_q = _xlog_ratio(q, log_q, log_m).sum(-1)
        return beta * kl_p + (1.0 - beta) * kl_q
    if name == "skew_fkl":
        return _xlog_ratio(p, log_p, _log_mix(log_p, log_q, skew)).sum(-1)
    # skew_rkl
    return _xlog_ratio(q, log_q, _log_mix(log_q, log_p, skew)).sum(-1)


def _project(q: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """``q * (g - <q, g>)`` given ``qg = q * g``; overwrites ``qg``."""
    return qg.sub_(q * qg.sum(-1, keepdim=True))


def value_and_grad(
    name: str,
    log_q: torch.Tensor,
    log_p: torch.Tensor,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
    q: torch.Tensor | None = None,
    p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token value ``[rows]`` and ``dD/dz`` ``[rows, V]`` (z = student logits / T), no autograd.

    ``q`` / ``p`` may be passed when the caller already has ``exp(log_q)`` / ``exp(log_p)``; the
    returned gradient may then reuse ``q``'s storage (the caller must not use ``q`` afterwards).
    The value equals :func:`divergence_value` (for ``ce`` the soft cross-entropy).

    Args:
        name: one of :data:`DIVERGENCES`.
        log_q: student log-probabilities, ``[rows, V]``.
        log_p: teacher log-probabilities, ``[rows, V]``.
        beta: ``jsd`` mixture weight of the teacher.
        skew: DistiLLM skew of ``skew_fkl`` / ``skew_rkl``.
        q: optional ``exp(log_q)``, consumed.
        p: optional ``exp(log_p)``.
    """
    name = _jsd_endpoint(name, beta)
    if p is None:
        p = log_p.exp()
    if q is None:
        q = log_q.exp()
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    if name in ("fkl", "ce"):
        if name == "fkl":
            value = _xlog_ratio(p, log_p, log_q).sum(-1)
        else:
            value = -torch.where(p == 0, zero, p * log_q).sum(-1)
        return value, q.sub_(p)
    if name == "rkl":
        d = _xlog_ratio(q, log_q, log_p)
        value = d.sum(-1)
        return value, d.sub_(q.mul_(value.unsqueeze(-1)))
    if name == "tvd":
        diff = q - p
        value = 0.5 * diff.abs().sum(-1)
        qg = diff.sign_().mul_(q).mul_(0.5)
        return value, _project(q, qg)
    if name == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        value = beta * _xlog_ratio(p, log_p, log_m).sum(-1)
        qg = _xlog_ratio(q, log_q, log_m)
        value += (1.0 - beta) * qg.sum(-1)
        return value, _project(q, qg.mul_(1.0 - beta))
    if name == "skew_fkl":
        log_m = _log_mix(log_p, log_q, skew)
        value = _xlog_ratio(p, log_p, log_m).sum(-1)
        # q * g = -(1-a) q p / m, in log space so that an underflowed q never meets an inf ratio
        qg = torch.where(p == 0, zero, (log_q + log_p - log_m).exp_()).mul_(-(1.0 - skew))
        return value, _project(q, qg)
    # skew_rkl: q * g = q (log q - log m) + q - a q^2 / m
    log_m = _log_mix(log_q, log_p, skew)
    qg = _xlog_ratio(q, log_q, log_m)
    value = qg.sum(-1)
    if skew > 0.0:
        qg -= torch.where(q == 0, zero, (2.0 * log_q - log_m).exp_()).mul_(skew)
    qg += q
    return value, _project(q, qg)


def log_softmax_(
    x: torch.Tensor,
    temperature: float,
    scratch: torch.Tensor,
    *,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place ``x = log_softmax(x / T)`` over the last dim; ``scratch`` (same shape) is clobbered.

    ``torch.logsumexp`` allocates two ``[rows, V]`` temporaries per call; this keeps the fused
    loop's buffers fixed (see :func:`value_and_grad_into`). ``shift`` (``[rows]``), if given,
    receives what was subtracted per row, so ``x / T == result + shift`` (the fused loop recovers
    soft-capped logits from it, :meth:`kdkit.lm.logits.OutputTransform.chain_`).
    """
    if temperature != 1.0:
        x.div_(temperature)
    top = x.amax(-1, keepdim=True)
    x.sub_(top)
    torch.exp(x, out=scratch)
    norm = scratch.sum(-1, keepdim=True).log_()
    if shift is not None:
        torch.add(top, norm, out=shift.unsqueeze(-1))
    return x.sub_(norm)


def value_and_grad_into(
    name: str,
    lq: torch.Tensor,
    lp: torch.Tensor,
    bufs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """:func:`value_and_grad` written into three preallocated ``[rows, V]`` buffers.

    Same formulas, with ``out=`` and in-place ops only and the operations ordered so that five
    ``[rows, V]`` buffers in all (``lq``, ``lp`` and ``bufs``) suffice, so a chunked loop allocates
    no ``[rows, V]`` tensor per chunk. Measured reason (benchmarks/bench_lm_loss.py, jsd, N=2048,
    V=32000): with per-chunk temporaries glibc's heap fragmented and the loop's peak RSS was
    461 MiB for a 256 MiB budget (246 MiB with ``MALLOC_MMAP_THRESHOLD_`` fixed); fixed buffers
    make the peak independent of the allocator.

    ``lq`` (kept) and ``lp`` (**clobbered**) must be finite log-probabilities (the caller clamps
    ``-inf`` to a finite floor, so that ``0 * log 0`` terms are exactly 0). Returns ``(value, kl,
    grad, free)``: the per-token value, the forward KL (differs from ``value`` only for ``ce``),
    ``dD/dz`` (a view of one of the buffers) and the buffers that are free again.
    """
    name = _jsd_endpoint(name, beta)
    q, a, b = bufs
    torch.exp(lq, out=q)

    def project(qg: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """``q * (g - <q, g>)`` from ``qg = q * g``."""
        torch.mul(q, qg.sum(-1, keepdim=True), out=scratch)
        return qg.sub_(scratch)

    def log_mix(log_x: torch.Tensor, log_y: torch.Tensor, w: float) -> torch.Tensor:
        """``log(w x + (1 - w) y)`` into ``b`` (``a`` is scratch).

        In probability space (``q`` is already ``exp(lq)``): one exp, two multiply-adds and a
        log per element, where ``logaddexp`` costs an exp, a log1p and a max on top (it was
        40% of the jsd loss). Where both x and y underflow, m is floored at the dtype's
        smallest normal: every term that reads log m is then weighted by an x or y of 0."""
        if w <= 0.0:
            return b.copy_(log_y)
        if w >= 1.0:
            return b.copy_(log_x)
        x = q if log_x is lq else torch.exp(log_x, out=a)
        y = q if log_y is lq else torch.exp(log_y, out=a)
        torch.mul(x, w, out=b).add_(y, alpha=1.0 - w)
        return b.clamp_(min=torch.finfo(b.dtype).tiny).log_()

    if name in ("fkl", "ce"):
        p = torch.exp(lp, out=a)
        value = None if name == "fkl" else -torch.mul(p, lq, out=b).sum(-1)
        kl = lp.sub_(lq).mul_(p).sum(-1)
        return (kl if value is None else value), kl, q.sub_(p), [a, b, lp]
    if name == "rkl":
        d = torch.sub(lq, lp, out=a).mul_(q)
        value = d.sum(-1)
        return value, value, d.sub_(q.mul_(value.unsqueeze(-1))), [q, b, lp]
    if name == "tvd":
        diff = torch.sub(q, torch.exp(lp, out=a), out=b)
        value = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
        qg = diff.sign_().mul_(q).mul_(0.5)
        return value, value, project(qg, a), [a, lp]
    if name == "jsd":
        log_m = log_mix(lp, lq, beta)
        p = torch.exp(lp, out=a)
        value = beta * lp.sub_(log_m).mul_(p).sum(-1)
        qg = torch.sub(lq, log_m, out=a).mul_(q)
        value += (1.0 - beta) * qg.sum(-1)
        return value, value, project(qg.mul_(1.0 - beta), lp), [b, lp]
    if name == "skew_fkl":
        log_m = log_mix(lp, lq, skew)
        p = torch.exp(lp, out=a)
        lp.sub_(log_m)  # log p - log m
        value = p.mul_(lp).sum(-1)
        # q * g = -(1-a) q p / m, in log space so that an underflowed q never meets an inf ratio
        qg = torch.add(lq, lp, out=a).exp_().mul_(-(1.0 - skew))
        return value, value, project(qg, b), [b, lp]
    # skew_rkl: q * g = q (log q - log m) + q - a q^2 / m
    log_m = log_mix(lq, lp, skew)
    qg = torch.sub(lq, log_m, out=a).mul_(q)
    value = qg.sum(-1)
    if skew > 0.0:
        qg.sub_(torch.mul(lq, 2.0, out=lp).sub_(log_m).exp_().mul_(skew))
    qg.add_(q)
    return value, value, project(qg, b), [b, lp]
