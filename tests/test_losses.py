"""Losses against independent float64 numpy formulas, plus gradcheck and the error paths."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import KDError
from kdkit.losses import (
    DKD,
    LOSSES,
    MGD,
    RKD,
    AttentionTransfer,
    CosineEmbedding,
    FeatureMSE,
    HardLabel,
    SoftTargetKL,
    topk_to_logits,
    topk_to_probs,
)
from kdkit.losses._call import as_loss_module, takes_labels
from kdkit.teachers.base import TopK

# -- independent references (numpy, float64) -------------------------------------------------


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def log_softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def ref_kd(s, t, temperature, scale=True):
    """Hinton: T^2 * sum_c p (log p - log q), averaged over rows of (N, C)."""
    s, t = np64(s), np64(t)
    lp, lq = log_softmax(t / temperature), log_softmax(s / temperature)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1).mean()
    return kl * temperature**2 if scale else kl


def ref_dkd(s, t, target, alpha, beta, temperature):
    s, t = np64(s) / temperature, np64(t) / temperature
    total = 0.0
    for row in range(len(s)):
        p, q = np.exp(log_softmax(t[row], 0)), np.exp(log_softmax(s[row], 0))
        g = target[row]
        b_p, b_q = np.array([p[g], 1 - p[g]]), np.array([q[g], 1 - q[g]])
        tckd = (b_p * np.log(b_p / b_q)).sum()
        others = [c for c in range(len(p)) if c != g]
        pn, qn = p[others] / p[others].sum(), q[others] / q[others].sum()
        nckd = (pn * np.log(pn / qn)).sum()
        total += alpha * tckd + beta * nckd
    return total / len(s) * temperature**2


def smooth_l1(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return np.where(a < 1, 0.5 * a**2, a - 0.5)


def ref_rkd(s, t, wd, wa):
    s, t = np64(s).reshape(len(s), -1), np64(t).reshape(len(t), -1)
    n = len(s)
    pairs = list(itertools.combinations(range(n), 2))

    def dist(e):
        d = np.array([np.linalg.norm(e[i] - e[j]) for i, j in pairs])
        return d / d.mean()

    def angles(e):
        out = []
        for i, j, k in itertools.permutations(range(n), 3):
            u, v = e[i] - e[j], e[k] - e[j]
            out.append(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
        return np.array(out)

    return wd * smooth_l1(dist(s) - dist(t)).mean() + wa * smooth_l1(angles(s) - angles(t)).mean()


def ref_attention(f: np.ndarray, p: float) -> np.ndarray:
    a = (np.abs(f) ** p).mean(axis=1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum(dim=1).mean().item()


def peaked_logits(n: int, c: int) -> torch.Tensor:
    z = torch.randn(n, c, dtype=torch.float64)
    z[torch.arange(n), torch.randint(0, c, (n,))] += 8.0
    return z


# -- SoftTargetKL -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_target_kl_matches_reference(temperature):
    s, t = torch.randn(6, 7), torch.randn(6, 7) * 3
    got = SoftTargetKL(temperature)(s, t)
    assert got.item() == pytest.approx(ref_kd(s, t, temperature), rel=1e-5)


def test_soft_target_kl_applies_t_squared():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    kl_at_4 = ref_kd(s, t, 4.0, scale=False)
    assert SoftTargetKL(4.0)(s, t).item() == pytest.approx(16 * kl_at_4, rel=1e-5)
    assert SoftTargetKL(1.0)(s, t).item() == pytest.approx(ref_kd(s, t, 1.0, scale=False), 1e-5)


def test_soft_target_kl_is_a_mean_over_rows_and_positions():
    loss = SoftTargetKL(2.0)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    doubled = loss(torch.cat([s, s]), torch.cat([t, t]))
    assert doubled.item() == pytest.approx(loss(s, t).item(), rel=1e-6)
    s4, t4 = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    per_pixel = [loss(s4[:, :, h, w], t4[:, :, h, w]) for h in range(3) for w in range(4)]
    assert loss(s4, t4).item() == pytest.approx(torch.stack(per_pixel).mean().item(), rel=1e-5)
    flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    assert loss(s4, t4).item() == pytest.approx(ref_kd(flat(s4), flat(t4), 2.0), rel=1e-5)


def test_teacher_probabilities_are_used_as_is():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    from_logits = SoftTargetKL(3.0)(s, t)
    from_probs = SoftTargetKL(3.0, teacher_probs=True)(s, F.softmax(t / 3.0, dim=1))
    assert from_probs.item() == pytest.approx(from_logits.item(), rel=1e-5)
    one_hot = F.one_hot(torch.tensor([1, 0, 2, 5]), 6).float()  # zeros must not give nan
    assert torch.isfinite(SoftTargetKL(3.0, teacher_probs=True)(s, one_hot))


def test_topk_with_all_classes_equals_full_logits_exactly():
    s, t = torch.randn(4, 6, 2), torch.randn(4, 6, 2)
    perm = torch.randperm(6)  # indices need not be sorted
    v, i = t[:, perm], perm.view(1, 6, 1).expand(4, 6, 2).contiguous()
    for teacher in (TopK(v, i), (v, i)):
        assert torch.equal(SoftTargetKL(2.0)(s, teacher), SoftTargetKL(2.0)(s, t))
    assert torch.equal(topk_to_logits(v, i, 6), t)


@pytest.mark.parametrize("temperature,bound", [(1.0, 0.04), (4.0, 0.1)])
def test_topk_reconstruction_error_is_bounded_on_peaked_logits(temperature, bound):
    c, k = 100, 10
    z = peaked_logits(64, c)
    v, i = z.topk(k, dim=1)
    p = F.softmax(z / temperature, dim=1)
    rebuilt = topk_to_probs(v, i, c, temperature)
    assert rebuilt.sum(1).sub(1).abs().max() < 1e-12
    # the k stored classes keep their exact relative probabilities
    ratio = rebuilt.gather(1, i) / p.gather(1, i)
    assert torch.allclose(ratio / ratio[:, :1], torch.ones_like(ratio))
    # measured TV: 0.024 (T=1) and 0.080 (T=4); naive fill f = v_min: 0.093 / 0.096; the
    # best any even spread can do (the true tail mass, spread evenly): 0.016 / 0.067
    naive = F.softmax(v[:, -1:].expand(-1, c).scatter(1, i, v) / temperature, dim=1)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(1, i, False)
    oracle = torch.where(tail, (p * tail).sum(1, keepdim=True) / (c - k), p)
    error = total_variation(p, rebuilt)
    assert error < bound and error < total_variation(p, naive)
    assert error < 1.6 * total_variation(p, oracle)
    if temperature == 1.0:  # the gradient the student gets is close to the full-logit one
        s = (z + torch.randn_like(z)).requires_grad_()
        (g_full,) = torch.autograd.grad(SoftTargetKL(temperature)(s, z), s)
        (g_topk,) = torch.autograd.grad(SoftTargetKL(temperature)(s, TopK(v, i)), s)
        assert (g_topk - g_full).norm() < 0.25 * g_full.norm()


def test_topk_maps_and_k1():
    v, i = torch.randn(2, 3, 4, 5), torch.stack([torch.randperm(9)[:3] for _ in range(40)])
    i = i.view(2, 4, 5, 3).permute(0, 3, 1, 2)
    probs = topk_to_probs(v, i, 9, 2.0)
    assert probs.shape == (2, 9, 4, 5) and torch.allclose(probs.sum(1), torch.ones(2, 4, 5))
    v1, i1 = torch.tensor([[3.0]]), torch.tensor([[2]])
    assert topk_to_probs(v1, i1, 5, 1.0)[0, 2] > 1 - 1e-6  # k=1: no spread known, one-hot


def test_mismatched_class_counts_raise_kderror_with_shapes():
    with pytest.raises(KDError, match=r"\(4, 10\).*\(4, 100\)"):
        SoftTargetKL()(torch.randn(4, 10), torch.randn(4, 100))
    with pytest.raises(KDError, match="10 classes"):
        v, i = torch.randn(4, 100).topk(5, 1)
        SoftTargetKL()(torch.randn(4, 10), TopK(v, i))
    with pytest.raises(KDError):
        DKD()(torch.randn(4, 10), torch.randn(4, 100))
    with pytest.raises(KDError):
        HardLabel()(torch.randn(4, 10), torch.randn(4, 100))


# -- HardLabel and DKD ------------------------------------------------------------------------


def test_hard_label_is_cross_entropy_against_teacher_argmax():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    target = np64(t).argmax(1)
    ref = -log_softmax(np64(s))[np.arange(6), target].mean()
    labels = torch.zeros(6, dtype=torch.long)  # ignored
    assert HardLabel()(s, t, labels=labels).item() == pytest.approx(ref, rel=1e-5)
    v, i = t.topk(3, 1)
    shuffled = TopK(v[:, [2, 0, 1]], i[:, [2, 0, 1]])  # not sorted
    assert HardLabel()(s, shuffled).item() == pytest.approx(ref, rel=1e-5)


def test_dkd_matches_reference_and_unlabeled_rows_use_teacher_argmax():
    s, t = torch.randn(5, 6) * 2, torch.randn(5, 6) * 2
    labels = torch.tensor([3, -1, 0, -1, 5])
    argmax = t.argmax(1)
    target = torch.where(labels >= 0, labels, argmax).numpy()
    got = DKD(alpha=1.0, beta=8.0, temperature=4.0)(s, t, labels=labels)
    assert got.item() == pytest.approx(ref_dkd(s, t, target, 1.0, 8.0, 4.0), rel=1e-5)
    loss = DKD(alpha=0.5, beta=2.0, temperature=2.0)
    unlabeled = loss(s, t, labels=torch.full((5,), -1))
    assert unlabeled.item() == pytest.approx(ref_dkd(s, t, argmax.numpy(), 0.5, 2.0, 2.0), 1e-5)
    assert loss(s, t).item() == pytest.approx(unlabeled.item(), rel=1e-6)
    maps_s, maps_t = s.T.reshape(1, 6, 5, 1), t.T.reshape(1, 6, 5, 1)  # 5 pixels, 1 image
    maps_labels = torch.full((1, 5, 1), -1)
    assert loss(maps_s, maps_t, labels=maps_labels).item() == pytest.approx(unlabeled.item(), 1e-5)
    with pytest.raises(KDError, match="out of range"):
        loss(s, t, labels=torch.tensor([0, 1, 2, 3, 6]))


# -- feature losses ---------------------------------------------------------------------------


def test_feature_mse_matches_reference_and_resizes_maps():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ref = ((np64(s) - np64(t)) ** 2).mean()
    assert FeatureMSE(adapter=None)(s, t).item() == pytest.approx(ref, rel=1e-5)
    big = torch.randn(2, 3, 8, 8)
    # bilinear x0.5 (align_corners=False) samples exactly between pixels: 2x2 block means
    pooled = np64(big).reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5))
    got = FeatureMSE(adapter=None)(big, t)
    assert got.item() == pytest.approx(((pooled - np64(t)) ** 2).mean(), rel=1e-5)


@pytest.mark.parametrize(
    "s_shape,t_shape,w_shape,summary",
    [
        ((2, 4, 6, 6), (2, 6, 3, 3), (6, 4, 1, 1), "conv1x1 4->6 + resize 6x6->3x3"),
        ((2, 4), (2, 6), (6, 4), "linear 4->6"),
        ((2, 5, 4), (2, 5, 6), (6, 4), "linear 4->6"),
    ],
)
def test_lazy_adapter_shapes_reference_and_gradients(s_shape, t_shape, w_shape, summary):
    loss = FeatureMSE()
    assert loss.adapter is None
    assert "(made on first call)" in loss.adapter_summary(s_shape, t_shape)
    s = torch.randn(s_shape, requires_grad=True)
    t = torch.randn(t_shape)
    value = loss(s, t)
    assert tuple(loss.adapter.weight.shape) == w_shape
    assert loss.adapter_summary(s_shape, t_shape) == summary
    assert {id(p) for p in loss.parameters()} == {id(p) for p in loss.adapter.parameters()}
    value.backward()
    assert loss.adapter.weight.grad.abs().sum() > 0 and loss.adapter.bias.grad is not None
    if len(s_shape) != 4:  # reference: channel-wise affine map, then MSE
        w, b = np64(loss.adapter.weight).reshape(6, 4), np64(loss.adapter.bias)
        ref = ((np64(s) @ w.T + b - np64(t)) ** 2).mean()
        assert value.item() == pytest.approx(ref, rel=1e-5)


def test_eager_adapter_and_errors():
    loss = FeatureMSE(student_dim=4, teacher_dim=8)
    assert isinstance(loss.adapter, nn.Conv2d) and len(list(loss.parameters())) == 2
    w, b = np64(loss.adapter.weight).reshape(8, 4), np64(loss.adapter.bias)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3)
    ref = ((np.einsum("oc,nchw->nohw", w, np64(s)) + b[:, None, None] - np64(t)) ** 2).mean()
    assert loss(s, t).item() == pytest.approx(ref, rel=1e-5)
    assert loss.adapter_summary((2, 4, 3, 3), (2, 8, 3, 3)) == "conv1x1 4->8"
    vec = FeatureMSE(adapter="linear", student_dim=4, teacher_dim=8)
    assert isinstance(vec.adapter, nn.Linear) and vec(torch.randn(3, 4), torch.randn(3, 8)) > 0
    assert FeatureMSE().adapter_summary((2, 8), (2, 8)) == "none"
    with pytest.raises(KDError, match=r"\(2, 4, 3, 3\).*\(2, 8, 3, 3\)"):
        FeatureMSE(adapter=None)(s, t)
    with pytest.raises(KDError, match="adapter=None"):
        FeatureMSE(adapter=None, student_dim=4, teacher_dim=8)
    with pytest.raises(KDError, match="student_dim=5"):
        FeatureMSE(student_dim=5)(s, t)
    with pytest.raises(KDError, match="token counts"):
        FeatureMSE()(torch.randn(2, 5, 4), torch.randn(2, 6, 4))


def test_cosine_embedding_matches_reference():
    s, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    a, b = np64(s).reshape(4, -1), np64(t).reshape(4, -1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert CosineEmbedding()(s, t).item() == pytest.approx((1 - cos).mean(), rel=1e-5)
    with pytest.raises(KDError):
        CosineEmbedding()(torch.randn(4, 6), torch.randn(4, 7))


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_attention_transfer_matches_reference(p):
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 7, 5, 5)  # channel counts may differ
    a_s, a_t = ref_attention(np64(s), p), ref_attention(np64(t), p)
    ref = np.linalg.norm(a_s - a_t, axis=1).mean()
    assert AttentionTransfer(p)(s, t).item() == pytest.approx(ref, rel=1e-5)
    tokens = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731  (N, L, D), channels last
    assert AttentionTransfer(p)(tokens(s), tokens(t)).item() == pytest.approx(ref, rel=1e-5)


def test_attention_transfer_resizes_student_attention_map():
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    a = (np64(s) ** 2).mean(axis=1).reshape(2, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(2, -1)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    ref = np.linalg.norm(a - ref_attention(np64(t), 2.0), axis=1).mean()
    assert AttentionTransfer()(s, t).item() == pytest.approx(ref, rel=1e-5)


# -- RKD --------------------------------------------------------------------------------------


def test_rkd_matches_reference_and_handles_tiny_batches():
    s, t = torch.randn(5, 3, 2), torch.randn(5, 9)  # widths may differ
    assert RKD()(s, t).item() == pytest.approx(ref_rkd(s, t, 25.0, 50.0), rel=1e-5)
    assert RKD(1.0, 0.0)(s, t).item() == pytest.approx(ref_rkd(s, t, 1.0, 0.0), rel=1e-5)
    one = torch.randn(1, 4, requires_grad=True)
    out = RKD()(one, torch.randn(1, 4))
    assert out.item() == 0.0 and out.requires_grad
    two_s, two_t = torch.randn(2, 4), torch.randn(2, 4)
    assert RKD()(two_s, two_t).item() == 0.0  # one pair: normalised distances are both 1


# -- gradients and precision ------------------------------------------------------------------


def _double(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_gradcheck_every_loss():
    s, t = _double(3, 5), _double(3, 5)
    checks = [
        (SoftTargetKL(4.0), (s, t)),
        (DKD(temperature=2.0), (s, t)),
        (CosineEmbedding(), (s, t)),
        (RKD(), (_double(4, 3), _double(4, 5))),
        (AttentionTransfer(), (_double(2, 3, 4, 4), _double(2, 2, 4, 4))),
        (AttentionTransfer(), (_double(2, 3, 4, 4), _double(2, 2, 2, 2))),
        (FeatureMSE(), (_double(2, 3, 4, 4), _double(2, 3, 2, 2))),
        (
            FeatureMSE(student_dim=3, teacher_dim=5).double(),
            (_double(2, 3, 4, 4), _double(2, 5, 2, 2)),
        ),
        (
            FeatureMSE(adapter="linear", student_dim=3, teacher_dim=5).double(),
            (_double(2, 4, 3), _double(2, 4, 5)),
        ),
    ]
    for loss, inputs in checks:
        assert torch.autograd.gradcheck(lambda a, b, f=loss: f(a, b), inputs), loss
    lazy = FeatureMSE()  # created on the first (double) call, in double
    assert torch.autograd.gradcheck(lambda a, b: lazy(a, b), (_double(2, 3), _double(2, 4)))
    labels = torch.tensor([1, -1, 4])
    assert torch.autograd.gradcheck(lambda a, b: DKD()(a, b, labels=labels), (s, t))
    probs = F.softmax(torch.randn(3, 5, dtype=torch.float64), 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: SoftTargetKL(2.0, True)(a, b), (s, probs))
    v, i = torch.randn(3, 2, dtype=torch.float64).topk(2, 1)
    for loss in (SoftTargetKL(2.0), HardLabel(), DKD()):
        assert torch.autograd.gradcheck(lambda a, f=loss: f(a, TopK(v, i)), (s,)), loss


def test_half_precision_inputs_give_fp32_accurate_results():
    s, t = torch.randn(8, 10).bfloat16(), (torch.randn(8, 10) * 3).bfloat16()
    got = SoftTargetKL(4.0)(s, t)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref_kd(s.double(), t.double(), 4.0), rel=1e-5)
    labels = torch.randint(0, 10, (8,))
    ref = ref_dkd(s.double(), t.double(), labels.numpy(), 1.0, 8.0, 4.0)
    assert DKD()(s, t, labels=labels).item() == pytest.approx(ref, rel=1e-5)
    f_s, f_t = torch.randn(2, 3, 4, 4).half(), torch.randn(2, 3, 4, 4).half()
    ref = ((np64(f_s) - np64(f_t)) ** 2).mean()
    mse = FeatureMSE()(f_s, f_t)
    assert mse.dtype == torch.float32 and mse.item() == pytest.approx(ref, rel=1e-5)
    ref = np.linalg.norm(ref_attention(np64(f_s), 2) - ref_attention(np64(f_t), 2), axis=1)
    assert AttentionTransfer()(f_s, f_t).item() == pytest.approx(ref.mean(), rel=1e-4)
    e_s, e_t = torch.randn(5, 4).bfloat16(), torch.randn(5, 6).bfloat16()
    assert RKD()(e_s, e_t).item() == pytest.approx(ref_rkd(e_s, e_t, 25.0, 50.0), rel=1e-4)


# -- MGD, CosineEmbedding adapters, how a Distiller calls a loss ------------------------------


def ref_conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Zero-padded 3x3 convolution by shifted sums: (N, Ci, H, W) x (Co, Ci, 3, 3)."""
    n, _, h, wd = x.shape
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd)) + b[None, :, None, None]
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nchw,oc->nohw", pad[:, :, dy : dy + h, dx : dx + wd], w[:, :, dy, dx])
    return out


