"""The fused loss on a cached top-k teacher: every tail policy's value and gradient against a
float64 reference built from the teacher's full distribution, and the codecs' error bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.lm import token_divergence
from kdkit.lm.cache.codec import decode_logp, encode_logp, pack_ids, unpack_ids
from kdkit.lm.cache.target import TopKTarget
from kdkit.lm.divergence import divergence_value

N, H, V, K = 23, 6, 40, 5
PARAMS = dict(beta=0.3, skew=0.2)


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_()
    head = nn.Linear(H, V, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    t_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2.0
    return h, head, t_logits


def _topk(t_logits):
    lp = torch.log_softmax(t_logits, -1)
    logp, ids = lp.topk(K, dim=-1)
    tail = torch.log1p(-logp.exp().sum(-1))
    return ids, logp, tail


def _reference(policy, name, h, head, t_logits):
    """The policy's definition, computed densely from the full teacher with autograd."""
    lq = torch.log_softmax(head(h), -1)
    full = torch.log_softmax(t_logits, -1)
    ids, logp, tail = _topk(t_logits)
    in_k = torch.zeros_like(full, dtype=torch.bool).scatter_(1, ids, True)
    if policy == "renorm":
        lp = torch.where(in_k, full - torch.logsumexp(logp, -1, keepdim=True), -torch.inf)
        return divergence_value(name, lq, lp, **PARAMS)
    if policy == "uniform":
        lp = torch.where(in_k, full, (tail - np.log(V - K)).unsqueeze(1))
        return divergence_value(name, lq, lp, **PARAMS)
    if policy == "prior":  # the tail's mass shaped like PRIOR outside each token's top k
        prior = PRIOR.double()
        outside = (prior * ~in_k).sum(1, keepdim=True)
        lp = torch.where(in_k, full, tail.unsqueeze(1) + (prior / outside).log())
        return divergence_value(name, lq, lp, **PARAMS)
    lq_k = lq.gather(1, ids)
    if policy == "drop":
        p = logp.exp()
        return (p * (logp - lq_k)).sum(1) if name == "fkl" else -(p * lq_k).sum(1)
    # bucket: the rest of the student computed independently, as a logsumexp outside the top k
    lq_rest = torch.logsumexp(torch.where(in_k, -torch.inf, lq), -1, keepdim=True)
    lp_b = torch.cat([logp, tail.unsqueeze(1)], 1)
    return divergence_value(name, torch.cat([lq_k, lq_rest], 1), lp_b, **PARAMS)


PRIOR = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(9)), 0)
CASES = [
    (p, d) for p in ("renorm", "uniform", "prior", "bucket") for d in ("fkl", "rkl", "jsd", "tvd")
]
CASES += [(p, d) for p in ("bucket", "uniform") for d in ("skew_fkl", "skew_rkl")]
CASES += [("drop", "fkl"), ("drop", "ce")]
CASES.remove(("renorm", "rkl"))


