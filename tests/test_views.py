"""kdkit.data.views: deterministic per-sample views, applied identically on any batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdkit.data.views import Views, ViewSampler, prepare_input, splitmix64
from kdkit.errors import KDError


def _splitmix64_reference(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def _bilinear_reference(img: np.ndarray, box, flip: bool, out_h: int, out_w: int) -> np.ndarray:
    """One image (C, H, W): sample the crop box at output pixel centres, zeros outside."""
    c, h, w = img.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    u = (np.arange(out_w) + 0.5) / out_w
    u = 1.0 - u if flip else u
    v = (np.arange(out_h) + 0.5) / out_h
    sx = (x0 + u * (x1 - x0)) * w - 0.5  # pixel centres at integers
    sy = (y0 + v * (y1 - y0)) * h - 0.5
    out = np.zeros((c, out_h, out_w))
    for dy in (0, 1):
        for dx in (0, 1):
            ix = np.floor(sx).astype(int) + dx
            iy = np.floor(sy).astype(int) + dy
            wx = 1.0 - np.abs(sx - ix)
            wy = 1.0 - np.abs(sy - iy)
            inside = (iy[:, None] >= 0) & (iy[:, None] < h) & (ix[None] >= 0) & (ix[None] < w)
            vals = img[:, iy.clip(0, h - 1)[:, None], ix.clip(0, w - 1)[None]]
            out += vals * (wy[:, None] * wx[None]) * inside
    return out


def test_splitmix64_matches_the_reference_on_uint64_bit_patterns():
    xs = [0, 1, 12345, 2**62 + 7, -1, -(2**63)]
    got = splitmix64(torch.tensor(xs, dtype=torch.int64))
    for x, g in zip(xs, got.tolist(), strict=True):
        assert g % 2**64 == _splitmix64_reference(x % 2**64)


def test_same_config_gives_identical_views_and_pixels_other_seed_differs():
    index, ids = torch.arange(50), torch.arange(50) % 4
    x = torch.rand(50, 3, 16, 16)
    a = ViewSampler(seed=7, num_views=4, size=12)
    b = ViewSampler.from_config(a.config())
    va, vb = a.sample(index, ids), b.sample(index, ids)
    assert a == b
    assert torch.equal(va.box, vb.box) and torch.equal(va.flip, vb.flip)
    assert torch.equal(a.apply(x, va), b.apply(x, vb))
    vc = ViewSampler(seed=8, num_views=4, size=12).sample(index, ids)
    assert not torch.allclose(va.box, vc.box)
    # a view depends only on (seed, view id, index), not on which batch it arrives in
    part = a.sample(index[10:20].flip(0), ids[10:20].flip(0))
    assert torch.equal(part.box, va.box[10:20].flip(0))


def test_views_cover_their_ranges():
    s = ViewSampler(seed=1, scale=(0.2, 0.6), ratio=(0.5, 2.0), flip_p=0.3)
    v = s.sample(torch.arange(4000), 0)
    w, h = v.box[:, 2] - v.box[:, 0], v.box[:, 3] - v.box[:, 1]
    assert bool((v.box >= -1e-6).all() and (v.box <= 1 + 1e-6).all())
    area = w * h
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 0.6 + 1e-4
    assert abs(float(v.flip.float().mean()) - 0.3) < 0.03
    pad = ViewSampler(seed=1, crop="pad", pad=2, size=(8, 10)).sample(torch.arange(2000), 3)
    shifts_x = torch.round(pad.box[:, 0] * 10).long()
    assert set(shifts_x.tolist()) == {-2, -1, 0, 1, 2}
    assert torch.allclose(pad.box[:, 2] - pad.box[:, 0], torch.ones(2000))


def test_view_ids_cycle_through_k_views_and_default_to_the_epoch():
    index = torch.arange(100)
    s = ViewSampler(seed=3, num_views=4)
    seen = torch.stack([s.view_ids(index, e) for e in range(4)])
    assert torch.equal(seen.sort(0).values, torch.arange(4)[:, None].expand(4, 100))
    assert len(set(s.view_ids(index, 0).tolist())) == 4  # a batch mixes view ids
    assert torch.equal(s.view_ids(index, 5), s.view_ids(index, 1))
    assert torch.equal(ViewSampler().view_ids(index, 9), torch.full((100,), 9))
    with pytest.raises(KDError, match=r"view ids must be in \[0, 4\)"):
        s.sample(index, 4)


@pytest.mark.parametrize(
    "sampler",
    [
        ViewSampler(seed=0, num_views=3, scale=(0.3, 1.0), size=(9, 7)),
        ViewSampler(seed=5, crop="pad", pad=3, size=(10, 12), flip_p=0.5),
    ],
    ids=["resized", "pad"],
)
def test_vectorised_apply_equals_per_sample_reference(sampler):
    x = torch.rand(12, 2, 10, 12, dtype=torch.float64)
    index = torch.arange(100, 112)
    views = sampler.sample(index, index % 3)
    got = sampler.apply(x, views)
    out_h, out_w = sampler.size
    for i in range(12):
        ref = _bilinear_reference(x[i].numpy(), views.box[i], bool(views.flip[i]), out_h, out_w)
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-6)


def test_pad_crop_copies_pixels_like_pad_then_slice():
    s = ViewSampler(seed=2, crop="pad", pad=2, size=8, flip_p=0.5)
    x = torch.rand(20, 1, 8, 8)
    views = s.sample(torch.arange(20), 0)
    got = s.apply(x, views)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(20):
        dx, dy = (int(round(float(v) * 8)) for v in views.box[i, :2])
        ref = padded[i, :, 2 + dy : 10 + dy, 2 + dx : 10 + dx]
        ref = ref.flip(-1) if views.flip[i] else ref
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=0)


def test_identity_view_reproduces_the_input_and_flip_flips():
    x = torch.rand(5, 3, 9, 11)
    identity = Views(
        box=torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(5, 1), flip=torch.zeros(5, dtype=torch.bool)
    )
    s = ViewSampler(crop="none", flip_p=0.0)
    torch.testing.assert_close(s.apply(x, identity), x, atol=1e-5, rtol=0)
    flipped = Views(box=identity.box, flip=torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(s.apply(x, flipped), x.flip(-1), atol=1e-5, rtol=0)
    always = ViewSampler(crop="none", flip_p=1.0)
    out = always.apply(x, always.sample(torch.arange(5), 0))
    torch.testing.assert_close(out, x.flip(-1), atol=1e-5, rtol=0)


def test_prepare_input_scales_applies_views_and_normalises():
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    index, ids = torch.arange(6), torch.zeros(6, dtype=torch.int64)
    plain = prepare_input(images, None, None, None, (0.5,), (0.25,), "cpu")
    torch.testing.assert_close(plain, (images.float() / 255 - 0.5) / 0.25)
    s = ViewSampler(seed=1, num_views=1, crop="pad", pad=1, size=8)
    got = prepare_input(images, index, ids, s, (0.5,), (0.25,), "cpu")
    ref = (s.apply(images.float() / 255, s.sample(index, ids)) - 0.5) / 0.25
    torch.testing.assert_close(got, ref)
    floats = images.float() / 255
    before = floats.clone()
    prepare_input(floats, index, ids, s, 0.5, 0.25, None)
    assert torch.equal(floats, before)  # the caller's tensor is never modified
    with pytest.raises(KDError, match="view ids"):
        prepare_input(images, index, None, s, None, None, "cpu")


def test_bad_configs_are_refused():
    with pytest.raises(KDError, match="crop must be one of"):
        ViewSampler(crop="zoom")
    with pytest.raises(KDError, match="needs size"):
        ViewSampler(crop="pad", pad=2)
    with pytest.raises(KDError, match="configured for size"):
        s = ViewSampler(crop="pad", pad=2, size=8)
        s.apply(torch.rand(2, 1, 9, 9), s.sample(torch.arange(2), 0))
    with pytest.raises(KDError, match="num_views"):
        ViewSampler(num_views=0)
    assert math.isclose(ViewSampler(ratio=1.0).ratio[0], 1.0)


# -- mixing views (mixup / CutMix) ----------------------------------------------------------


def _mix_sampler(**kw) -> ViewSampler:
    args = dict(seed=3, num_views=2, crop="pad", pad=1, size=8, mixup=0.4, cutmix=1.0)
    args.update(kw)
    return ViewSampler(**args)


def test_mixing_config_round_trips_and_old_configs_still_read():
    from kdkit.data.views import MixPool

    s = _mix_sampler()
    cfg = s.config()
    assert cfg["version"] == 2 and cfg["mixup"] == 0.4 and cfg["cutmix"] == 1.0
    assert ViewSampler.from_config(cfg) == s
    plain = ViewSampler(seed=3, num_views=2)
    assert plain.config()["version"] == 1 and "mixup" not in plain.config()  # as before
    assert ViewSampler.from_config({**plain.config(), "version": 1}) == plain
    with pytest.raises(KDError, match="no mixing keys"):
        ViewSampler.from_config({**plain.config(), "mixup": 0.2})
    with pytest.raises(KDError, match="mixup"):
        ViewSampler(mixup=-1.0)
    with pytest.raises(KDError, match="partner pool"):
        s.sample(torch.arange(4), 0)
    with pytest.raises(KDError, match="repeat"):
        MixPool(torch.zeros(2, 1, 8, 8), torch.tensor([3, 3]))


def test_partner_and_weight_depend_only_on_seed_view_and_index():
    pool = torch.arange(0, 300, 3)  # dataset indices, not positions
    s = _mix_sampler()
    index, ids = pool[:60], torch.arange(60) % 2
    v = s.sample(index, ids, pool)
    assert bool(torch.isin(v.partner, pool).all())
    assert float(v.lam.min()) >= 0.5 - 1e-6 and float(v.lam.max()) <= 1.0
    cut = (v.cut[:, 2] > v.cut[:, 0]).float().mean()
    assert 0.2 < float(cut) < 0.8  # both kinds of mixing occur
    part = s.sample(index[10:20].flip(0), ids[10:20].flip(0), pool.flip(0)[torch.randperm(100)])
    for name in ("partner", "blend", "cut", "box", "flip"):
        assert torch.equal(getattr(part, name), getattr(v, name)[10:20].flip(0)), name
    other = _mix_sampler(seed=4).sample(index, ids, pool)
    assert not torch.equal(other.partner, v.partner)
    # the pool is a set: its order does not matter, its members do
    v2 = s.sample(index, ids, pool[:-1])
    assert not torch.equal(v2.partner, v.partner)


def test_mixed_pixels_are_the_blend_then_the_pasted_box():
    s = _mix_sampler(crop="none", flip_p=0.0, mixup=0.5, cutmix=0.5, size=None)
    g = torch.Generator().manual_seed(0)
    x, p = torch.rand(40, 1, 8, 8, generator=g), torch.rand(40, 1, 8, 8, generator=g)
    v = s.sample(torch.arange(40), 0, torch.arange(40))
    out = s.apply(x, v, p)
    for i in range(40):
        b = float(v.blend[i])
        want = b * x[i] + (1 - b) * p[i]
        x0, y0, x1, y1 = (float(c) * 8 for c in v.cut[i])
        for r in range(8):
            for c in range(8):
                if x0 <= c + 0.5 < x1 and y0 <= r + 0.5 < y1:
                    want[:, r, c] = p[i, :, r, c]
        assert torch.allclose(out[i], want, atol=1e-6)
    with pytest.raises(KDError, match="partner images"):
        s.apply(x, v)


def test_prepare_input_fetches_partners_by_dataset_index():
    from kdkit.data.arrays import ArrayDataset
    from kdkit.data.views import MixPool

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8, generator=g)
    ds = ArrayDataset(images, torch.zeros(30, dtype=torch.int64)).subset(torch.arange(5, 30))
    pool = MixPool.from_dataset(ds)
    assert torch.equal(pool.pool, torch.arange(5, 30))
    s = _mix_sampler(crop="none", flip_p=0.0, size=None)
    index, ids = torch.tensor([7, 9, 29]), torch.tensor([0, 1, 1])
    v = s.sample(index, ids, pool)
    x = prepare_input(images[index], index, ids, s, None, None, "cpu", pool)
    want = s.apply(images[index].float() / 255, v, images[v.partner].float() / 255)
    assert torch.equal(x, want)
    with pytest.raises(KDError, match="outside the pool"):
        pool.fetch(torch.tensor([0]))


def _tiny_setup():
    from torch import nn

    from kdkit.data.arrays import ArrayDataset

    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8, generator=g)
    ds = ArrayDataset(images, torch.randint(0, 5, (24,), generator=g))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    return ds, teacher


def test_cached_teacher_replays_mixed_views_exactly(tmp_path):
    from kdkit.cache import CachedTeacher, check, precompute, read_meta
    from kdkit.cache.check import check_partners
    from kdkit.data.views import MixPool

    ds, teacher = _tiny_setup()
    part = ds.subset(torch.arange(4, 24))  # indices 4..23: an index file, a partial pool
    s = _mix_sampler()
    out = precompute(
        teacher, part, tmp_path / "c", views=s, dtype="fp32", batch_size=7, shard_size=8,
        mean=0.5, std=0.25, progress=False,
    )  # fmt: skip
    meta = read_meta(out)
    assert meta["format_version"] == 3 and set(meta["shards"][0]["files"]) == {
        "values", "partner", "lam",
    }  # fmt: skip
    cached = CachedTeacher(out, expect_views=s, expect_dataset=part)
    pool = MixPool.from_dataset(part)
    index = torch.arange(4, 24).flip(0)  # another order and batch than precompute's
    for v in range(2):
        ids = torch.full_like(index, v)
        x = prepare_input(part.base.images[index], index, ids, s, 0.5, 0.25, "cpu", pool)
        with torch.no_grad():
            live = teacher(x)
        stored = cached(x, index=index, view=ids).logits
        assert torch.allclose(stored, live, atol=1e-5, rtol=0)
        partner, lam = cached.read_mix(index, ids)
        mine = s.sample(index, ids, pool)
        assert np.array_equal(partner, mine.partner.numpy())
        assert np.array_equal(lam, mine.lam.numpy())
    check(out, teacher, part)  # the fidelity gate on mixed views
    check_partners(cached, s, part)
    # a run drawing partners from another pool would mix other images: refused
    with pytest.raises(KDError, match="other mixed views"):
        check_partners(cached, s, part.subset(torch.arange(0, 19)))
    with pytest.raises(KDError, match="mixing"):
        check_partners(cached, ViewSampler(seed=3, num_views=2, crop="pad", pad=1, size=8), part)


def test_trainer_mixes_views_from_its_loader_and_checks_a_mixed_cache(tmp_path):
    from torch import nn

    from kdkit.cache import CachedTeacher, precompute
    from kdkit.cache.run_check import check_cache_for_run
    from kdkit.data.arrays import FastLoader
    from kdkit.data.pipeline import InputPipeline
    from kdkit.distiller import Distiller
    from kdkit.losses import SoftTargetKL
    from kdkit.train.trainer import Trainer

    ds, teacher = _tiny_setup()
    s = _mix_sampler()
    out = precompute(teacher, ds, tmp_path / "c", views=s, dtype="fp32", progress=False)
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))

    def fit(views):
        cached = CachedTeacher(out)
        loader = FastLoader(ds, 8, shuffle=True, seed=0)
        check_cache_for_run(cached, loader.dataset, sampler=views)  # as the run builder does
        inputs = InputPipeline(views, dataset=loader.dataset)  # the partners: its loader's
        d = Distiller(student, cached, SoftTargetKL(1.0))
        t = Trainer(d, loader, None, epochs=1, inputs=inputs, device="cpu", progress=False)
        return t.fit()

    assert len(fit(s)) == 1
    with pytest.raises(KDError, match="mixing"):
        fit(ViewSampler(seed=3, num_views=2, crop="pad", pad=1, size=8))


def test_a_cache_of_a_split_serves_its_labeled_plus_unlabeled_reordering(tmp_path):
    """The patient study's shape: the mixing cache holds the train-minus-val split in index
    order; each run trains on concat(labeled, unlabeled) of it, the same samples reordered."""
    from torch import nn

    from kdkit.cache import CachedTeacher, precompute
    from kdkit.cache.cached_teacher import check_run_dataset
    from kdkit.cache.run_check import check_cache_for_run
    from kdkit.data import concat, split_labeled
    from kdkit.data.arrays import FastLoader
    from kdkit.data.pipeline import InputPipeline
    from kdkit.distiller import Distiller
    from kdkit.losses import SoftTargetKL
    from kdkit.train.trainer import Trainer

    ds, teacher = _tiny_setup()
    train = ds.subset(torch.arange(4, 24))  # a holdout's rest: a subset, in index order
    s = _mix_sampler()
    out = precompute(teacher, train, tmp_path / "c", views=s, dtype="fp32", progress=False)
    labeled, unlabeled = split_labeled(train, 5, seed=1)
    run_set = concat(labeled, unlabeled)
    assert not torch.equal(run_set.indices, train.indices)  # reordered
    cached = CachedTeacher(out)
    check_run_dataset(cached.meta, run_set)  # accepted: the same images, keyed by index
    changed = run_set.images.clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel: another dataset
    other = type(run_set)(changed, run_set.labels, indices=run_set.indices, base=run_set.base)
    with pytest.raises(KDError, match="dataset_fingerprint"):
        check_run_dataset(cached.meta, other)
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    # the fidelity gate probes this dataset, not its 24-sample base
    check_cache_for_run(cached, run_set, sampler=s, live_teacher=teacher)
    t = Trainer(
        Distiller(student, cached, SoftTargetKL(1.0)), FastLoader(run_set, 8, seed=0), None,
        epochs=1, inputs=InputPipeline(s, dataset=run_set), device="cpu", progress=False,
    )  # fmt: skip
    assert len(t.fit()) == 1


def test_cli_precompute_mixes_views_when_asked(tmp_path, monkeypatch):
    import kdkit.run.cache_job as cache_job
    from kdkit.cache import read_meta
    from kdkit.cli import main as cli_main

    ds, teacher = _tiny_setup()
    monkeypatch.setattr(cache_job, "named_dataset", lambda spec: (ds, 0.5, 0.25))
    monkeypatch.setattr(cache_job, "load_teacher_file", lambda *a, **k: teacher)
    base = ["precompute", "--teacher", "t.pt", "--data", "tiny", "--no-progress"]
    out = tmp_path / "c"
    args = ["--views", "2", "--pad", "1", "--mixup", "0.4", "--cutmix", "1", "--out", str(out)]
    assert cli_main([*base, *args]) == 0
    meta = read_meta(out)
    assert (meta["views"]["mixup"], meta["views"]["cutmix"]) == (0.4, 1.0)
    assert set(meta["shards"][0]["files"]) == {"values", "partner", "lam"}
    assert cli_main([*base, "--mixup", "1", "--out", str(tmp_path / "d")]) == 2  # no --views
    assert cli_main([*base, "--views", "2", "--cutmix", "-1", "--out", str(tmp_path / "e")]) == 2


def test_version_2_caches_without_mixing_still_read(tmp_path):
    import json

    from kdkit.cache import CachedTeacher, precompute
    from kdkit.cache.store import META_NAME, seal_meta

    ds, teacher = _tiny_setup()
    plain = ViewSampler(seed=3, num_views=2, crop="pad", pad=1, size=8)
    out = precompute(teacher, ds, tmp_path / "c", views=plain, dtype="fp32", progress=False)
    meta = json.loads((out / META_NAME).read_text())
    meta.pop("meta_sha256")
    meta["format_version"] = 2  # what the previous kdkit wrote: same layout, no mixing
    (out / META_NAME).write_text(json.dumps(seal_meta(meta)))
    cached = CachedTeacher(out, expect_views=plain, expect_dataset=ds)
    assert not cached.mixes and cached.views() == plain
    # a version 2 meta claiming mixing views is not a layout any kdkit wrote
    meta["views"] = _mix_sampler().config()
    (out / META_NAME).write_text(json.dumps(seal_meta(meta)))
    with pytest.raises(KDError, match="format_version >= 3"):
        CachedTeacher(out)


def test_patient_config_is_valid_and_its_mixing_keys_build_the_sampler():
    from pathlib import Path

    from kdkit.config import load_config
    from kdkit.run.data import build_views

    path = Path(__file__).resolve().parents[1] / "configs" / "fmnist_patient.yaml"
    cfg = load_config(path, check_paths=False)
    assert cfg.data.views.mixup == 0.0 and not build_views(cfg.data, 0, 28).mixes
    on = ["data.views.mixup=1", "data.views.cutmix=0.5"]
    cfg = load_config(path, on, check_paths=False)
    views = build_views(cfg.data, cfg.train.seed, 28)
    assert views is not None and (views.mixup, views.cutmix) == (1.0, 0.5)
    assert ViewSampler.from_config(views.config()) == views
    with pytest.raises(KDError, match="mixup"):
        load_config(path, ["data.views.mixup=-1"], check_paths=False)
    # the config's comment: the same run with the teacher replayed from a 60-view cache
    cached = ["teacher.model=cache:runs/fmnist-teacher-views", "data.views.num_views=60"]
    cfg = load_config(path, cached, check_paths=False)
    assert cfg.train.epochs == 60 and build_views(cfg.data, 0, 28).num_views == 60
