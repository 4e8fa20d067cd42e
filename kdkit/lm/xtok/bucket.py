"""A cached top k projected onto the student's vocabulary: its tail as one "rest" bucket, or
the text's own token standing in for it (``label``).

A top-k cache knows the teacher's k most likely ids and the mass outside them, not how that
mass is shared. The projection sends the k ids to the student ids their text starts with
(:mod:`.vocabmap`); the student ids reached hold ``P``, and everything else (the tail, plus the
mass of top-k ids the map cannot place) is one bucket, compared with the student's own mass on
all the other ids, exactly as the same-tokenizer ``bucket`` policy does
(:class:`kdkit.lm.cache.TopKTarget`): no assumption about the tail's shape. On the demo, the
dense tail policies (``renorm``, ``prior``) and this one made a cross-tokenizer student from a
k=32 cache worse than scratch; ``label`` (:func:`label_projected`: the top k as the sparse
forward KL, plus the student's next token where no top-k id reaches it, as the same-tokenizer
policy of :mod:`kdkit.lm.cache.target`) did not (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from kdkit.lm.cache.target import label_value_and_grad
from kdkit.lm.divergence import divergence_value, value_and_grad

__all__ = ["bucket_value_and_grad", "label_projected"]


def bucket_value_and_grad(
    divergence: str,
    log_q: torch.Tensor,
    ids: torch.Tensor,
    logp: torch.Tensor,
    tail: torch.Tensor,
    first: torch.Tensor,
    *,
    beta: float,
    skew: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(value, forward KL, dD/dz [rows, Vs], top-1)`` for rows with a cached partner.

    ``ids`` / ``logp`` ``[rows, k]`` the teacher's top k (its ids, log-probabilities at the
    capture temperature), ``tail`` ``[rows]`` the log of the mass outside them, ``first``
    ``[Vt]`` the map (-1 = unmapped); ``log_q`` ``[rows, Vs]`` the student's log-probabilities.
    """
    n, vs = log_q.shape
    dt = log_q.dtype
    sid = first[ids]  # [rows, k] student ids, -1 where unmapped
    mapped = sid >= 0
    p_k = logp.exp()
    total = p_k.sum(1) + tail.exp()  # 1 up to the cache's rounding
    proj = log_q.new_zeros(n, vs).scatter_add_(1, sid.clamp(min=0), torch.where(mapped, p_k, 0))
    known = torch.zeros(n, vs, dtype=torch.bool, device=log_q.device)
    known.scatter_(1, sid.clamp(min=0), mapped)
    rest_p = (tail.exp() + torch.where(mapped, 0, p_k).sum(1)) / total
    floor = torch.finfo(dt).min / 4
    lp_b = torch.cat([torch.log(proj / total.unsqueeze(1)), torch.log(rest_p).unsqueeze(1)], 1)
    lq_rest = torch.logsumexp(log_q.masked_fill(known, float("-inf")), dim=1)
    lq_b = torch.cat([log_q.masked_fill(~known, float("-inf")), lq_rest.unsqueeze(1)], 1)
    lp_b, lq_b = lp_b.clamp(min=floor), lq_b.clamp(min=floor)
    value, g_b = value_and_grad(divergence, lq_b, lp_b, beta=beta, skew=skew)
    kl = divergence_value("fkl", lq_b, lp_b)
    # known ids: their own entry; the rest: the bucket's gradient shared as q_j / Q_rest
    scale = torch.nan_to_num(g_b[:, -1:] * torch.exp(-lq_b[:, -1:]), nan=0.0, posinf=0.0)
    grad = torch.where(known, g_b[:, :-1], log_q.exp() * scale)
    return value, kl, grad, proj.argmax(1)


def label_projected(
    divergence: str,
    log_q: torch.Tensor,
    ids: torch.Tensor,
    logp: torch.Tensor,
    first: torch.Tensor,
    labels: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(value, top-k forward KL, dD/dz written into grad_out [rows, Vs], top-1)`` of the
    ``label`` tail: the top k sent through the map (unmapped ids: left out with the tail), and
    the student's next token ``labels`` where none of them reaches it
    (:func:`kdkit.lm.cache.target.label_value_and_grad`). The top-1 is the student id of the
    teacher's most likely token (-1 if it maps nowhere)."""
    sid = first[ids]
    value, kl, grad = label_value_and_grad(divergence, log_q, sid, logp.exp(), labels, grad_out)
    return value, kl, grad, sid[:, 0]
