"""Response losses (kdkit/losses/response.py, topk.py) against independent float64 numpy
formulas (tests/_loss_refs.py), gradcheck and precision of every loss, and how a loss is called.
The feature losses are in test_losses_feature.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _loss_refs import log_softmax, np64, ref_attention, ref_dkd, ref_kd, ref_rkd
from torch import nn

from kdkit.errors import KDError
from kdkit.losses import (
    DKD,
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


# -- how a Distiller calls a loss --------------------------------------------------------------


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
    assert response.upcast(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert response.topk_to_logits is topk.topk_to_logits
