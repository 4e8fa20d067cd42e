"""Hostile resumes (issue 23): resume continues exactly, or says why not.

The config recorded inside ``last.pt`` is compared (an edited ``config.yaml`` does not fool
it), and so are the fingerprints of what the run depends on: the teacher's weights, a
teacher cache, the training images. Rows and verdicts as in ``tests/test_hostile.py``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from _hostile_rows import (
    Case,
    image_tree,
    judge_row,
    params,
    run_config,
    teacher_weights,
    write_tally,
    write_yaml,
)
from PIL import Image

import kdkit
from kdkit.data import ArrayDataset, FastLoader

pytestmark = pytest.mark.usefixtures("one_thread")
VERDICTS: dict[str, str] = {}


@dataclass
class Fx:
    root: Path
    tree: Path
    weights: Path


@pytest.fixture(scope="module")
def fx(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("hostile_resume")
    tree = image_tree(root / "images")
    weights = teacher_weights(root / "teacher.pt")
    yield Fx(root, tree, weights)
    write_tally(VERDICTS)


def _copy(fx: Fx, name: str) -> tuple[Path, Path, Path]:
    """A run of its own (images and teacher weights copied, so they can be changed), trained
    for one epoch: (run dir, config file, work folder)."""
    from kdkit.cli import main

    work = fx.root / "work" / name
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(fx.tree, work / "images")
    shutil.copy(fx.weights, work / "teacher.pt")
    cfg = write_yaml(work / "kd.yaml", run_config(work / "images", work / "teacher.pt"))
    run = work / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    return run, cfg, work


def _resume(run: Path, cfg: Path) -> list:
    return ["train", cfg, "--run-dir", run, "--resume"]


def _same_config_resumes(fx: Fx):
    run, cfg, _ = _copy(fx, "same")
    return _resume(run, cfg)


def _edited_config_yaml(fx: Fx):
    """The user changes the lr in both their config and the run's config.yaml."""
    run, cfg_path, work = _copy(fx, "edited")
    cfg = run_config(work / "images", work / "teacher.pt")
    cfg["train"]["optimizer"] = {"lr": 0.5}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["train"]["optimizer"]["lr"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    return _resume(run, write_yaml(cfg_path, cfg))


def _teacher_replaced(fx: Fx):
    run, cfg, work = _copy(fx, "teacher")
    teacher_weights(work / "teacher.pt", seed=1)  # same path, other weights
    return _resume(run, cfg)


def _image_added(fx: Fx):
    run, cfg, work = _copy(fx, "images")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(work / "images" / "train" / "cat" / "new.png")
    return _resume(run, cfg)


# -- the library ----------------------------------------------------------------------------
def _blobs():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (16, 1, 8, 8), generator=g, dtype=torch.uint8)
    return ArrayDataset(x, torch.randint(0, 2, (16,), generator=g))


def _trainer(d: Path, run_info=None, epochs=1):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    return kdkit.Trainer(kdkit.Distiller(net, None), FastLoader(_blobs(), 8, seed=0),
                         epochs=epochs, checkpoint_dir=d, device="cpu", progress=False,
                         run_info=run_info)  # fmt: skip


def _lib_resume(fx: Fx, name: str, before: dict, after: dict) -> None:
    d = fx.root / "work" / name
    shutil.rmtree(d, ignore_errors=True)
    _trainer(d, before).fit()
    _trainer(d, after, epochs=2).fit(resume=True)


def _lib_same(fx: Fx) -> bool:
    info = {"config": {"a": 1}, "fingerprints": {"teacher": "x"}}
    _lib_resume(fx, "lib_same", info, info)
    return True


CASES: list[Case] = [
    Case("resume-same-config-continues", _same_config_resumes, expect="correct", cli=True),
    Case("resume-config-yaml-edited-too", _edited_config_yaml, r"recorded in it.*train\.optimizer\.lr", cli=True),
    Case("resume-teacher-weights-replaced", _teacher_replaced, "teacher changed since", cli=True),
    Case("resume-training-image-added", _image_added, "dataset changed since", cli=True),
    Case("resume-lib-config-differs", lambda fx: _lib_resume(fx, "lib_cfg", {"config": {"train": {"lr": 1}}}, {"config": {"train": {"lr": 2}}}),
         r"recorded in it.*train\.lr"),
    Case("resume-lib-cache-replaced", lambda fx: _lib_resume(fx, "lib_fp", {"fingerprints": {"cache": "a"}}, {"fingerprints": {"cache": "b"}}),
         "cache changed since"),
    Case("resume-lib-same-run-info", _lib_same, expect="correct"),
]  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_resume(case: Case, fx, capsys):
    judge_row(case, fx, capsys, VERDICTS)
