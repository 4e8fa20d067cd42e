"""The Trainer with a CachedTeacher: same training as the live teacher, and a fidelity gate."""

import pytest
import torch
from _tiny import quadrant_net

from kdkit import Distiller, KDError, SoftTargetKL, Trainer
from kdkit.cache import CachedTeacher, precompute
from kdkit.cache.run_check import check_cache_for_run
from kdkit.data import ArrayDataset, FastLoader, ViewSampler
from kdkit.data.pipeline import InputPipeline

MEAN, STD = (0.4,), (0.3,)


def net(width, seed):
    torch.manual_seed(seed)
    return quadrant_net(width, 5)


@pytest.fixture
def setup(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(
        torch.randint(0, 256, (80, 1, 10, 10), dtype=torch.uint8, generator=g),
        torch.randint(0, 5, (80,), generator=g),
    )
    views = ViewSampler(seed=3, num_views=2, crop="pad", pad=2, size=10)
    teacher = net(8, seed=1)
    cache = precompute(
        teacher,
        data,
        tmp_path / "cache",
        views=views,
        dtype="fp32",
        mean=MEAN,
        std=STD,
        batch_size=32,
        progress=False,
    )
    return data, views, teacher, cache


def train(data, views, teacher, live_teacher=None):
    """Two epochs on ``teacher``; a cached one is first checked against the run (and
    against ``live_teacher`` on a probe, the fidelity gate), as the run builder does."""
    student = net(4, seed=2)
    check_cache_for_run(teacher, data, sampler=views, live_teacher=live_teacher, mean=MEAN, std=STD)
    tr = Trainer(
        Distiller(student, teacher, SoftTargetKL(temperature=2.0)),
        FastLoader(data, 16, seed=0),
        epochs=2,
        inputs=InputPipeline(views, MEAN, STD),
        progress=False,
        device="cpu",
    )
    hist = tr.fit()
    return student, hist


def test_cached_replay_trains_like_the_live_teacher(setup):
    data, views, teacher, cache = setup
    live, h_live = train(data, views, teacher)
    cached, h_cached = train(
        data, views, CachedTeacher(cache, expect_views=views), live_teacher=teacher
    )
    assert h_live[-1]["loss_output"] == pytest.approx(h_cached[-1]["loss_output"], rel=1e-5)
    for a, b in zip(live.state_dict().values(), cached.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_fidelity_gate_stops_a_stale_cache(setup):
    data, views, _, cache = setup
    other = net(8, seed=99)  # "retrained" teacher: the cache is stale
    with pytest.raises(KDError, match="disagree|agreement|KL"):
        train(data, views, CachedTeacher(cache), live_teacher=other)


def test_gate_refuses_wrong_views(setup):
    data, _, teacher, cache = setup
    wrong = ViewSampler(seed=4, num_views=2, crop="pad", pad=2, size=10)
    with pytest.raises(KDError):
        train(data, wrong, CachedTeacher(cache), live_teacher=teacher)
