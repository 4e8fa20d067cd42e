"""kdkit.lm: the divergences' analytic gradients and the fused loss against float64 dense references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import KDError
from kdkit.lm import DIVERGENCES, DenseLogits, DenseTeacher, token_divergence
from kdkit.lm.divergence import divergence_value, value_and_grad

# padded vocabularies: student head 37 rows, teacher 41, real shared vocabulary 35
H, HT, VS, VT, V = 6, 5, 37, 41, 35
PARAMS = dict(beta=0.3, skew=0.2)


def _setup(dtype=torch.float64, lead=(29,), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, H, generator=g, dtype=dtype).requires_grad_()
    head = nn.Linear(H, VS).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VS, H, generator=g))
        head.bias.copy_(torch.randn(VS, generator=g))
    t_head = nn.Linear(HT, VT).to(dtype)
    with torch.no_grad():
        t_head.weight.copy_(torch.randn(VT, HT, generator=g) * 1.5)
        t_head.bias.copy_(torch.randn(VT, generator=g))
    ht = torch.randn(*lead, HT, generator=g, dtype=dtype)
    mask = torch.rand(*lead, generator=g) > 0.3
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(*lead, generator=g) < 0.2] = -100
    return h, head, t_head, ht, mask, labels


def _dense(
    name, h, head, t_logits, mask, *, T, labels=None, ce_weight=0.0, reduction="mean", t2=True
):
    """The dense reference: full logits, -inf beyond V, autograd."""
    s = head(h).reshape(-1, VS)
    t = t_logits.reshape(-1, t_logits.shape[-1]).detach()
    pad = torch.full((s.shape[0], VS - V), float("-inf"), dtype=s.dtype)
    s_m = torch.cat([s[:, :V], pad], 1)  # masked with -inf, not truncated
    t_m = torch.cat([t[:, :V], torch.full((t.shape[0], VT - V), float("-inf"), dtype=t.dtype)], 1)
    lq = (s_m / T).log_softmax(-1)
    lp = (t_m / T).log_softmax(-1)[:, :VS]
    d = divergence_value(name, lq, lp, **PARAMS)
    m = mask.reshape(-1)
    loss = (1 - ce_weight) * (T * T if t2 else 1.0) * d[m].sum()
    if labels is not None:
        lab = labels.reshape(-1).clone()
        lab[~m] = -100
        loss = loss + ce_weight * F.cross_entropy(s_m, lab, ignore_index=-100, reduction="sum")
    return loss / m.sum() if reduction == "mean" else loss


def _grads(loss, h, head):
    loss.backward()
    out = [h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    h.grad = None
    head.zero_grad()
    return out


def _close(a, b, rtol):
    scale = b.abs().max().clamp_min(1e-30)
    assert float((a - b).abs().max() / scale) < rtol, (a, b)


class _Counting:
    """A TeacherTarget wrapper counting log_probs calls: proves the protocol seam and chunking."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.shape, self.vocab_rows = inner.shape, inner.vocab_rows

    def log_probs(self, rows, **kw):
        self.calls += 1
        return self.inner.log_probs(rows, **kw)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_analytic_gradient_matches_autograd(name):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(7, 13, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(7, 13, generator=g, dtype=torch.float64) * 3
    lq, lp = z.log_softmax(-1), t.log_softmax(-1)
    w = torch.randn(7, generator=g, dtype=torch.float64)
    ref = divergence_value(name, lq, lp, **PARAMS)
    (ref * w).sum().backward()
    value, grad = value_and_grad(name, lq.detach(), lp, **PARAMS)
    _close(value, ref.detach(), 1e-12)
    _close(grad * w[:, None], z.grad, 1e-12)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_fused_equals_float64_dense(name):
    """Masks, T != 1, padded vocab on both sides, CE mixing, many chunks: value and all grads."""
    h, head, t_head, ht, mask, labels = _setup()
    target = _Counting(DenseTeacher(ht, t_head))
    out = token_divergence(
        h, head, target, divergence=name, mask=mask, temperature=2.5, vocab_size=V,
        labels=labels, ce_weight=0.3, memory_budget_mb=1e-4, **PARAMS,
    )  # fmt: skip
    assert target.calls > 1  # the tiny budget forced several chunks
    got = _grads(out.loss, h, head)
    ref_loss = _dense(name, h, head, t_head(ht), mask, T=2.5, labels=labels, ce_weight=0.3)
    _close(out.loss.detach(), ref_loss.detach(), 1e-6)
    for a, b in zip(got, _grads(ref_loss, h, head), strict=True):
        _close(a, b, 1e-6)
    assert out.tokens == int(mask.sum())
    assert got[1][V:].abs().max() == 0 and got[2][V:].abs().max() == 0  # padded rows: no gradient


@pytest.mark.parametrize("name", ["fkl", "jsd", "skew_rkl", "tvd"])
def test_fp32_close_to_float64(name):
    h, head, t_head, ht, mask, _ = _setup()
    ref_loss = _dense(name, h, head, t_head(ht), mask, T=1.7)
    ref = [ref_loss.detach()] + _grads(ref_loss, h, head)
    h32 = h.detach().float().requires_grad_()
    head32 = nn.Linear(H, VS)
    head32.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    target = DenseTeacher(ht.float(), t_head.float())
    out = token_divergence(
        h32, head32, target, divergence=name, mask=mask, temperature=1.7, vocab_size=V,
        memory_budget_mb=1e-4, **PARAMS,
    )  # fmt: skip
    assert out.loss.dtype == torch.float32
    got = [out.loss.detach()] + _grads(out.loss, h32, head32)
    for a, b in zip(got, ref, strict=True):
        _close(a.double(), b, 1e-4)


def test_batched_input_dense_logits_and_metrics():
    """[B, L, H] with precomputed teacher logits; kl/ce/agree are the dense definitions."""
    h, head, t_head, ht, mask, labels = _setup(lead=(3, 8))
    t_logits = t_head(ht).detach()
    out = token_divergence(
        h, head, DenseLogits(t_logits), divergence="ce", mask=mask, temperature=2.0,
        vocab_size=V, labels=labels, ce_weight=0.0, memory_budget_mb=1e-4,
    )  # fmt: skip
    got = _grads(out.loss, h, head)
    ref_loss = _dense("ce", h, head, t_logits, mask, T=2.0)
    for a, b in zip(got, _grads(ref_loss, h, head), strict=True):
        _close(a, b, 1e-6)
    assert got[0].shape == (3, 8, H)
    m = mask.reshape(-1)
    with torch.no_grad():
        s = head(h).reshape(-1, VS)[m, :V]
        t = t_logits.reshape(-1, VT)[m, :V]
        kl = divergence_value("fkl", (s / 2).log_softmax(-1), (t / 2).log_softmax(-1)).mean()
        lab = labels.reshape(-1)[m]
        ce = F.cross_entropy(s[lab != -100], lab[lab != -100])
        agree = (s.argmax(-1) == t.argmax(-1)).double().mean()
    assert abs(float(out.kl) - float(kl)) < 1e-10  # the true KL, not the cross-entropy
    assert (
        float(out.kl) < float(out.loss.detach()) / 4
    )  # the loss (CE, T^2=4) carries the teacher entropy
    assert abs(float(out.ce) - float(ce)) < 1e-10
    assert abs(float(out.agree) - float(agree)) < 1e-12


def test_sum_is_mean_times_tokens_and_t2_off():
    h, head, t_head, ht, mask, labels = _setup()
    kw = dict(
        divergence="jsd", mask=mask, temperature=3.0, vocab_size=V, labels=labels, ce_weight=0.5
    )
    kw |= PARAMS
    mean = token_divergence(h, head, DenseTeacher(ht, t_head), **kw)
    total = token_divergence(h, head, DenseTeacher(ht, t_head), reduction="sum", **kw)
    g_mean = _grads(mean.loss, h, head)
    g_sum = _grads(total.loss, h, head)
    n = int(mask.sum())
    _close(total.loss.detach(), mean.loss.detach() * n, 1e-12)
    for a, b in zip(g_sum, g_mean, strict=True):
        _close(a, b * n, 1e-12)
    no_t2 = token_divergence(h, head, DenseTeacher(ht, t_head), t2=False, **kw)
    ref = _dense("jsd", h, head, t_head(ht), mask, T=3.0, labels=labels, ce_weight=0.5, t2=False)
    _close(no_t2.loss.detach(), ref.detach(), 1e-10)


def test_weight_tensor_head_and_grad_output_scaling():
    h, head, t_head, ht, mask, _ = _setup()
    w = head.weight.detach().clone().requires_grad_()
    out = token_divergence(h, w, DenseTeacher(ht, t_head.weight), vocab_size=V, mask=mask)
    (3.0 * out.loss).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = None
    s = (h.reshape(-1, H) @ w.T)[:, :V]
    t = (ht @ t_head.weight.T)[:, :V].detach()
    ref = divergence_value("fkl", s.log_softmax(-1), t.log_softmax(-1))[mask].mean()
    w.grad = None
    (3.0 * ref).backward()
    _close(gh, h.grad, 1e-10)
    _close(gw, w.grad, 1e-10)


def test_jsd_endpoints_follow_trl():
    h, head, t_head, ht, _, _ = _setup()
    kw = dict(vocab_size=V)
    for beta, same in ((0.0, "fkl"), (1.0, "rkl")):
        a = token_divergence(h, head, DenseTeacher(ht, t_head), divergence="jsd", beta=beta, **kw)
        b = token_divergence(h, head, DenseTeacher(ht, t_head), divergence=same, **kw)
        assert float(a.loss.detach()) == pytest.approx(float(b.loss.detach()), rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(divergence="fkk"), "did you mean fkl"),
        (dict(temperature=0.0), "temperature"),
        (dict(beta=1.5, divergence="jsd"), "beta"),
        (dict(skew=-0.1), "skew"),
        (dict(vocab_size=None), "37 .*41.*vocab_size="),
        (dict(vocab_size=40), "at most 37"),
        (dict(mask=torch.zeros(29, dtype=torch.bool)), "every token is masked"),
        (dict(mask=torch.ones(28, dtype=torch.bool)), "mask must have"),
        (dict(ce_weight=0.5), "needs labels"),
        (dict(reduction="batchmean"), "reduction"),
        (dict(memory_budget_mb=0), "memory_budget_mb"),
    ],
)
def test_errors_are_one_line_kderrors(kwargs, match):
    h, head, t_head, ht, _, _ = _setup()
    kw = dict(vocab_size=V) | kwargs
    with pytest.raises(KDError, match=match) as err:
        token_divergence(h, head, DenseTeacher(ht, t_head), **kw)
    assert "\n" not in str(err.value)


