"""The teacher projected onto the student's vocabulary: a target of the fused loss.

For each trained student position (the batch's mask order) the target knows its teacher
partner (:mod:`.align`; -1 = none). At a paired position the teacher's next-token distribution
``p`` (its own vocabulary, at the KD temperature) is pushed through the vocabulary map
(:mod:`.vocabmap`): ``P[s] = sum of p[t] over teacher tokens t whose text starts with student
token s`` (X-Token's projection, arXiv 2605.21699). With ``m = sum P`` the mass the map placed,
the loss per position is::

    m * D(P / m || q)  +  uld_weight * ULD(p on unmapped teacher ids, q on unreached student ids)

``D`` is the run's divergence; ULD (Boizard et al. 2024, arXiv 2402.12030) is the L1 distance
between the two sorted probability vectors (zero-padded), for the mass the map cannot place and
the student ids no teacher token reaches. ``method: uld`` is ULD alone over both whole
vocabularies (the baseline). A position with no teacher partner (inside a span where the two
tokenizations disagree, e.g. the second digit of a number the teacher keeps whole) is trained on
the text's own next token (a one-hot teacher: cross-entropy), so no student position goes
untrained.

The target is *sparse* in the fused loop's sense: it returns the value and the gradient with
respect to ``z = student logits / T`` itself (:meth:`XTokTarget.value_and_grad`), chunk by
chunk; the teacher's ``[rows, Vt]`` log-probabilities come from any
:class:`~kdkit.lm.targets.TeacherTarget` over the teacher's own rows (an online
:class:`~kdkit.lm.targets.DenseTeacher`, a cached top-k), so nothing ``[tokens, V]`` is kept.
``extra_per_row`` tells the loop's chunk sizing what this costs per row, keeping the memory bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from kdkit.errors import KDError
from kdkit.lm.divergence import value_and_grad
from kdkit.lm.targets import TeacherTarget
from kdkit.lm.xtok.bucket import bucket_value_and_grad, label_projected
from kdkit.lm.xtok.vocabmap import VocabMap

__all__ = ["METHODS", "Projection", "XTokTarget", "uld_value_and_grad"]

METHODS = ("project", "exact", "uld")


@dataclass(frozen=True)
class Projection:
    """A :class:`~.vocabmap.VocabMap` as index tensors (built once per run, moved once)."""

    src: torch.Tensor  # teacher ids that map
    dst: torch.Tensor  # their student ids
    unmapped: torch.Tensor  # teacher ids that do not map
    unreached: torch.Tensor  # student ids no teacher id maps to
    kind: torch.Tensor  # [Vt] int64 map kind (for the mass report)
    first: torch.Tensor  # [Vt] int64 student id or -1 (the map itself)
    teacher_vocab: int
    student_vocab: int

    @classmethod
    def of(cls, m: VocabMap, method: str = "project") -> Projection:
        if method not in METHODS:
            raise KDError(
                f"unknown cross_tokenizer method {method!r}; expected one of {list(METHODS)}"
            )
        if method == "exact":
            m = m.only_exact()
        first = torch.from_numpy(np.asarray(m.first, dtype=np.int64))
        mapped = first >= 0
        reached = torch.zeros(m.student_vocab, dtype=torch.bool)
        reached[first[mapped]] = True
        return cls(
            src=mapped.nonzero().squeeze(1),
            dst=first[mapped],
            unmapped=(~mapped).nonzero().squeeze(1),
            unreached=(~reached).nonzero().squeeze(1),
            kind=torch.from_numpy(np.asarray(m.kind, dtype=np.int64)),
            first=first,
            teacher_vocab=m.teacher_vocab,
            student_vocab=m.student_vocab,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Projection:
        moved = {
            k: getattr(self, k).to(device, non_blocking=non_blocking)
            for k in ("src", "dst", "unmapped", "unreached", "kind", "first")
        }
        return replace(self, **moved)


def uld_value_and_grad(
    q: torch.Tensor, cols: torch.Tensor | None, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ULD per row, ``sum_k |sort(q[:, cols])[k] - sort(p)[k]|`` (both descending, zero-padded),
    and its gradient with respect to ``q`` (``[rows, V]``, zero off ``cols``). ``cols`` None =
    every column."""
    sel = q if cols is None else q.index_select(1, cols)
    qs, order = sel.sort(dim=1, descending=True)
    ps = p.sort(dim=1, descending=True).values
    n, k = qs.shape[1], ps.shape[1]
    extra = ps[:, n:].sum(1) if k > n else qs.new_zeros(qs.shape[0])
    if k < n:
        ps = torch.cat([ps, ps.new_zeros(ps.shape[0], n - k)], 1)
    diff = qs - ps[:, :n]
    value = diff.abs().sum(1) + extra
    g_sel = torch.zeros_like(sel).scatter_(1, order, torch.sign(diff))
    if cols is None:
        return value, g_sel
    return value, torch.zeros_like(q).index_copy_(1, cols, g_sel)


