"""The cross-tokenizer target in the fused loss, against a float64 dense reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdkit.errors import KDError
from kdkit.lm import token_divergence
from kdkit.lm.divergence import divergence_value
from kdkit.lm.targets import DenseTeacher
from kdkit.lm.xtok.bucket import bucket_value_and_grad
from kdkit.lm.xtok.target import Projection, XTokTarget
from kdkit.lm.xtok.vocabmap import DECOMPOSED, EXACT, SPECIAL, UNMAPPED, VocabMap

VS, VT, H, HT = 23, 31, 8, 6


def _map(seed: int = 0) -> VocabMap:
    g = np.random.default_rng(seed)
    first = g.integers(0, VS - 4, VT)  # student ids VS-4.. are reached by nothing
    kind = g.choice([EXACT, DECOMPOSED], VT).astype(np.int8)
    first[[3, 7, 11]] = -1
    kind[[3, 7, 11]] = UNMAPPED
    kind[0] = SPECIAL
    return VocabMap(first, kind, np.ones(VT, np.int32), VS, "test")


def _problem(seed: int = 0, n: int = 40, nt: int = 50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(VS, H, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(nt, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(VT, HT, generator=g, dtype=torch.float64)
    index = torch.randint(0, nt, (n,), generator=g)
    index[torch.rand(n, generator=g) < 0.3] = -1
    labels = torch.randint(0, VS, (n,), generator=g)
    return h, w, ht, wt, index, labels


def _reference(h, w, ht, wt, index, labels, m: VocabMap, *, div, temperature, uld_weight, method):
    """The loss written densely with autograd, float64: projection matrix, sorted L1."""
    lq = torch.log_softmax(h @ w.T / temperature, -1)
    q = lq.exp()
    p_t = torch.softmax(ht @ wt.T / temperature, -1)
    first = torch.from_numpy(m.first)
    proj_m = torch.zeros(VT, VS, dtype=torch.float64)
    ok = first >= 0
    proj_m[ok.nonzero().squeeze(1), first[ok]] = 1.0
    total = h.new_zeros(())
    for i in range(h.shape[0]):
        j = int(index[i])
        if j < 0:
            total = total - lq[i, labels[i]]
            continue
        p = p_t[j]
        if method == "uld":
            qs = q[i].sort(descending=True).values
            ps = torch.cat([p.sort(descending=True).values[:VS]])
            ps = torch.nn.functional.pad(ps, (0, max(0, VS - ps.numel())))
            extra = p.sort(descending=True).values[VS:].sum()
            total = total + uld_weight * ((qs - ps[:VS]).abs().sum() + extra)
            continue
        proj = p @ proj_m
        mass = proj.sum()
        lp = torch.log(proj / mass).clamp(min=torch.finfo(torch.float64).min / 4)
        total = total + mass * divergence_value(div, lq[i : i + 1], lp[None])[0]
        unmapped, reached = ~ok, torch.zeros(VS, dtype=torch.bool)
        reached[first[ok]] = True
        qs = q[i][~reached].sort(descending=True).values
        ps = p[unmapped].sort(descending=True).values
        n = qs.numel()
        ps_pad = torch.nn.functional.pad(ps, (0, max(0, n - ps.numel())))
        total = total + uld_weight * ((qs - ps_pad[:n]).abs().sum() + ps[n:].sum())
    return total * temperature**2 / h.shape[0]


@pytest.mark.parametrize(
    "div,temperature,method,uld_weight",
    [
        ("fkl", 1.0, "project", 1.0),
        ("fkl", 2.0, "project", 0.5),
        ("jsd", 1.0, "project", 1.0),
        ("tvd", 1.5, "project", 0.0),
        ("fkl", 1.0, "uld", 1.0),
    ],
)
def test_fused_equals_the_float64_dense_reference(div, temperature, method, uld_weight):
    m = _map()
    h, w, ht, wt, index, labels = _problem()
    target = XTokTarget(
        DenseTeacher(ht, wt), index, Projection.of(m, method), labels, method, uld_weight
    )
    out = token_divergence(
        h, w, target, divergence=div, temperature=temperature, memory_budget_mb=0.02
    )
    g_h, g_w = torch.autograd.grad(out.loss, (h, w))
    ref = _reference(
        h,
        w,
        ht,
        wt,
        index,
        labels,
        m,
        div=div,
        temperature=temperature,
        uld_weight=uld_weight,
        method=method,
    )
    r_h, r_w = torch.autograd.grad(ref, (h, w))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(g_h, r_h, rtol=1e-7, atol=1e-10)
    assert torch.allclose(g_w, r_w, rtol=1e-7, atol=1e-10)
    paired = int((index >= 0).sum())
    assert target.mass.sum().item() == pytest.approx(paired)  # each paired row's p sums to 1


def test_chunking_does_not_change_the_loss():
    m = _map(1)
    h, w, ht, wt, index, labels = _problem(1, n=64)
    outs = []
    for budget in (0.01, 64):
        target = XTokTarget(DenseTeacher(ht, wt), index, Projection.of(m), labels)
        out = token_divergence(h, w, target, memory_budget_mb=budget)
        outs.append((out.loss.item(), *torch.autograd.grad(out.loss, (h, w))))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-12)
    assert torch.allclose(outs[0][1], outs[1][1]) and torch.allclose(outs[0][2], outs[1][2])


def test_exact_method_drops_decomposed_tokens():
    m = _map()
    pr = Projection.of(m, "exact")
    assert set(pr.src.tolist()) == set(
        np.flatnonzero((m.kind == EXACT) | (m.kind == SPECIAL)).tolist()
    )


def test_reverse_kl_is_refused_on_a_projection():
    m = _map()
    h, w, ht, wt, index, labels = _problem()
    target = XTokTarget(DenseTeacher(ht, wt), index, Projection.of(m), labels)
    with pytest.raises(KDError, match="reverse KL is infinite"):
        token_divergence(h, w, target, divergence="rkl")


def test_an_identity_map_and_alignment_give_the_same_tokenizer_loss():
    """The cross-tokenizer loss reduces to today's loss for identical tokenizers (runs never
    take it then: kdkit train keeps the same-tokenizer path; this pins the math)."""
    ident = VocabMap(np.arange(VS), np.full(VS, EXACT, np.int8), np.ones(VS, np.int32), VS, "id")
    g = torch.Generator().manual_seed(3)
    h = torch.randn(30, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(VS, H, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(30, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(VS, HT, generator=g, dtype=torch.float64)
    for div in ("fkl", "jsd", "tvd"):
        x = XTokTarget(DenseTeacher(ht, wt), torch.arange(30), Projection.of(ident))
        a = token_divergence(h, w, x, divergence=div, temperature=2.0)
        b = token_divergence(h, w, DenseTeacher(ht, wt), divergence=div, temperature=2.0)
        ga, gb = torch.autograd.grad(a.loss, (h, w)), torch.autograd.grad(b.loss, (h, w))
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-12)
        assert all(
            torch.allclose(u, v, rtol=1e-10, atol=1e-13) for u, v in zip(ga, gb, strict=True)
        )
        assert a.agree.item() == b.agree.item()


def _bucket_reference(h, w, index, labels, ids, logp, tail, m: VocabMap, div):
    """The bucket target written densely with autograd, float64."""
    lq = torch.log_softmax(h @ w.T, -1)
    return sum(_bucket_rows(lq, index, labels, ids, logp, tail, m, div)[0]) / h.shape[0]


def _bucket_rows(lq, index, labels, ids, logp, tail, m: VocabMap, div):
    """Per row, the bucket target's value (dense, with autograd) and the projection's top-1."""
    first = torch.from_numpy(m.first)
    values, tops = [], []
    for i in range(lq.shape[0]):
        j = int(index[i])
        if j < 0:
            values.append(-lq[i, labels[i]])
            tops.append(-1)
            continue
        p = logp[j].exp()
        all_mass = p.sum() + tail[j].exp()
        sid = first[ids[j]]
        ok = sid >= 0
        proj = torch.zeros(VS, dtype=torch.float64).index_add(0, sid[ok], p[ok]) / all_mass
        known = torch.zeros(VS, dtype=torch.bool)
        known[sid[ok]] = True
        rest = (tail[j].exp() + p[~ok].sum()) / all_mass
        lp_b = torch.cat([proj[known].log(), rest.log()[None]])
        lq_b = torch.cat([lq[i][known], torch.logsumexp(lq[i][~known], 0)[None]])
        values.append(divergence_value(div, lq_b[None], lp_b[None])[0])
        tops.append(int(proj.argmax()))
    return values, tops


def _cached_problem():
    """A map, a student problem and a teacher's top 6 over 20 rows (float64), for the cached
    tails: ``(map, h, w, index, labels, ids, logp, tail)``."""
    m = _map(2)
    g = torch.Generator().manual_seed(5)
    h, w, _, _, index, labels = _problem(2, nt=20)
    logits = torch.randn(20, VT, generator=g, dtype=torch.float64)
    top = torch.log_softmax(logits, -1).topk(6, dim=1)
    ids, logp = top.indices, top.values
    return m, h, w, index, labels, ids, logp, torch.log1p(-logp.exp().sum(1))


@pytest.mark.parametrize("div", ["fkl", "jsd", "tvd"])
def test_a_cached_top_k_with_a_bucket_tail_equals_its_dense_reference(div):
    from kdkit.lm.cache import TopKTarget

    m, h, w, index, labels, ids, logp, tail = _cached_problem()
    cached = TopKTarget(ids, logp, tail, VT, policy="bucket")
    target = XTokTarget(cached, index, Projection.of(m), labels)
    out = token_divergence(h, w, target, divergence=div, memory_budget_mb=0.02)
    g_h, g_w = torch.autograd.grad(out.loss, (h, w))
    ref = _bucket_reference(h, w, index, labels, ids, logp, tail, m, div)
    r_h, r_w = torch.autograd.grad(ref, (h, w))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9)
    assert torch.allclose(g_h, r_h, rtol=1e-7, atol=1e-10)
    assert torch.allclose(g_w, r_w, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("div", ["fkl", "jsd", "skew_rkl"])
def test_the_sparse_bucket_equals_its_dense_reference_at_the_edges(div, dtype):
    """The bucket on ``[rows, k + 1]`` (:func:`bucket_value_and_grad`) against the dense
    reference, on what the sparse form must get right: many top-k ids on one student id, unmapped
    ids, a row whose top k map nowhere, and rows whose rest holds almost nothing (q summed there
    would meet subnormals: the logsumexp fallback), in float64 and float32."""
    m = _map(4)
    g = torch.Generator().manual_seed(7)
    n, k = 12, 9
    logits = torch.randn(n, VT, generator=g, dtype=torch.float64)
    logits[0, [3, 7, 11]] += 30.0  # row 0: its top k mostly unmapped
    top = torch.log_softmax(logits, -1).topk(k, dim=1)
    ids, logp = top.indices, top.values
    ids[1] = torch.tensor([3, 7, 11, 3, 7, 11, 3, 7, 11])  # row 1: maps nowhere
    tail = torch.log1p(-logp.exp().sum(1))
    first = torch.from_numpy(m.first)
    z = torch.randn(n, VS, generator=g, dtype=torch.float64)
    low = -690.0 if dtype == torch.float64 else -70.0  # below the fallback's threshold
    for i in (2, 3):  # the rest all but empty: every id the top k do not reach far below
        reached = torch.zeros(VS, dtype=torch.bool)
        reached[first[ids[i]][first[ids[i]] >= 0]] = True
        z[i, ~reached] = low + torch.rand(int((~reached).sum()), generator=g, dtype=z.dtype)
    z.requires_grad_(True)
    lq = torch.log_softmax(z, -1)
    index, labels = torch.arange(n), torch.zeros(n, dtype=torch.long)
    values, tops = _bucket_rows(lq, index, labels, ids, logp, tail, m, div)
    r_grad = torch.autograd.grad(sum(values), z)[0]
    lq_t = lq.detach().to(dtype)
    grad_out = torch.empty_like(lq_t)
    value, kl, grad, top1 = bucket_value_and_grad(
        div, lq_t, ids, logp.to(dtype), tail.to(dtype), first, grad_out, beta=0.5, skew=0.1
    )
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    assert grad.data_ptr() == grad_out.data_ptr()
    assert torch.allclose(value.double(), torch.stack(values).detach(), **tol)
    assert torch.allclose(grad.double(), r_grad, **tol)
    assert top1.tolist() == [max(t, 0) for t in tops]  # no top-k id maps: 0, as the argmax
    ref_kl, _ = _bucket_rows(lq.detach(), index, labels, ids, logp, tail, m, "fkl")
    assert torch.allclose(kl.double(), torch.stack(ref_kl), **tol)


def _label_reference(h, w, index, labels, ids, logp, m: VocabMap, div):
    """The label target written densely with autograd, float64: the projected top k (unmapped
    ids left out) as a sparse forward KL, plus the label's cross-entropy where no top-k id
    reaches it; rows without a partner: cross-entropy."""
    lq = torch.log_softmax(h @ w.T, -1)
    first = torch.from_numpy(m.first)
    total = h.new_zeros(())
    for i in range(h.shape[0]):
        j = int(index[i])
        if j < 0:
            total = total - lq[i, labels[i]]
            continue
        sid = first[ids[j]]
        ok = sid >= 0
        proj = torch.zeros(VS, dtype=torch.float64).index_add(0, sid[ok], logp[j].exp()[ok])
        on = proj > 0
        total = total - (proj[on] * lq[i][on]).sum()
        if div == "fkl":
            total = total + (proj[on] * proj[on].log()).sum()
        if not bool(on[labels[i]]):
            total = total - lq[i, labels[i]]
    return total / h.shape[0]


@pytest.mark.parametrize("div", ["fkl", "ce"])
def test_a_cached_top_k_with_a_label_tail_equals_its_dense_reference(div):
    from kdkit.lm.cache import TopKTarget

    m, h, w, index, labels, ids, logp, tail = _cached_problem()
    first = torch.from_numpy(m.first)
    some = (index >= 0).nonzero().squeeze(1)[::2]
    labels[some] = first[ids[index[some], 0]].clamp(min=0)  # some labels reached by the top k
    reached = (first[ids[index.clamp(min=0)]] == labels.unsqueeze(1)).any(1) & (index >= 0)
    assert 0 < int(reached.sum()) < int((index >= 0).sum())
    teacher_labels = torch.zeros(20, dtype=torch.long)  # the teacher rows' own (unread here)
    cached = TopKTarget(ids, logp, tail, VT, policy="label", labels=teacher_labels)
    target = XTokTarget(cached, index, Projection.of(m), labels)
    out = token_divergence(h, w, target, divergence=div, memory_budget_mb=0.02)
    g_h, g_w = torch.autograd.grad(out.loss, (h, w))
    ref = _label_reference(h, w, index, labels, ids, logp, m, div)
    r_h, r_w = torch.autograd.grad(ref, (h, w))
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-9)
    assert torch.allclose(g_h, r_h, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g_w, r_w, rtol=1e-9, atol=1e-12)
    with pytest.raises(KDError, match="sparse forward KL"):
        token_divergence(h, w, target, divergence="jsd")
