"""Hostile resumes (issues 10 and 23): resume continues exactly, or says why not.

The config recorded inside ``last.pt`` is compared (an edited ``config.yaml`` does not fool
it), and so are the fingerprints of what the run depends on: the teacher's weights, a
teacher cache, the training images; a resume into another student or optimizer, from a
damaged ``last.pt`` or a mistyped directory is refused. Rows and verdicts: tests/_hostile/.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from _hostile import (
    Case,
    blobs,
    judge_row,
    net,
    params,
    run_config,
    teacher_weights,
    trainer,
    write_yaml,
)
from PIL import Image

from kdkit.data import FastLoader

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy(fx, name: str) -> tuple[Path, Path, Path]:
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


def _same_config_resumes(fx):
    run, cfg, _ = _copy(fx, "same")
    return _resume(run, cfg)


def _edited_config_yaml(fx):
    """The user changes the lr in both their config and the run's config.yaml."""
    run, cfg_path, work = _copy(fx, "edited")
    cfg = run_config(work / "images", work / "teacher.pt")
    cfg["train"]["optimizer"] = {"lr": 0.5}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["train"]["optimizer"]["lr"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    return _resume(run, write_yaml(cfg_path, cfg))


def _teacher_replaced(fx):
    run, cfg, work = _copy(fx, "teacher")
    teacher_weights(work / "teacher.pt", seed=1)  # same path, other weights
    return _resume(run, cfg)


def _image_added(fx):
    run, cfg, work = _copy(fx, "images")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(work / "images" / "train" / "cat" / "new.png")
    return _resume(run, cfg)


# -- the library ----------------------------------------------------------------------------
def _lib_resume(fx, name: str, before: dict, after: dict) -> None:
    d = fx.root / "work" / name
    shutil.rmtree(d, ignore_errors=True)
    trainer(d, run_info=before).fit()
    trainer(d, run_info=after, epochs=2).fit(resume=True)


def _lib_same(fx) -> bool:
    info = {"config": {"a": 1}, "fingerprints": {"teacher": "x"}}
    _lib_resume(fx, "lib_same", info, info)
    return True


def _resume_other_architecture(fx):
    d = fx.root / "work" / "arch"
    trainer(d).fit()
    trainer(d, student=net(width=16)).fit(resume=True)


def _resume_other_optimizer(fx):
    d = fx.root / "work" / "opt"
    trainer(d).fit()

    def sgd(p):
        return torch.optim.SGD(p, lr=0.1, momentum=0.9)

    trainer(d, optimizer=sgd).fit(resume=True)


def _resume_flipped(fx):
    d = fx.root / "work" / "flipres"
    trainer(d).fit()
    state = torch.load(d / "last.pt", weights_only=True)
    bits = state["student"]["4.weight"].view(torch.int32).reshape(-1)
    bits[:20] ^= 1 << 30
    torch.save(state, d / "last.pt")
    trainer(d, epochs=2).fit(resume=True)


def _resume_typo(fx):
    (fx.root / "work" / "runs").mkdir(parents=True, exist_ok=True)
    trainer(fx.root / "work" / "runs" / "typo-dir", epochs=1).fit(resume=True)


def _resume_auto(fx):
    d = fx.root / "work" / "auto"
    hist = trainer(d).fit(resume="auto")
    return len(hist) == 1 and (d / "last.pt").is_file()


class _Stop(Exception):
    pass


def _metrics_mid_epoch_resume(fx):
    ref_dir, run_dir = fx.root / "work" / "m_ref", fx.root / "work" / "m_run"

    def make(d, callbacks=()):
        loader = FastLoader(blobs(), 16, seed=0)
        return trainer(d, teacher=net(seed=2), epochs=1, checkpoint_every=1, seed=3,
                       loader=loader, callbacks=callbacks)  # fmt: skip

    make(ref_dir).fit()

    def stop_at_3(trainer, out):
        if trainer.step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        make(run_dir, [stop_at_3]).fit()
    make(run_dir).fit(resume=True)
    ref = list(csv.DictReader((ref_dir / "metrics.csv").open()))
    got = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return len(got) == 1 and math.isclose(float(got[0]["loss_total"]),
                                          float(ref[0]["loss_total"]), rel_tol=1e-5)  # fmt: skip


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
    Case("resume-into-other-architecture", _resume_other_architecture, "cannot resume.*student"),
    Case("resume-into-other-optimizer", _resume_other_optimizer, "cannot resume.*(SGD|optimizer)"),
    Case("resume-true-without-checkpoint", _resume_typo, "no checkpoint.*resume='auto'"),
    Case("resume-auto-starts-fresh", _resume_auto, expect="correct"),
    Case("resume-bad-value", lambda fx: trainer(fx.root / "work" / "rb").fit(resume="yes"), "resume"),
    Case("flipped-bits-refused-on-resume", _resume_flipped, "fails its checksum"),
    Case("metrics-after-mid-epoch-resume", _metrics_mid_epoch_resume, expect="correct"),
]  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_resume(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