def ref_mgd(loss: MGD, s, t, keep: np.ndarray, reduction: str) -> float:
    """Yang et al. 2022: align (1x1), mask positions, conv3x3-ReLU-conv3x3, squared error."""
    p = {k: np64(v) for k, v in loss.state_dict().items()}
    x = np64(s)
    if loss.align is not None:
        x = np.einsum("nchw,oc->nohw", x, p["align.weight"][:, :, 0, 0])
        x = x + p["align.bias"][None, :, None, None]
    x = x * keep
    hid = np.maximum(ref_conv3x3(x, p["generation.0.weight"], p["generation.0.bias"]), 0)
    gen = ref_conv3x3(hid, p["generation.2.weight"], p["generation.2.bias"])
    sq = (gen - np64(t)) ** 2
    return loss.alpha * (sq.mean() if reduction == "mean" else sq.sum() / len(x))


@pytest.mark.parametrize(
    ("c_s", "reduction", "alpha", "ratio"), [(3, "mean", 1.0, 0.65), (5, "sum", 7e-5, 0.15)]
)
def test_mgd_matches_reference(c_s, reduction, alpha, ratio):
    loss = MGD(c_s, 5, alpha=alpha, mask_ratio=ratio, reduction=reduction)
    assert (loss.align is None) == (c_s == 5)
    s, t = torch.randn(2, c_s, 6, 6), torch.randn(2, 5, 6, 6)
    torch.manual_seed(3)
    keep = (torch.rand(2, 1, 6, 6) >= ratio).double().numpy()  # the draw MGD makes
    torch.manual_seed(3)
    got = loss(s, t)
    assert 0 < keep.mean() < 1
    assert got.item() == pytest.approx(ref_mgd(loss, s, t, keep, reduction), rel=1e-5)
    got.backward()
    assert loss.generation[0].weight.grad is not None
    assert LOSSES["mgd"] is MGD


