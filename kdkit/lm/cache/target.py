"""A cached top-k teacher as a target of the fused loss, with every tail policy exact.

The cache stores, per trained token, the teacher's top-k ids, their log-probabilities and the
log of the mass left outside them, ``tail = log(1 - sum_k p)``. What the student is trained
against beyond the top k is the *tail policy*; each is a definition, computed exactly:

- ``renorm``: the teacher renormalized over its top k (zero outside). Every divergence.
- ``uniform``: the tail mass spread evenly over the ``V - k`` other ids. Every divergence.
- ``prior``: the tail mass spread over the other ids in proportion to the teacher's mean
  distribution over the corpus (summed at capture, ``V`` numbers per cache). Every divergence.
- ``bucket``: a ``k + 1``-way distribution, the top k and one "rest" bucket, against the
  student's top-k probabilities and its summed rest; the gradient reaches each rest id in
  proportion to the student's own probability there. Every divergence.
- ``drop``: the sparse forward term ``sum_k p_i log(p_i / q_i)`` (teacher not renormalized, as
  DistillKit's sparse KL); its gradient is ``q * sum_k p - p``. ``fkl`` and ``ce`` only.
- ``label``: ``drop`` plus, where the text's own next token ``x`` is not among the top k, its
  cross-entropy ``-log q_x`` (weight 1; :func:`label_value_and_grad`). The text is a sample of
  the distribution the teacher models: if ``x ~ p``, then ``E[1(x outside the top k) onehot(x)]``
  is exactly the teacher's tail, so the expected gradient is the full forward KL's, ``q - p``,
  and a top k holding little of a flat teacher's mass still trains every position on a token
  (``bucket`` leaves the tail's shape to the student). ``fkl`` and ``ce`` only; it needs the
  batch's labels (a cache's collate passes them). At k = the whole vocabulary it is the exact
  forward KL.

``renorm`` and ``uniform`` are full distributions over the vocabulary, written into the loop's
buffer like any :class:`~kdkit.lm.targets.TeacherTarget`. ``bucket``, ``drop`` and ``label`` are
not, so they give the loop the value and gradient themselves (:meth:`TopKTarget.value_and_grad`).

The cache holds log-probabilities at its capture temperature. At another KD temperature only
``renorm`` stays exact (the top-k logits are known up to a constant; the tail's shape is not),
so the others are refused then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from kdkit.errors import KDError
from kdkit.lm.divergence import divergence_value, log1mexp, value_and_grad

__all__ = [
    "TAIL_POLICIES",
    "TopKTarget",
    "label_value_and_grad",
    "log1mexp",
]

TAIL_POLICIES = ("bucket", "renorm", "uniform", "prior", "drop", "label")
_SPARSE = ("bucket", "drop", "label")


def label_value_and_grad(
    divergence: str,
    log_q: torch.Tensor,
    sid: torch.Tensor,
    p: torch.Tensor,
    labels: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``label`` tail: ``(value, top-k forward KL, dD/dz into grad_out)`` per row.

    ``sid`` ``[rows, k]``: the student ids the top k land on (-1 = nowhere: that mass is left
    out, as the tail's); ``p`` ``[rows, k]`` their teacher probabilities (ids may repeat: their
    mass adds up); ``labels`` ``[rows]`` the text's next token (< 0: none). With ``P`` the
    mass per student id and ``o = 1`` where the label is not among the ids reached::

        value = sum_P P (log P - log q) + o * (-log q_label)     (ce: without sum P log P)
        dD/dz = (sum P + o) q - P - o * onehot(label)
    """
    n = log_q.shape[0]
    mapped = sid >= 0
    safe = sid.clamp(min=0)
    p = torch.where(mapped, p, 0.0)
    lab = labels.clamp(min=0).unsqueeze(1)
    out = ((labels >= 0) & ~((sid == lab) & mapped).any(1)).to(log_q.dtype)
    # sum over ids of P log P = sum over entries of p log P(its id); grad_out is the scratch
    big_p = grad_out.zero_().scatter_add_(1, safe, p).gather(1, safe)
    cross = -(p * log_q.gather(1, safe)).sum(1)
    kl = cross + (p * big_p.clamp_(min=torch.finfo(p.dtype).tiny).log()).sum(1)
    value = (cross if divergence == "ce" else kl) - out * log_q.gather(1, lab).squeeze(1)
    grad = torch.exp(log_q, out=grad_out).mul_((p.sum(1) + out).unsqueeze(1))
    grad.scatter_add_(1, safe, -p)
    grad[torch.arange(n, device=grad.device), lab.squeeze(1)] -= out
    return value, kl, grad


