"""Feature losses (kdkit/losses/feature.py, mgd.py, relational.py) against independent float64
numpy formulas (tests/_loss_refs.py): FeatureMSE and its adapters, CosineEmbedding,
AttentionTransfer, RKD and MGD."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _loss_refs import np64, ref_attention, ref_mgd, ref_rkd
from torch import nn

from kdkit.errors import KDError
from kdkit.losses import LOSSES, MGD, RKD, AttentionTransfer, CosineEmbedding, FeatureMSE

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


# -- MGD and CosineEmbedding adapters --------------------------------------------------------


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
