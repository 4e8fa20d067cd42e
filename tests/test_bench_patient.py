"""benchmarks/bench_patient.py on a tiny synthetic Fashion-MNIST: every kind of row (cached,
mixed, DKD, feature pair, two-teacher ensemble) runs, so the study cannot rot in CI."""

from types import SimpleNamespace

import pytest
import torch
from _scripts import benchmark_module

from kdkit.data import holdout
from kdkit.data.arrays import ArrayDataset
from kdkit.demo import DemoConfig
from kdkit.models import fmnist_teacher


@pytest.fixture(scope="module")
def bench():
    yield from benchmark_module("bench_patient")


def test_rows_parse_into_their_recipe(bench):
    assert bench.parse_row("soft-T2-mix-e20") == {
        "loss": "soft", "mix": True, "feat": False, "ens": False, "all": False, "epochs": 20,
        "warmup": 0.0, "temperature": 2.0, "alpha": 1.0, "beta": 8.0,
    }  # fmt: skip
    assert bench.parse_row("soft-all-e60")["all"]  # the teacher plus every label
    dkd = bench.parse_row("dkd-a0.5-b2-w1-e4")
    assert (dkd["temperature"], dkd["alpha"], dkd["beta"], dkd["warmup"]) == (4.0, 0.5, 2.0, 1.0)
    assert [p["loss"] for p in bench.criterion(bench.parse_row("soft-feat"))] == [
        "soft_kl", "feature_mse",
    ]  # fmt: skip
    for bad in ("hard-e2", "soft-x3", "soft-eX"):
        with pytest.raises(SystemExit):
            bench.parse_row(bad)


def test_every_kind_of_row_trains_on_a_tiny_dataset(bench, tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(bench, "CACHE_ROOT", tmp_path)
    monkeypatch.setattr(bench, "NUM_VIEWS", 2)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (120, 1, 28, 28), dtype=torch.uint8, generator=g)
    full = ArrayDataset(images, torch.arange(120) % 10)
    train, val = holdout(full, 20, seed=123)
    torch.manual_seed(0)
    teachers = {"demo": SimpleNamespace(model=fmnist_teacher().eval(), test_top1=50.0)}
    teachers["seed1"] = SimpleNamespace(model=fmnist_teacher().eval())
    for mix in (False, True):  # the plain cache covers the whole split, the mixed one `train`
        bench.build_cache(mix, full, train, teachers["demo"].model)
    cfg = DemoConfig(n_labeled=20, batch_size=32, progress=False)
    data = {"train": train, "val": val, "test": val}
    rows = ("soft-T1-e1", "soft-mix-e1", "dkd-b2-w1-e1", "soft-feat-e1", "soft-ens-e1", "sup-e1")
    for row in (*rows, "soft-all-e1"):
        r = bench.run(row, 0, cfg, data, teachers)
        assert len(r["top1"]) == 1 and 0 <= r["test_top1"] <= 100, row
    top1 = bench.teacher_accuracies(teachers, val)
    assert set(top1) == {"demo", "seed1", "ensemble"}


def test_another_teachers_caches_are_kept_apart(bench, tmp_path, monkeypatch):
    """``--teacher FILE`` tags its caches with the file's hash: a cache of the demo teacher is
    never replayed as the strong one's; the saved checkpoint loads with its test top-1."""
    from kdkit.demo import TEACHER_SPEC, spec_state
    from kdkit.train.checkpoint import save_checkpoint

    monkeypatch.setattr(bench, "CACHE_ROOT", tmp_path)
    demo_dir = bench.cache_dir(False)
    monkeypatch.setattr(bench, "TEACHER_TAG", "0123456789ab")
    assert bench.cache_dir(False) != demo_dir and "0123456789ab" in bench.cache_dir(False).name
    path = tmp_path / "teacher.pt"
    model = fmnist_teacher()
    save_checkpoint(path, spec_state(model, TEACHER_SPEC, role="teacher", test_top1=93.1))
    t = bench.load_teacher(path)
    assert t.test_top1 == 93.1 and not t.model.training
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(t.model(x), model.eval()(x))
