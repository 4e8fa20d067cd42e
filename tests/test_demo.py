"""``kdkit demo`` end to end on a slice of Fashion-MNIST (the full run is `make demo`): every row
a ``kdkit train`` run directory that ``kdkit train`` reruns to the same numbers."""

import csv

import pytest
import torch

import kdkit.data
import kdkit.report
from kdkit.cli import main
from kdkit.config import load_resolved
from kdkit.load import load_checkpoint
from kdkit.run.vision_demo import ROWS


@pytest.fixture
def small_fmnist(monkeypatch):
    try:
        train, test = kdkit.data.load_fashion_mnist("train"), kdkit.data.load_fashion_mnist("test")
    except kdkit.KDError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    g = torch.Generator().manual_seed(0)
    small = {
        "train": train.subset(torch.randperm(len(train), generator=g)[:600]),
        "test": test.subset(torch.arange(200)),
    }
    monkeypatch.setattr(kdkit.data, "load_fashion_mnist", lambda split="train", **kw: small[split])


def _last_top1(run_dir) -> str:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))[-1]["val_top1"]


def test_demo_rows_are_kdkit_train_runs_and_the_teacher_is_cached(
    small_fmnist, tmp_path, monkeypatch, capsys, one_thread
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["demo", "--quick", "--no-progress", "--out", str(out), "--n-labeled", "100"]
    argv += ["--scratch-epochs", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out  # the CLI prints the report
    for row in ("teacher", "student, scratch", "student, KD", "100 labels + 500 unlabeled"):
        assert row in text
    # the honest upper row: the same student on every label, as many epochs as KD
    assert "| student, supervised | 600 labels |" in text
    assert "supervised on all 600 labels for as many epochs scores" in text
    assert "fewer parameters" in text and "kdkit export" in text
    student, meta = kdkit.load_model(out / "student.pt", role="student")
    assert student.__class__.__name__ == "SmallCNN"
    assert (
        f"| student, KD | 100 labels + 500 unlabeled | 98,682 | {meta['test_top1']:.2f} |" in text
    )
    assert (out / "accuracy.png").stat().st_size > 1000

    for name in ROWS:  # each row reruns with kdkit train from its config.yaml, to the same top-1
        cfg = load_resolved(out / name / "config.yaml")  # validated, as kdkit train does
        assert cfg.name == f"demo-{name}" and (cfg.teacher is not None) == (name == "kd")
        rerun = ["train", str(out / name / "config.yaml"), "--run-dir", str(tmp_path / name)]
        assert main(rerun) == 0
        assert _last_top1(tmp_path / name) == _last_top1(out / name), name
    scratch = load_resolved(out / "scratch" / "config.yaml")
    assert scratch.data.labeled == 100 and scratch.train.epochs == 2
    assert _steps(out / "scratch") == 2  # 100 images, one batch of 128 each epoch

    cached = list((tmp_path / "cache" / "kdkit" / "demo").glob("teacher-*.pt"))
    assert len(cached) == 1
    assert load_resolved(out / "kd" / "config.yaml").teacher.model == str(cached[0])
    stamp = cached[0].stat().st_mtime_ns
    # speeds were measured above: the second run need not time them again
    speed = {"params": 1, "latency_ms": 1.0, "img_per_s": 1.0}
    monkeypatch.setattr(kdkit.report, "_speed", lambda model, shape: speed)
    assert main(argv) == 0  # second run: the fingerprinted teacher is reused, not retrained
    assert cached[0].stat().st_mtime_ns == stamp
    assert _last_top1(out / "teacher") == _last_top1(tmp_path / "teacher")


def _steps(run_dir) -> int:
    return load_checkpoint(run_dir / "last.pt")["step"]


def test_demo_refuses_an_out_dir_it_does_not_own(small_fmnist, tmp_path, capsys):
    (tmp_path / "out" / "kd").mkdir(parents=True)
    (tmp_path / "out" / "kd" / "notes.txt").write_text("mine")
    argv = ["demo", "--quick", "--no-progress", "--out", str(tmp_path / "out"), "--n-labeled", "9"]
    assert main(argv) == 2
    assert "is not a run directory of kdkit demo" in capsys.readouterr().err
    assert (tmp_path / "out" / "kd" / "notes.txt").read_text() == "mine"


def test_cli_prints_kderror_without_traceback(monkeypatch, capsys):
    def boom(split="train", **kw):
        raise kdkit.KDError("Fashion-MNIST not found; install it: sudo apt-get install x")

    monkeypatch.setattr(kdkit.data, "load_fashion_mnist", boom)
    assert main(["demo", "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdkit: error: Fashion-MNIST not found") and "Traceback" not in err