def _softmax_grad(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``dD/dz = q * (g - <q, g>)`` from ``g = dD/dq`` (the softmax Jacobian)."""
    return q * (g - (q * g).sum(1, keepdim=True))


@dataclass(frozen=True)
class XTokTarget:
    """The projected teacher for ``N`` student rows (mask order).

    Attributes:
        teacher: a :class:`TeacherTarget` over the teacher's own (flattened) rows.
        index: ``[N]`` int64, the teacher row of each student row, -1 = no partner.
        projection: the vocabulary map as tensors (:class:`Projection`).
        labels: ``[N]`` the text's next student token (for rows without a partner), or None.
        method: ``project`` (P-KL + ULD on the rest), ``exact`` (the same, exact matches
            only: GOLD's split) or ``uld`` (ULD alone).
        uld_weight: weight of the ULD term.
        mass: ``[4]`` float64, teacher mass summed over paired rows by map kind (unmapped,
            exact, decomposed, special): where the mass went, measured.
    """

    teacher: TeacherTarget
    index: torch.Tensor
    projection: Projection
    labels: torch.Tensor | None = None
    method: str = "project"
    uld_weight: float = 1.0
    mass: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))

    sparse = True

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.index.shape[0]),)

    @property
    def vocab_rows(self) -> int:
        return self.projection.student_vocab

    @property
    def extra_per_row(self) -> int:
        """``[rows, *]`` elements this target allocates per row beyond the loop's own: a
        teacher's ``[rows, Vt]`` distribution and its projection, or, from a cached top k
        with the ``bucket`` or ``label`` tail (:mod:`.bucket`, in the loop's gradient
        buffer), the rows without a partner (their log q and gradient) and the rare rows
        whose rest needs a logsumexp (one copy)."""
        if getattr(self.teacher, "policy", None) in ("bucket", "label"):
            return 3 * self.projection.student_vocab
        return 2 * self.projection.teacher_vocab + 3 * self.projection.student_vocab

    def check_use(self, temperature: float, divergence: str) -> None:
        if divergence == "rkl" and self.method != "uld":
            raise KDError(
                "cross-tokenizer KD projects the teacher onto the student's vocabulary, which "
                "leaves student ids with zero teacher mass, where reverse KL is infinite; use "
                "divergence fkl, jsd, skew_rkl or tvd"
            )
        check = getattr(self.teacher, "check_use", None)
        if check is not None:  # the projection runs the forward KL, unless the text's token does
            label = getattr(self.teacher, "policy", None) == "label"
            check(temperature, divergence if label else "fkl")

    def log_probs(self, *args, **kwargs) -> torch.Tensor:
        raise KDError("a cross-tokenizer target gives a value and gradient, not log_probs")

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(value, forward KL, dD/dz into grad_out, teacher top-1 in student ids)`` per row.

        The chunk is computed whole (rows without a partner borrow a teacher row, then get
        their cross-entropy written over it): no ``[rows, V]`` gather or scatter per chunk."""
        n = rows.numel()
        dev, dt = log_q.device, log_q.dtype
        trow = self.index.index_select(0, rows.to(self.index.device)).to(dev)
        lone = (trow < 0).nonzero().squeeze(1)
        if lone.numel() == n:  # nobody pairs: cross-entropy (or nothing) only
            value, kl = log_q.new_zeros(n), log_q.new_zeros(n)
            top1 = torch.full((n,), -1, dtype=torch.long, device=dev)
            grad_out.zero_()
            self._lone(log_q, rows, lone, value, grad_out, top1)
            return value, kl, grad_out, top1
        pr = self.projection
        if getattr(self.teacher, "policy", None) in ("bucket", "label"):  # a cached top k
            return self._bucket(divergence, log_q, rows, trow, lone, beta, skew, grad_out)
        vt = pr.teacher_vocab
        buf = torch.empty(2, n, vt, dtype=dt, device=dev)
        self.teacher.log_probs(
            trow.clamp(min=0), vocab_size=vt, temperature=temperature, out=buf[0], scratch=buf[1]
        )
        p_t = torch.exp(buf[0], out=buf[1])
        weights = (trow >= 0).to(dt)
        self.mass.index_add_(0, pr.kind.to(dev), (weights @ p_t).to(self.mass.dtype))
        lone_out = self._lone_values(log_q, rows, lone)  # before q overwrites grad_out
        q = torch.exp(log_q, out=grad_out)
        kl = log_q.new_zeros(n)
        every = pr.src.numel() == vt  # every teacher id maps: no gather
        proj = torch.zeros_like(q).index_add_(
            1, pr.dst, p_t if every else p_t.index_select(1, pr.src)
        )
        top1 = proj.argmax(1)
        if self.method == "uld":
            v, g_q = uld_value_and_grad(q, None, p_t)
            g = _softmax_grad(q, g_q).mul_(self.uld_weight)
            value = v * self.uld_weight
        else:
            m = proj.sum(1, keepdim=True)
            proj.div_(m.clamp(min=torch.finfo(dt).tiny))
            lp = torch.log(proj).clamp_(min=torch.finfo(dt).min / 4)
            uld = None
            if self.uld_weight and pr.unmapped.numel():  # before q is consumed below
                u, g_q = uld_value_and_grad(q, pr.unreached, p_t.index_select(1, pr.unmapped))
                uld = (u, _softmax_grad(q, g_q))
            del buf, p_t
            value, g = value_and_grad(divergence, log_q, lp, beta=beta, skew=skew, q=q, p=proj)
            # the forward KL of the projection, for the log (the value itself for fkl)
            kl = value.clone() if divergence == "fkl" else proj.mul_(lp.sub_(log_q)).sum(1)
            value = value * m.squeeze(1)
            g.mul_(m)
            if uld is not None:
                value = value + self.uld_weight * uld[0]
                g.add_(uld[1], alpha=self.uld_weight)
        if g.data_ptr() != grad_out.data_ptr():
            grad_out.copy_(g)
        if lone.numel():
            kl[lone] = 0.0
            value[lone], grad_out[lone], top1[lone] = lone_out
        return value, kl, grad_out, top1

    def _bucket(self, divergence, log_q, rows, trow, lone, beta, skew, grad_out):
        """A cached top k with the ``bucket`` or ``label`` tail (:mod:`.bucket`)."""
        t = self.teacher
        lone_out = self._lone_values(log_q, rows, lone)
        safe = trow.clamp(min=0).to(t.ids.device)
        ids = t.ids.index_select(0, safe).to(log_q.device)
        logp = t.logp.index_select(0, safe).to(log_q.dtype).to(log_q.device)
        tail = t.tail.index_select(0, safe).to(log_q.dtype).to(log_q.device)
        first = self.projection.first
        if t.policy == "label":
            if self.labels is None:
                raise KDError("tail policy 'label' needs the student's labels in the target")
            labels = self.labels.index_select(0, rows.to(self.labels.device)).to(log_q.device)
            value, kl, grad, top1 = label_projected(
                divergence, log_q, ids, logp, first, labels, grad_out
            )
        else:
            value, kl, grad, top1 = bucket_value_and_grad(
                divergence, log_q, ids, logp, tail, first, grad_out, beta=beta, skew=skew
            )
        paired = trow >= 0
        kind = self.projection.kind[ids].to(log_q.device)
        mass = torch.zeros(4, dtype=self.mass.dtype, device=log_q.device)
        mass.index_add_(0, kind[paired].reshape(-1), logp.exp()[paired].reshape(-1).to(mass.dtype))
        mass[0] += tail.exp()[paired].sum().to(mass.dtype)  # the tail: unmapped, as far as known
        self.mass.add_(mass.to(self.mass.device))
        if lone.numel():
            kl[lone] = 0.0
            value[lone], grad_out[lone], top1[lone] = lone_out
        return value, kl, grad_out, top1

    def _lone_values(self, log_q: torch.Tensor, rows: torch.Tensor, lone: torch.Tensor):
        """``(value, dD/dz, top-1)`` of the rows without a partner: the text's own next token
        (cross-entropy), or nothing (0) without labels or with label -100."""
        lq = log_q.index_select(0, lone)
        value = lq.new_zeros(len(lone))
        top1 = torch.full((len(lone),), -1, dtype=torch.long, device=lq.device)
        if self.labels is None:
            return value, torch.zeros_like(lq), top1
        lab = self.labels.index_select(0, rows.to(self.labels.device)).to(lq.device)[lone]
        ok = (lab >= 0).nonzero().squeeze(1)
        safe = lab.clamp(min=0)
        g = lq.exp()
        g[ok, safe[ok]] -= 1.0
        g[(lab < 0).nonzero().squeeze(1)] = 0.0
        value[ok] = -lq[ok, safe[ok]]
        top1[ok] = lab[ok]
        return value, g, top1

    def _lone(self, log_q, rows, lone, value, grad_out, top1) -> None:
        value[lone], grad_out[lone], top1[lone] = self._lone_values(log_q, rows, lone)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> XTokTarget:
        return replace(
            self,
            teacher=self.teacher.to(device) if hasattr(self.teacher, "to") else self.teacher,
            index=self.index.to(device, non_blocking=non_blocking),
            projection=self.projection.to(device, non_blocking=non_blocking),
            labels=None if self.labels is None else self.labels.to(device),
        )
