"""The config schema: parsing, overrides, validation messages, and bad configs at the CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from PIL import Image

from kdkit.cli import main
from kdkit.config import (
    LMRunConfig,
    RunConfig,
    apply_overrides,
    diff,
    load_config,
    parse,
    resolve_paths,
    to_dict,
    to_yaml,
)
from kdkit.errors import KDError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.fixture()
def tree(tmp_path) -> Path:
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "train" / name / f"{i}.png")
    (tmp_path / "empty").mkdir()
    return tmp_path


def base(root: Path) -> dict:
    return {
        "name": "t",
        "teacher": {"model": "kdkit:fmnist_teacher", "kwargs": {"in_channels": 3}},
        "student": {"model": "kdkit:fmnist_student", "kwargs": {"in_channels": 3}},
        "data": {"train": {"image_folder": str(root / "train")}, "image_size": 8, "workers": 0},
        "distill": {"pairs": [{"loss": "soft_kl", "args": {"temperature": 2}}]},
        "train": {"epochs": 2, "device": "cpu", "progress": False},
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(path, check_paths=False)  # their data/teacher files are the user's
    if path.stem.startswith("lm_"):  # the task: lm templates (kdkit init lm_chat)
        assert isinstance(cfg, LMRunConfig) and cfg.name and cfg.data.format != "text"
    else:
        assert isinstance(cfg, RunConfig) and cfg.name and cfg.distill.pairs
    assert parse(yaml.safe_load(to_yaml(cfg))) == cfg  # YAML round trip


def test_shipped_configs_cover_the_issue():
    assert {p.stem for p in CONFIGS} >= {
        "fmnist_kd",
        "fmnist_fitnets",
        "fmnist_dkd",
        "folder_resnet50_to_resnet18",
    }
    fitnets = load_config(
        CONFIGS[[p.stem for p in CONFIGS].index("fmnist_fitnets")], check_paths=False
    )
    assert any(p.loss == "feature_mse" and p.student for p in fitnets.distill.pairs)


def test_defaults_and_shorthands(tree):
    raw = base(tree)
    raw["teacher"] = "kdkit:fmnist_teacher"  # a bare model string
    cfg = load_config(data=raw)
    assert cfg.teacher.model == "kdkit:fmnist_teacher" and cfg.teacher.backend == "auto"
    assert cfg.train.channels_last == "auto"  # measured on the first batch (test_autotune)
    assert cfg.train.optimizer.name == "AdamW" and cfg.data.batch_size == 128
    assert cfg.data.views.crop == "resized" and cfg.distill.student_weight == 0.5
    assert to_dict(cfg)["data"]["train"] == {"image_folder": str(tree / "train")}


def test_overrides_reach_lists_and_parse_values(tree):
    raw = apply_overrides(
        base(tree),
        [
            "train.epochs=5",
            "distill.pairs.0.args.temperature=1.5",
            "teacher.weights=null",
            "data.unlabeled=[a, b]",
            "train.optimizer.args.betas=[0.9, 0.95]",
        ],
    )
    assert raw["train"]["epochs"] == 5 and raw["distill"]["pairs"][0]["args"]["temperature"] == 1.5
    assert raw["teacher"]["weights"] is None and raw["data"]["unlabeled"] == ["a", "b"]
    with pytest.raises(KDError, match="list position 0..0"):
        apply_overrides(base(tree), ["distill.pairs.3.loss=hard"])
    with pytest.raises(KDError, match="KEY=VALUE"):
        apply_overrides(base(tree), ["train.epochs"])


def test_diff_and_resolve_paths(tree, monkeypatch):
    monkeypatch.chdir(tree)
    raw = base(tree)
    raw["data"]["train"]["image_folder"] = "train"  # relative to the working directory
    a = resolve_paths(load_config(data=raw))
    assert a.data.train.image_folder == str(tree / "train") and a.run_dir == str(tree / "runs/t")
    b = load_config(data=copy.deepcopy(raw), overrides=["train.epochs=3", "data.batch_size=64"])
    assert diff(a, resolve_paths(b)) == {"data.batch_size": (128, 64), "train.epochs": (2, 3)}


BAD = [  # (override or edit, words the one-line message must hold)
    (["trian.epochs=1"], "unknown config key 'trian'; did you mean 'train'"),
    (["train.epchs=1"], "did you mean 'train.epochs'"),
    (["distill.pairs.0.loss=soft_kll"], "did you mean 'soft_kl'"),
    (["teacher=null", "data.unlabeled=[EMPTY]"], "only train through a teacher"),
    (["teacher.model=tochvision:resnet18"], "did you mean 'torchvision:resnet18'"),
    (["student.model=torchvision:resnet1800"], "no model 'resnet1800' under torchvision"),
    (["data.train.image_folder=/no/such/folder"], "no folder at /no/such/folder"),
    (["train.epochs=-3"], "'train.epochs' expects an integer >= 1, got -3"),
    (["data.batch_size=big"], "'data.batch_size' expects an integer, got 'big'"),
    (["train.precision=fp8"], "'train.precision' expects one of"),
    (["distill.pairs.0.args.temprature=2"], "did you mean 'temperature'"),
    (["train.optimizer.name=adamw"], "did you mean 'AdamW'"),
    (["train.scheduler.name=Cosine"], "torch.optim.lr_scheduler has no 'Cosine'"),
    (["data.train={split: 0.1}"], "only for data.val"),
    (["distill.start_epoch=2"], "must be below train.epochs"),
    (["teacher.weights=/no/teacher.pt"], "no file at /no/teacher.pt"),
    (["student.model=onnx:student.onnx"], "onnx: is for the teacher only"),
    (["distill.pairs.1={loss: hard}"], "list position"),
    (["distill.pairs=[{loss: hard}, {loss: soft_kl}]"], "repeats the layers"),
    (["data.views.crop=random"], "'data.views.crop' expects one of"),
    (["teacher.precision=int4"], "'teacher.precision' expects one of"),
    (["data.labeled=1000"], "'data.labeled' is 1000 but the training set has 4 images"),
    (["data.unlabeled=[EMPTY]"], "holds no images"),
    (["teacher.model=python:os:system"], "names code to run"),
]


@pytest.mark.parametrize("sets, words", BAD, ids=[s[0].split("=")[0] for s, _ in BAD])
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tree, tmp_path, capsys, sets, words):
    sets = [s.replace("EMPTY", str(tree / "empty")) for s in sets]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base(tree)))
    run = tmp_path / "run"
    argv = ["train", str(cfg), "--run-dir", str(run)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("kdkit: error: ") and words in err, err
    assert not run.exists()


def test_bad_files_are_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nteacher: [unclosed\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    for path, words in (
        (broken, "is not valid YAML (line"),
        (listed, "the config expects a mapping"),
        (tmp_path / "missing.yaml", "no config file at"),
    ):
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err, err
