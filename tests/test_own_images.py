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


def test_bad_files_are_skipped_counted_and_named(photos, tmp_path, caplog):
    raw = _config(photos, name="bad", train={"epochs": 1, "device": "cpu", "progress": False})
    raw["teacher"] = tiny_model()
    raw["data"]["unlabeled"] = [str(photos.wild)]
    run = tmp_path / "bad"
    with caplog.at_level("WARNING"):
        assert main(["train", str(_write(tmp_path / "bad.yaml", raw)), "--run-dir", str(run)]) == 0
    logged = caplog.text
    assert "truncated.jpg" in logged and "notes.jpg" in logged  # named when met
    assert "skipped 1 empty" in logged  # an empty file: skipped when the folder is scanned
    metrics = (run / "metrics.csv").read_text().splitlines()
    header, row = metrics[0].split(","), metrics[1].split(",")
    assert row[header.index("skipped_files")] == "2"  # truncated.jpg + notes.jpg, once each
    assert row[header.index("val_skipped_files")] == "0"
    report = (run / "report.md").read_text()
    assert "2 unreadable images skipped" in report and "truncated.jpg" in report


@pytest.mark.parametrize("decode", ["pil", "cpu"])
def test_every_loader_skips_and_a_wholly_unreadable_batch_stops(photos, tmp_path, decode):
    from kdkit.data import ImageFolderManager
    from kdkit.errors import KDError

    kw = dict(batch_size=4, workers=0, decode=decode, drop_last=False)
    manager = ImageFolderManager(photos.root, 32, **kw)
    seen = sum(len(b.labels) for b in manager.train_loader)
    assert seen == len(manager.train_dataset) - 1  # the truncated JPEG; empty.png: at scan
    # a folder whose class holds nothing but broken files
    junk = tmp_path / "junk"
    for split in ("train", "val"):
        (junk / split / "a").mkdir(parents=True)
        for i in range(3):
            (junk / split / "a" / f"{i}.jpg").write_text("not an image")
    manager = ImageFolderManager(junk, 32, **kw)
    with pytest.raises(KDError, match="no image of a whole batch"):
        next(iter(manager.train_loader))
