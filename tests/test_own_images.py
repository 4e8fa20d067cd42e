"""Your own images, end to end: a generated folder of mixed JPEG/PNG, grey/RGBA and broken
files (tests/_images.py) through teacher fine-tuning, distillation from its run directory,
eval, predict and export (issue 21). Tiny models, 32 px, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _images import CLASSES, make_photos, tiny_model

from kdkit.cli import main
from kdkit.load import load_checkpoint, save_checkpoint


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


@pytest.fixture(scope="module")
def teacher_run(clean, tmp_path_factory) -> Path:
    """A teacher fine-tuned on the labels alone (no teacher: section at all)."""
    tmp = tmp_path_factory.mktemp("teacher")
    raw = _config(clean)
    del raw["teacher"]  # no teacher: section at all is the same as teacher: null
    run = tmp / "my-teacher"
    assert main(["train", str(_write(tmp / "t.yaml", raw)), "--run-dir", str(run)]) == 0
    return run


def test_train_without_a_teacher_then_distill_from_its_run_dir(
    clean, teacher_run, tmp_path, capsys
):
    best = load_checkpoint(teacher_run / "best.pt")
    assert best["teacher_spec"] is None and best["student_spec"]["model"] == "kdkit:fmnist_student"
    report = (teacher_run / "report.md").read_text()
    assert "teacher `" not in report and "student `kdkit:fmnist_student`" in report
    capsys.readouterr()
    assert main(["eval", str(teacher_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["student"]["top1"] == best["best_score"]
    assert main(["eval", str(teacher_run), "--teacher"]) == 2  # it has none: one line
    assert "no teacher" in capsys.readouterr().err

    kd = _config(clean, name="kd", teacher={"model": str(teacher_run)})
    kd["data"]["unlabeled"] = [str(clean.wild)]
    kd["train"]["epochs"] = 1
    kd_run = tmp_path / "kd"
    assert main(["train", str(_write(tmp_path / "kd.yaml", kd)), "--run-dir", str(kd_run)]) == 0
    assert load_checkpoint(kd_run / "best.pt")["teacher_spec"]["model"] == str(teacher_run)
    assert f"teacher `{teacher_run}`" in (kd_run / "report.md").read_text()


def test_class_names_travel_to_checkpoint_run_dir_and_onnx(teacher_run, clean, tmp_path, capsys):
    import onnx

    assert load_checkpoint(teacher_run / "best.pt")["classes"] == list(CLASSES)
    assert json.loads((teacher_run / "classes.json").read_text()) == list(CLASSES)
    out = tmp_path / "student.onnx"
    assert main(["export", str(teacher_run), "--onnx", str(out)]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["kdkit.classes"]) == list(CLASSES)
    capsys.readouterr()

    answers = {}
    for source in (teacher_run, teacher_run / "best.pt", out):
        assert main(["predict", str(source), str(clean.val), "--json", "--topk", "2"]) == 0
        answers[source] = json.loads(capsys.readouterr().out)
    rows = answers[teacher_run]
    assert len(rows) == 9 and all(len(r["top"]) == 2 for r in rows)
    assert {r["top"][0]["class"] for r in rows} <= set(CLASSES)
    for other in (teacher_run / "best.pt", out):  # one preprocessing, three model files
        for a, b in zip(rows, answers[other], strict=True):
            assert a["path"] == b["path"] and a["top"][0]["index"] == b["top"][0]["index"]
            assert abs(a["top"][0]["prob"] - b["top"][0]["prob"]) < 1e-4
    # predict agrees with eval: the val top-1 is the share of rows whose class folder wins
    hits = sum(Path(r["path"]).parent.name == r["top"][0]["class"] for r in rows)
    best = load_checkpoint(teacher_run / "best.pt")
    assert abs(100 * hits / 9 - best["best_score"]) < 1e-6

    int8 = tmp_path / "student.int8.onnx"  # behind the fidelity gate, on the run's val images
    assert main(["export", str(teacher_run), "--onnx", str(int8), "--int8"]) in (0, 2)
    gate = capsys.readouterr()
    if int8.exists():
        assert "fidelity:" in gate.out and "top-1 agreement" in gate.out
    else:  # refused below 99% agreement: one line, nothing written
        assert "disagrees with the fp32 student" in gate.err and "--min-agreement" in gate.err
    assert main(["export", str(teacher_run), "--onnx", str(int8), "--int8",
                 "--min-agreement", "0"]) == 0  # fmt: skip
    props = {p.key: p.value for p in onnx.load(str(int8)).metadata_props}
    assert (
        json.loads(props["kdkit.classes"]) == list(CLASSES) and props["kdkit.precision"] == "int8"
    )
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8)).graph.node)
    capsys.readouterr()
    assert main(["predict", str(int8), str(clean.val), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 9

    assert main(["predict", str(out), str(clean.val / "cat" / "0.png"), "--csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,rank,class,index,prob" and len(lines) == 4  # default top 3


def test_predict_skips_broken_files(teacher_run, photos, capsys):
    assert main(["predict", str(teacher_run), str(photos.wild)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 6  # notes.jpg skipped
    assert "1 unreadable images skipped: notes.jpg" in captured.err


def test_eval_moved_run_dir_and_recorded_input_size(teacher_run, clean, tmp_path, capsys, caplog):
    import shutil

    assert main(["eval", str(teacher_run), "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)["student"]
    moved, data = tmp_path / "elsewhere" / "run", tmp_path / "elsewhere" / "val"
    shutil.copytree(teacher_run, moved)
    shutil.copytree(clean.val, data)
    gone = clean.root.with_name(clean.root.name + ".moved")
    shutil.move(clean.root, gone)  # the old data is gone
    try:
        assert main(["eval", str(moved)]) == 2
        assert "--data val.image_folder" in capsys.readouterr().err
        shutil.rmtree(data / "dog")  # a val folder lacking a class keeps the others' indices
        assert main(["eval", str(moved), "--json", "--data", f"val.image_folder={data}"]) == 0
        scores = json.loads(capsys.readouterr().out)["student"]
    finally:
        shutil.move(gone, clean.root)
    assert scores["images"] == 6

    ckpt = load_checkpoint(teacher_run / "best.pt")
    bare = tmp_path / "bare.pt"  # a checkpoint without its run config: 32 px from input_shape
    save_checkpoint(bare, {k: v for k, v in ckpt.items() if k not in ("config", "checksum")})
    assert main(["eval", str(bare), "--json", "--data", f"val.image_folder={clean.val}"]) == 0
    assert json.loads(capsys.readouterr().out)["student"]["top1"] == reference["top1"]
    with caplog.at_level("WARNING"):
        assert main(["eval", str(teacher_run), "--data", "image_size=40"]) == 0
    assert "trained at 32 px" in caplog.text


def test_bad_files_are_skipped_counted_and_named(photos, tmp_path, caplog):
    raw = _config(photos, name="bad", train={"epochs": 1, "device": "cpu", "progress": False})
    raw["teacher"] = tiny_model()
    raw["data"]["unlabeled"] = [str(photos.wild)]
    run = tmp_path / "bad"
    with caplog.at_level("WARNING"):
        assert main(["train", str(_write(tmp_path / "bad.yaml", raw)), "--run-dir", str(run)]) == 0
    logged = caplog.text
    assert "truncated.jpg" in logged and "notes.jpg" in logged  # named when met
    assert "empty.png" in logged  # an empty file: met by the loader, skipped and counted
    metrics = (run / "metrics.csv").read_text().splitlines()
    header, row = metrics[0].split(","), metrics[1].split(",")
    assert row[header.index("skipped_files")] == "3"  # truncated, empty, notes: once each
    assert row[header.index("val_skipped_files")] == "0"
    report = (run / "report.md").read_text()
    assert "3 unreadable images skipped" in report and "empty.png" in report


@pytest.mark.parametrize("decode", ["pil", "cpu"])
def test_every_loader_skips_and_a_wholly_unreadable_batch_stops(photos, tmp_path, decode):
    from kdkit.data import ImageFolderManager
    from kdkit.errors import KDError

    kw = dict(batch_size=4, workers=0, decode=decode, drop_last=False)
    manager = ImageFolderManager(photos.root, 32, **kw)
    seen = sum(len(b.labels) for b in manager.train_loader)
    assert seen == len(manager.train_dataset) - 2  # the truncated JPEG and empty.png
    # a folder whose class holds nothing but broken files
    junk = tmp_path / "junk"
    for split in ("train", "val"):
        (junk / split / "a").mkdir(parents=True)
        for i in range(3):
            (junk / split / "a" / f"{i}.jpg").write_text("not an image")
    manager = ImageFolderManager(junk, 32, **kw)
    with pytest.raises(KDError, match="no image of a whole batch"):
        next(iter(manager.train_loader))


def test_precompute_and_cache_check_take_the_train_config(teacher_run, photos, tmp_path, capsys):
    kd = _config(
        photos, name="kd", teacher={"model": str(teacher_run)}, run_dir=str(tmp_path / "kd")
    )
    kd["data"]["unlabeled"] = [str(photos.wild)]
    kd["data"]["views"] = {"crop": "pad", "pad": 2, "num_views": 2}
    kd["train"]["epochs"] = 1
    feature = {"student": "pool", "teacher": "pool", "loss": "feature_mse", "weight": 0.5}
    kd["distill"] = {"pairs": [{"loss": "soft_kl"}, feature]}  # the feature replays too
    kd_yaml = _write(tmp_path / "kd.yaml", kd)
    assert main(["precompute", str(kd_yaml), "--topk", "2", "--no-progress"]) == 0
    out = tmp_path / "kd-teacher-cache"
    printed = capsys.readouterr().out
    assert f"wrote {out}: 27 samples x 2 views, top-2" in printed  # 20 (empty.png too) + 7 wild
    assert "3 unreadable images skipped" in printed  # placeholder rows, never read
    assert main(["cache", "check", str(kd_yaml)]) == 0
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
    _check_cached_feature(kd_yaml, out)

    student = dict(kd, run_dir=str(tmp_path / "student"), teacher={"model": f"cache:{out}"})
    student["data"] = dict(kd["data"], views={"crop": "pad", "pad": 2})  # num_views: the cache's
    s_yaml = _write(tmp_path / "student.yaml", student)
    assert main(["cache", "check", str(s_yaml)]) == 0  # live teacher from the cache's record
    assert main(["train", str(s_yaml)]) == 0
    assert (tmp_path / "student" / "best.pt").is_file()
    capsys.readouterr()
    argv = ["train", str(s_yaml), "--run-dir", str(tmp_path / "other"), "--set"]
    assert main([*argv, "data.views.pad=3"]) == 2
    err = capsys.readouterr().err
    assert "pad (cache 2, run 3; config key data.views.pad)" in err and len(err.splitlines()) == 1


def test_relative_paths_resume_extension_and_init_from(
    clean, teacher_run, tmp_path, monkeypatch, capsys
):
    import shutil

    project = tmp_path / "project"
    shutil.copytree(clean.train, project / "data" / "train")
    shutil.copytree(clean.val, project / "data" / "val")
    raw = _config(clean, run_dir="runs/scratch")
    raw["data"]["train"] = {"image_folder": "data/train"}  # relative to the config's folder
    raw["data"]["val"] = {"image_folder": "data/val"}
    raw["train"]["epochs"] = 1
    cfg = _write(project / "scratch.yaml", raw)
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert main(["train", str(cfg)]) == 0
    run = project / "runs" / "scratch"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["train"]["image_folder"] == str(project / "data" / "train")
    capsys.readouterr()
    assert (
        main(["train", str(cfg), "--set", "data.val.image_folder=data/test", "--print-config"]) == 2
    )
    err = capsys.readouterr().err
    assert f"no folder at {project / 'data' / 'test'}" in err and f"folder {project}" in err

    # --resume --set train.epochs=N extends the finished run; fewer epochs are refused
    assert main(["train", str(cfg), "--resume", "--set", "train.epochs=2"]) == 0
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert "extended with --resume (from 1 to 2 epochs)" in (run / "report.md").read_text()
    assert main(["train", str(cfg), "--resume", "--set", "train.epochs=1"]) == 2
    assert "can only grow" in capsys.readouterr().err
    assert main(["train", str(cfg), "--resume", "--set", "train.optimizer.lr=0.5"]) == 2

    # --init-from RUN: a new run starting from another run's best student
    argv = ["train", str(cfg), "--run-dir", str(tmp_path / "init"), "--init-from", str(teacher_run)]
    assert main([*argv, "--set", "train.optimizer.lr=0.000000001"]) == 0  # lr ~0: stays the teacher
    got = load_checkpoint(tmp_path / "init" / "best.pt")["student"]
    want = load_checkpoint(teacher_run / "best.pt")["student"]
    assert all(
        torch.allclose(got[k].float(), want[k].float(), atol=1e-5) for k in want if "weight" in k
    )


def _check_cached_feature(config: Path, cache_dir: Path) -> None:
    """The cache's "pool" feature is what the live teacher computes on the same views."""
    from kdkit.cache import CachedTeacher
    from kdkit.config import load_resolved
    from kdkit.data.pipeline import prepare_input
    from kdkit.run.cache_job import cache_plan

    plan = cache_plan(load_resolved(config))
    assert plan.features == ("pool",)
    index, view = torch.tensor([0, 5, 20]), torch.tensor([1, 0, 1])
    images = torch.stack([plan.dataset[int(i)][0] for i in index])
    x = prepare_input(images, index, view, plan.views, plan.mean, plan.std, "cpu")
    plan.teacher.request_features(["pool"])
    live = plan.teacher(x, index=index, view=view).get("pool")
    cached = CachedTeacher(cache_dir)
    cached.request_features(["pool"])
    stored = cached(x, index=index, view=view).get("pool")
    assert stored.shape == live.shape == (3, 128)
    torch.testing.assert_close(stored, live, atol=2e-3, rtol=2e-3)  # fp16 storage


def test_calibration_reads_around_broken_files(photos):
    from kdkit.config import load_config
    from kdkit.data.unreadable import Unreadable, readable
    from kdkit.run.data import build_data

    raw = _config(photos)
    data = build_data(load_config(data=raw).data, seed=0)
    items = [data.train_dataset[i] for i in range(len(data.train_dataset))]
    assert sum(isinstance(it, Unreadable) for it in items) == 2  # truncated.jpg, empty.png
    calibration = readable(data.train_dataset)  # what an int8 teacher calibrates on
    assert all(not isinstance(calibration[i], Unreadable) for i in range(len(calibration)))
