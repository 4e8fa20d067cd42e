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
    grad_out: torch.Tensor,
    *,
    beta: float,
    skew: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(value, forward KL, dD/dz written into grad_out [rows, Vs], top-1)`` for rows with a
    cached partner.

    ``ids`` / ``logp`` ``[rows, k]`` the teacher's top k (its ids, log-probabilities at the
    capture temperature), ``tail`` ``[rows]`` the log of the mass outside them, ``first``
    ``[Vt]`` the map (-1 = unmapped); ``log_q`` ``[rows, Vs]`` the student's log-probabilities.

    The divergence runs on ``[rows, k + 1]``: each distinct student id the top k reach (the
    first entry of each run of equal ids once sorted; repeats and unmapped entries are empty
    slots, ``0 log 0`` terms that add exactly 0) and the bucket. Only ``grad_out`` is
    ``[rows, Vs]``: ``q``, the reached ids zeroed, summed for the student's rest, scaled into
    the rest's gradient, the reached ids' own gradients added back. (A first version built the
    ``[rows, Vs + 1]`` distributions and a ``[rows, Vs]`` mask: 2-5x the step, docs/benchmarks.md.)
    """
    n, vs = log_q.shape
    dt = log_q.dtype
    sid = first[ids]  # [rows, k] student ids, -1 where unmapped
    s, order = torch.where(sid >= 0, sid, vs).sort(1)  # unmapped last
    p_k = logp.exp()
    ps = p_k.gather(1, order)
    mapped = s < vs
    lead = mapped.clone()  # the first entry of each distinct student id
    lead[:, 1:] &= s[:, 1:] != s[:, :-1]
    safe = torch.where(mapped, s, 0)
    grp = (lead.cumsum(1) - 1).clamp_(min=0)  # the distinct id each entry adds to
    big_p = torch.zeros_like(ps).scatter_add_(1, grp, torch.where(mapped, ps, 0)).gather(1, grp)
    big_p = torch.where(lead, big_p, 0)
    total = p_k.sum(1) + tail.exp()  # 1 up to the cache's rounding
    rest_p = (tail.exp() + torch.where(mapped, 0, ps).sum(1)) / total
    # the student's rest: q summed off the reached ids (each zeroed once: q - q is exactly 0)
    q = torch.exp(log_q, out=grad_out)
    q.scatter_add_(1, safe, torch.where(lead, -q.gather(1, safe), 0))
    q_rest = q.sum(1)
    lq_rest = q_rest.log()
    # where the rest is so small that q's subnormals would count, its logsumexp (-inf where the
    # top k reach every id); rare rows, one [rows, Vs] copy of them (charged: extra_per_row)
    low = (q_rest < vs * torch.finfo(dt).tiny / torch.finfo(dt).eps).nonzero().squeeze(1)
    if low.numel():
        off = torch.where(lead[low], float("-inf"), 0.0).to(dt)
        masked = log_q.index_select(0, low).scatter_add_(1, safe[low], off)
        top = masked.amax(1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, 0.0)
        lq_rest[low] = masked.sub_(top).exp_().sum(1).log_() + top.squeeze(1)
    floor = torch.finfo(dt).min / 4
    lq_k = torch.where(lead, log_q.gather(1, safe), float("-inf"))
    lp_b = torch.cat([torch.log(big_p / total.unsqueeze(1)), torch.log(rest_p).unsqueeze(1)], 1)
    lq_b = torch.cat([lq_k, lq_rest.unsqueeze(1)], 1)
    lp_b, lq_b = lp_b.clamp(min=floor), lq_b.clamp(min=floor)
    value, g_b = value_and_grad(divergence, lq_b, lp_b, beta=beta, skew=skew)
    kl = value.clone() if divergence == "fkl" else divergence_value("fkl", lq_b, lp_b)
    # rest ids: the bucket's gradient shared as q_j / Q_rest; reached ids (0 in q now): their own
    scale = torch.nan_to_num(g_b[:, -1:] * torch.exp(-lq_b[:, -1:]), nan=0.0, posinf=0.0)
    grad = q.mul_(scale).scatter_add_(1, safe, torch.where(lead, g_b[:, :-1], 0))
    top = big_p.argmax(1, keepdim=True)  # ties: the smallest id, as an argmax over all ids
    top1 = torch.where(mapped[:, 0], s.gather(1, top).squeeze(1), 0)
    return value, kl, grad, top1


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