def test_mgd_masks_about_mask_ratio_and_refuses_bad_shapes():
    loss = MGD(4, 4, mask_ratio=0.65)
    keep = loss.mask(torch.zeros(64, 4, 8, 8))
    assert keep.shape == (64, 1, 8, 8) and abs(1 - keep.mean().item() - 0.65) < 0.03
    with pytest.raises(KDError, match="spatial"):
        loss(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2))
    with pytest.raises(KDError, match="built for"):
        loss(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(KDError, match="mask_ratio"):
        MGD(4, 4, mask_ratio=1.0)


def test_cosine_embedding_adapter_projects_like_feature_mse():
    s, t = torch.randn(3, 4, 6, 6), torch.randn(3, 8, 3, 3)
    loss = CosineEmbedding(adapter="auto")
    got = loss(s, t)
    w, b = np64(loss.adapter.weight)[:, :, 0, 0], np64(loss.adapter.bias)
    proj = np.einsum("nchw,oc->nohw", np64(s), w) + b[None, :, None, None]
    small = F.interpolate(torch.from_numpy(proj), size=(3, 3), mode="bilinear")
    a, c = small.numpy().reshape(3, -1), np64(t).reshape(3, -1)
    cos = (a * c).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(c, axis=1)
    assert got.item() == pytest.approx((1 - cos).mean(), rel=1e-5)
    assert "conv1x1 4->8" in loss.adapter_summary((3, 4, 6, 6), (3, 8, 3, 3))
    vec = CosineEmbedding(adapter="linear", student_dim=6, teacher_dim=7)
    assert isinstance(vec.adapter, nn.Linear) and vec(torch.randn(2, 6), torch.randn(2, 7)) >= 0
    with pytest.raises(KDError, match="adapter='auto'"):
        CosineEmbedding()(torch.randn(4, 6), torch.randn(4, 7))


def test_losses_get_labels_only_when_their_signature_asks():
    def two(s, t):
        return (s - t).abs().mean()

    def with_labels(s, t, labels=None):
        return s.sum()

    assert not takes_labels(nn.MSELoss()) and not takes_labels(as_loss_module(two))
    assert takes_labels(DKD()) and takes_labels(with_labels)
    assert takes_labels(lambda s, t, **kw: s) and not takes_labels(F.mse_loss)
    with pytest.raises(KDError, match="instance"):
        as_loss_module(nn.MSELoss)
    with pytest.raises(KDError, match="callable"):
        as_loss_module(3)


def test_losses_import_nothing_from_teachers_and_old_paths_still_work():
    import ast
    import pathlib

    import kdkit.losses
    import kdkit.losses.response as response
    import kdkit.losses.topk as topk
    import kdkit.teachers.base as base

    for path in pathlib.Path(kdkit.losses.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in mods if m.startswith("kdkit.teachers")], path.name
    assert response.TopK is topk.TopK is base.TopK
    assert response._upcast(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert response.topk_to_logits is topk.topk_to_logits
