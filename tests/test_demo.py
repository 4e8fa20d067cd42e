"""The demo pipeline end to end on a slice of Fashion-MNIST (the full run is `make demo`)."""

import pytest
import torch

import kdkit.data
from kdkit.cli import main
from kdkit.demo import DemoConfig, run_demo


@pytest.fixture
def small_fmnist(monkeypatch):
    try:
        train, test = kdkit.data.load_fashion_mnist("train"), kdkit.data.load_fashion_mnist("test")
    except kdkit.KDError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    g = torch.Generator().manual_seed(0)
    small = {
        "train": train.subset(torch.randperm(len(train), generator=g)[:1500]),
        "test": test.subset(torch.arange(400)),
    }
    monkeypatch.setattr(kdkit.data, "load_fashion_mnist", lambda split="train", **kw: small[split])


def test_demo_writes_report_and_reuses_cached_teacher(small_fmnist, tmp_path):
    cfg = DemoConfig(
        teacher_epochs=1,
        scratch_epochs=3,
        kd_epochs=1,
        n_labeled=100,
        batch_size=64,
        out_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    report = run_demo(cfg)
    text = report.read_text()
    for row in ("teacher", "student, scratch", "student, KD", "100 labels + 1,400 unlabeled"):
        assert row in text
    # the honest upper row: the same student on every label, as many epochs as KD
    assert "| student, supervised | 1,500 labels |" in text
    assert "supervised on all 1,500 labels for as many epochs scores" in text
    assert "fewer parameters" in text and "kdkit export" in text
    assert (
        kdkit.load_model(tmp_path / "out" / "student.pt", role="student")[0].__class__.__name__
        == "SmallCNN"
    )
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
    cached = list((tmp_path / "cache" / "demo").glob("teacher-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run_demo(cfg)  # second run: the fingerprinted teacher is reused, not retrained
    assert cached[0].stat().st_mtime_ns == stamp


def test_cli_prints_kderror_without_traceback(monkeypatch, capsys):
    def boom(split="train", **kw):
        raise kdkit.KDError("Fashion-MNIST not found; install it: sudo apt-get install x")

    monkeypatch.setattr(kdkit.data, "load_fashion_mnist", boom)
    assert main(["demo", "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdkit: error: Fashion-MNIST not found") and "Traceback" not in err