@dataclass(frozen=True)
class TopKTarget:
    """The cached top-k teacher for ``N`` trained tokens (in the batch's mask order).

    Attributes:
        ids: ``[N, k]`` int64 teacher token ids, by decreasing probability.
        logp: ``[N, k]`` float32 log-probabilities at ``capture_temperature``.
        tail: ``[N]`` float32 ``log(1 - sum exp(logp))`` (the mass outside the top k).
        vocab: the teacher's vocabulary rows (``uniform`` spreads over ``vocab - k``).
        policy: one of :data:`TAIL_POLICIES`.
        capture_temperature: the temperature the teacher's distribution was captured at.
        prior: ``[vocab]`` probabilities, the shape of the ``prior`` policy's tail.
        labels: ``[N]`` the text's next token at each entry (``label`` only).
    """

    ids: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor
    vocab: int
    policy: str = "bucket"
    capture_temperature: float = 1.0
    prior: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.policy not in TAIL_POLICIES:
            raise KDError(
                f"unknown tail policy {self.policy!r}; expected one of {list(TAIL_POLICIES)}"
            )
        if self.policy == "prior" and (self.prior is None or self.prior.shape != (self.vocab,)):
            raise KDError(f"tail policy 'prior' needs prior= a [{self.vocab}] distribution")
        if self.policy == "label" and (self.labels is None or self.labels.shape != self.tail.shape):
            have = "none" if self.labels is None else tuple(self.labels.shape)
            raise KDError(
                f"tail policy 'label' needs labels= the text's next token at each of the "
                f"{self.tail.shape[0]} entries, got {have}"
            )
        if self.ids.shape != self.logp.shape or self.tail.shape != self.ids.shape[:1]:
            raise KDError(
                f"top-k target arrays disagree: ids {tuple(self.ids.shape)}, logp "
                f"{tuple(self.logp.shape)}, tail {tuple(self.tail.shape)}"
            )

    # -- the TeacherTarget protocol ------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return (self.ids.shape[0],)

    @property
    def vocab_rows(self) -> int:
        return self.vocab

    @property
    def sparse(self) -> bool:
        """True for the policies that give the loop a value and gradient (not a distribution)."""
        return self.policy in _SPARSE

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TopKTarget:
        moved = {
            k: getattr(self, k).to(device, non_blocking=non_blocking)
            for k in ("ids", "logp", "tail", "prior", "labels")
            if getattr(self, k) is not None
        }
        return replace(self, **moved)

    def check_use(self, temperature: float, divergence: str) -> None:
        """Refuse what would not be exact (see the module docstring)."""
        if self.policy == "renorm" and divergence == "rkl":
            raise KDError(
                "tail policy 'renorm' puts zero teacher mass outside the top k, where reverse KL "
                "is infinite; use distill.tail: bucket or uniform with divergence 'rkl'"
            )
        if self.policy in ("drop", "label") and divergence not in ("fkl", "ce"):
            raise KDError(
                f"tail policy {self.policy!r} is the sparse forward KL; divergence "
                f"{divergence!r} needs distill.tail: renorm, uniform or bucket"
            )
        if temperature != self.capture_temperature and self.policy != "renorm":
            raise KDError(
                f"the cache was captured at temperature {self.capture_temperature:g}; "
                f"distill.temperature {temperature:g} is exact only with distill.tail: renorm "
                f"(the tail's shape is not stored), or capture again at {temperature:g}"
            )

    def _top(self, rows: torch.Tensor, temperature: float, dtype: torch.dtype):
        rows = rows.to(self.ids.device)
        ids = self.ids.index_select(0, rows)
        logp = self.logp.index_select(0, rows).to(dtype)
        tail = self.tail.index_select(0, rows).to(dtype)
        if temperature != self.capture_temperature:  # renorm only (checked)
            logp = logp * (self.capture_temperature / temperature)
        return ids, logp, tail

    def log_probs(
        self,
        rows: torch.Tensor,
        *,
        vocab_size: int,
        temperature: float,
        out: torch.Tensor,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        """``renorm`` / ``uniform``: the full ``[rows, vocab_size]`` log-distribution."""
        if self.sparse:
            raise KDError(f"tail policy {self.policy!r} gives a value and gradient, not log_probs")
        ids, logp, tail = self._top(rows, temperature, out.dtype)
        k = ids.shape[1]
        if self.policy == "renorm":
            out.fill_(float("-inf"))
            logp = logp - torch.logsumexp(logp, dim=1, keepdim=True)
        elif self.policy == "uniform":  # normalized (decoded values may be off by rounding)
            rest = max(vocab_size - k, 1)
            total = torch.logaddexp(torch.logsumexp(logp, dim=1), tail)
            out.copy_((tail - total - math.log(rest)).unsqueeze(1))
            logp = logp - total.unsqueeze(1)
        else:  # prior: tail * prior_j / (prior mass outside this token's top k)
            prior = self.prior[:vocab_size].to(out.device, out.dtype)
            log_prior = (prior / prior.sum()).log()  # exactly 1 in the loop's precision
            outside = log1mexp(torch.logsumexp(log_prior[ids], dim=1))
            total = torch.logaddexp(torch.logsumexp(logp, dim=1), tail)
            torch.add(log_prior, (tail - total - outside).unsqueeze(1), out=out)
            logp = logp - total.unsqueeze(1)
        return out.scatter_(1, ids, logp)

    # -- bucket / drop: value and gradient straight from the student's log q --------------------
    def value_and_grad(
        self,
        divergence: str,
        log_q: torch.Tensor,
        rows: torch.Tensor,
        *,
        temperature: float,
        beta: float,
        skew: float,
        grad_out: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(value [rows], forward KL [rows], dD/dz)`` with ``dD/dz`` written into ``grad_out``
        (``[rows, V]``; z = student logits / T), for ``log_q = log_softmax(z)``."""
        ids, logp, tail = self._top(rows, temperature, log_q.dtype)
        if self.policy == "label":
            labels = self.labels.index_select(0, rows.to(self.labels.device)).to(log_q.device)
            return label_value_and_grad(divergence, log_q, ids, logp.exp(), labels, grad_out)
        lq_k = log_q.gather(1, ids)
        if self.policy == "bucket":
            # the student's rest as a logsumexp over the other ids (no 1 - Q cancellation when
            # the top k hold nearly all of it; exactly -inf when they are the whole vocabulary)
            rest = grad_out.copy_(log_q).scatter_(1, ids, float("-inf"))
            lq_rest = torch.logsumexp(rest, dim=1)
            if ids.shape[1] >= log_q.shape[1]:  # no rest: the stored tail is rounding only
                tail = torch.full_like(tail, float("-inf"))
        q = torch.exp(log_q, out=grad_out)
        if self.policy == "drop":
            p = logp.exp()
            value = (p * (logp - lq_k)).sum(1)
            if divergence == "ce":
                value = -(p * lq_k).sum(1)
            grad = q.mul_(p.sum(1, keepdim=True)).scatter_add_(1, ids, -p)
            return value, (p * (logp - lq_k)).sum(1), grad
        # bucket: the (k+1)-way distributions
        total = torch.logaddexp(torch.logsumexp(logp, dim=1), tail)  # normalize rounding
        lp_b = torch.cat([logp, tail.unsqueeze(1)], 1) - total.unsqueeze(1)
        lq_b = torch.cat([lq_k, lq_rest.unsqueeze(1)], 1)
        # an empty rest (-inf: the top k hold all the mass) on either side: a finite floor keeps
        # every 0 * log 0 term exactly 0, as the dense loop does
        floor = torch.finfo(lq_b.dtype).min / 4
        lp_b, lq_b = lp_b.clamp(min=floor), lq_b.clamp(min=floor)
        value, g_b = value_and_grad(divergence, lq_b, lp_b, beta=beta, skew=skew)
        kl = divergence_value("fkl", lq_b, lp_b)
        # rest ids: g_rest * q_j / (1 - Q); top-k ids: their own bucket's gradient
        scale = g_b[:, -1:] * torch.exp(-lq_b[:, -1:])
        grad = q.mul_(torch.nan_to_num(scale, nan=0.0, posinf=0.0))
        return value, kl, grad.scatter_(1, ids, g_b[:, :-1])