def test_shape_mismatches():
    h, head, t_head, ht, _, _ = _setup()
    with pytest.raises(KDError, match="do not match"):
        token_divergence(h, head, DenseTeacher(ht[:-1], t_head), vocab_size=V)
    with pytest.raises(KDError, match="hidden size"):
        token_divergence(h[:, :-1], head, DenseTeacher(ht, t_head), vocab_size=V)
    with pytest.raises(KDError, match="DenseTeacher hidden size"):
        DenseTeacher(ht[:, :-1], t_head)
    with pytest.raises(KDError, match="target must be"):
        token_divergence(h, head, t_head(ht), vocab_size=V)


@pytest.mark.parametrize("name", ["fkl", "jsd", "skew_fkl", "tvd", "ce"])
def test_explicit_minus_inf_teacher_logits(name):
    """A teacher that rules tokens out with -inf (p = 0) gives finite, exact values: 0 log 0 = 0."""
    h, head, t_head, ht, mask, _ = _setup()
    t_logits = t_head(ht).detach()
    t_logits[:, 3:9] = float("-inf")
    out = token_divergence(
        h, head, DenseLogits(t_logits), divergence=name, mask=mask, vocab_size=V,
        memory_budget_mb=1e-4, **PARAMS,
    )  # fmt: skip
    got = [out.loss.detach()] + _grads(out.loss, h, head)
    ref_loss = _dense(name, h, head, t_logits, mask, T=1.0)
    ref = [ref_loss.detach()] + _grads(ref_loss, h, head)
    for a, b in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        _close(a, b, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_on_cuda_never_waits_for_the_device(dtype):
    """No host read in the chunk loop or the backward (``set_sync_debug_mode("error")``), and
    bf16 hidden states/heads stay within bf16 rounding of the float64 reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    h, head, t_head, ht, _, labels = _setup(lead=(4, 64))
    ref = token_divergence(h, head, DenseTeacher(ht, t_head), labels=labels, ce_weight=0.3)
    ref.loss.backward()
    g_ref = h.grad.clone()
    dev = [t.detach().to("cuda", dtype) for t in (h, ht)]
    hd = dev[0].requires_grad_()
    head_d, t_head_d = head.to("cuda", dtype), t_head.to("cuda", dtype)
    target = DenseTeacher(dev[1], t_head_d)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = token_divergence(
            hd, head_d, target, labels=labels.cuda(), ce_weight=0.3, memory_budget_mb=0.01
        )
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=tol)
    torch.testing.assert_close(hd.grad.double().cpu(), g_ref, rtol=tol * 10, atol=tol)