@pytest.mark.parametrize(("policy", "name"), CASES)
def test_tail_policy_equals_float64_reference(policy, name):
    h, head, t_logits = _setup()
    ref = _reference(policy, name, h, head, t_logits).sum()
    g_h, g_w = torch.autograd.grad(ref, (h, head.weight))
    ids, logp, tail = _topk(t_logits)
    prior = PRIOR if policy == "prior" else None
    target = TopKTarget(ids, logp, tail, V, policy=policy, prior=prior)
    out = token_divergence(
        h, head, target, divergence=name, reduction="sum", memory_budget_mb=0.002, **PARAMS
    )
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(ref), rel=1e-6)
    torch.testing.assert_close(h.grad, g_h, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(head.weight.grad, g_w, rtol=1e-6, atol=1e-9)
    assert float(out.kl) >= 0


def test_renorm_at_another_temperature_is_exact_and_others_are_refused():
    h, head, t_logits = _setup()
    ids, logp, tail = _topk(t_logits)
    T = 2.0
    lq = torch.log_softmax(head(h) / T, -1)
    z_k = t_logits.gather(1, ids) / T  # the top-k logits at T, renormalized over the top k
    lp = torch.full_like(lq, -torch.inf).scatter_(1, ids, torch.log_softmax(z_k, -1))
    ref = divergence_value("fkl", lq, lp).sum() * T * T
    out = token_divergence(
        h, head, TopKTarget(ids, logp, tail, V, policy="renorm"), temperature=T, reduction="sum"
    )
    assert float(out.loss.detach()) == pytest.approx(float(ref), rel=1e-6)
    for policy in ("bucket", "uniform", "prior", "drop"):
        target = TopKTarget(ids, logp, tail, V, policy=policy, prior=PRIOR)
        with pytest.raises(KDError, match="captured at temperature 1"):
            token_divergence(h, head, target, temperature=T)
    with pytest.raises(KDError, match="reverse KL"):
        token_divergence(h, head, TopKTarget(ids, logp, tail, V, policy="renorm"), divergence="rkl")
    with pytest.raises(KDError, match="sparse forward KL"):
        token_divergence(h, head, TopKTarget(ids, logp, tail, V, policy="drop"), divergence="jsd")


def test_id_bitpacking_round_trips_at_any_offset():
    rng = np.random.default_rng(0)
    for vocab in (2, 300, 32000, 128256):
        bits = max(1, int(np.ceil(np.log2(vocab))))
        ids = rng.integers(0, vocab, size=(37, 8))
        packed = pack_ids(ids, bits)
        assert packed.nbytes == -(-ids.size * bits // 8)  # ceil(log2 V) bits, nothing more
        assert np.array_equal(unpack_ids(packed, bits, 0, ids.size).reshape(ids.shape), ids)
        assert np.array_equal(unpack_ids(packed, bits, 8 * 5 + 3, 13), ids.reshape(-1)[43:56])
    with pytest.raises(KDError, match="does not fit"):
        pack_ids(np.array([300]), 8)


def test_logp_encodings_stay_within_their_bounds():
    g = torch.Generator().manual_seed(1)
    logp, _ = torch.log_softmax(torch.randn(200, 1000, generator=g) * 3, -1).topk(32, dim=-1)
    logp = logp.numpy()
    f16 = decode_logp(encode_logp(logp, "f16"), "f16", slice(None))
    assert np.abs(f16 - logp).max() <= 1e-3 * np.abs(logp).max()
    arrays = encode_logp(logp, "q8")
    q8 = decode_logp(arrays, "q8", slice(10, 20))
    span = (logp[10:20, :1] - logp[10:20, 1:]).max(axis=1)
    err = np.abs(q8 - logp[10:20]).max(axis=1)
    assert (err <= span / 255 / 2 + 2e-2).all()  # half a step, plus the fp16 top value
    with pytest.raises(KDError, match="unknown log-prob encoding"):
        encode_logp(logp, "q4")


def _label_reference(name, h, head, ids, logp, labels):
    """``label``: the sparse forward KL of the top k plus the label's cross-entropy where the
    label is not among them (float64, autograd)."""
    lq = torch.log_softmax(head(h), -1)
    p = logp.exp()
    lq_k = lq.gather(1, ids)
    top = (p * (logp - lq_k)).sum(1) if name == "fkl" else -(p * lq_k).sum(1)
    out = (labels >= 0) & ~(ids == labels.unsqueeze(1)).any(1)
    return top - torch.where(out, lq.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)


def _labels(t_logits, ids):
    """Half the labels inside the top k, half outside, one without a label (-100)."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::2] = ids[::2, 1]
    labels[5] = -100
    assert ((ids == labels.unsqueeze(1)).any(1) == False).sum() >= N // 3  # noqa: E712
    return labels


@pytest.mark.parametrize("name", ["fkl", "ce"])
def test_label_tail_equals_float64_reference(name):
    h, head, t_logits = _setup()
    ids, logp, tail = _topk(t_logits)
    labels = _labels(t_logits, ids)
    ref = _label_reference(name, h, head, ids, logp, labels).sum()
    g_h, g_w = torch.autograd.grad(ref, (h, head.weight))
    target = TopKTarget(ids, logp, tail, V, policy="label", labels=labels)
    out = token_divergence(
        h, head, target, divergence=name, reduction="sum", memory_budget_mb=0.002, **PARAMS
    )
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(ref), rel=1e-9)
    torch.testing.assert_close(h.grad, g_h, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, g_w, rtol=1e-9, atol=1e-12)


def test_label_tail_is_the_forward_kl_in_expectation_and_at_the_whole_vocabulary():
    """With the label drawn from the teacher, the expected gradient is the full forward KL's
    (q - p); with k = V the label is always inside and the loss is the forward KL itself."""
    from kdkit.lm.cache.target import label_value_and_grad

    _, _, t_logits = _setup()
    lp = torch.log_softmax(t_logits[:1], -1)  # one position, every possible label
    lq = torch.log_softmax(torch.randn(1, V, dtype=torch.float64), -1).expand(V, V).contiguous()
    ids, logp, _ = _topk(t_logits[:1])
    _, _, grad = label_value_and_grad(
        "fkl", lq, ids.expand(V, K), logp.exp().expand(V, K), torch.arange(V), torch.empty_like(lq)
    )
    expected = (lp.exp().T * grad).sum(0)  # sum over labels x of p(x) * grad(x)
    torch.testing.assert_close(expected, lq[0].exp() - lp[0].exp(), rtol=1e-12, atol=1e-14)
    h, head, t_logits = _setup()
    full = torch.log_softmax(t_logits, -1)
    ids = torch.arange(V).expand(N, V)
    labels = _labels(t_logits, ids[:, :K])
    target = TopKTarget(ids, full, torch.full((N,), -30.0), V, policy="label", labels=labels)
    out = token_divergence(h, head, target, divergence="fkl", reduction="sum")
    ref = divergence_value("fkl", torch.log_softmax(head(h), -1), full).sum()
    assert float(out.loss.detach()) == pytest.approx(float(ref), rel=1e-9)


def test_label_tail_needs_labels_and_a_forward_divergence():
    h, head, t_logits = _setup()
    ids, logp, tail = _topk(t_logits)
    with pytest.raises(KDError, match="needs labels="):
        TopKTarget(ids, logp, tail, V, policy="label")
    target = TopKTarget(ids, logp, tail, V, policy="label", labels=_labels(t_logits, ids))
    with pytest.raises(KDError, match="sparse forward KL"):
        token_divergence(h, head, target, divergence="jsd")
