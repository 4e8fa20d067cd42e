"""Your own images, end to end: a generated folder of mixed JPEG/PNG, grey/RGBA and broken
files (tests/_images.py) through teacher fine-tuning, distillation from its run directory,
eval, predict and export (issue 21). Tiny models, 32 px, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _images import make_photos, tiny_model

from kdkit.cli import main
from kdkit.load import load_checkpoint


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The folder with its broken files."""
    return make_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The same folder without broken files."""
    return make_photos(tmp_path_factory.mktemp("clean"), broken=False)


def _config(photos, **over) -> dict:
    cfg = {
        "name": "teacher",
        "teacher": None,
        "student": tiny_model(),
        "data": {
            "train": {"image_folder": str(photos.train)},
            "val": {"image_folder": str(photos.val)},
            "image_size": 32,
            "batch_size": 6,
            "workers": 0,
            "views": {"crop": "pad", "flip": True},
        },
        "train": {"epochs": 2, "optimizer": {"lr": 0.01}, "device": "cpu", "progress": False},
    }
    cfg.update(over)
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_without_a_teacher_then_distill_from_its_run_dir(clean, tmp_path, capsys):
    photos = clean
    raw = _config(photos)
    del raw["teacher"]  # no teacher: section at all is the same as teacher: null
    teacher_run = tmp_path / "my-teacher"
    assert (
        main(["train", str(_write(tmp_path / "t.yaml", raw)), "--run-dir", str(teacher_run)]) == 0
    )
    best = load_checkpoint(teacher_run / "best.pt")
    assert best["teacher_spec"] is None and best["student_spec"]["model"] == "kdkit:fmnist_student"
    report = (teacher_run / "report.md").read_text()
    assert "teacher `" not in report and "student `kdkit:fmnist_student`" in report
    capsys.readouterr()
    assert main(["eval", str(teacher_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["student"]["top1"] == best["best_top1"]
    assert main(["eval", str(teacher_run), "--teacher"]) == 2  # it has none: one line
    assert "no teacher" in capsys.readouterr().err
    assert main(["export", str(teacher_run), "--onnx", str(tmp_path / "t.onnx")]) == 0

    kd = _config(photos, name="kd", teacher={"model": str(teacher_run)})
    kd["data"]["unlabeled"] = [str(photos.wild)]
    kd_run = tmp_path / "kd"
    assert main(["train", str(_write(tmp_path / "kd.yaml", kd)), "--run-dir", str(kd_run)]) == 0
    assert load_checkpoint(kd_run / "best.pt")["teacher_spec"]["model"] == str(teacher_run)
    assert f"teacher `{teacher_run}`" in (kd_run / "report.md").read_text()
