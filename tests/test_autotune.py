"""``teacher.backend: auto`` and ``train.channels_last: auto``: chosen on the first batch,
recorded in choices.json, kept by --resume, overridden by an explicit key.

The clock is fake (``kdkit.teachers.autotune.measure`` replaced by a table): timings on a
shared machine prove nothing; what is checked is which candidate the logic keeps and why.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
from torch import nn

import kdkit
from kdkit.teachers import autotune
from kdkit.teachers.base import Teacher, TeacherOutput
from tests._images import make_photos, tiny_model

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


@pytest.fixture(autouse=True)
def _autotune_on(monkeypatch, tmp_path):
    monkeypatch.setenv("KDKIT_AUTOTUNE", "on")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the ONNX export cache goes here


def fake_clock(monkeypatch, table: dict[str, float], calls: list | None = None) -> None:
    """``measure`` returns ``table[label]`` after one real call (the candidate must run)."""

    def measure(label, fn, device):
        fn()
        if calls is not None:
            calls.append(label)
        return table[label]

    monkeypatch.setattr(autotune, "measure", measure)


def no_clock(monkeypatch) -> None:
    def measure(label, fn, device):
        raise AssertionError(f"measured {label} again")

    monkeypatch.setattr(autotune, "measure", measure)


def _config(photos, run_dir, *, teacher=None, **train) -> dict:
    return {
        "teacher": {**tiny_model(), "calibration": {"samples": 8}, **(teacher or {})},
        "student": tiny_model(),
        "data": {
            "train": {"image_folder": str(photos.train)},
            "val": {"image_folder": str(photos.val)},
            "image_size": 32,
            "batch_size": 4,
            "workers": 0,
            "views": {"crop": "pad", "flip": True},
        },
        "train": {"epochs": 1, "device": "cpu", "progress": False, **train},
        "run_dir": str(run_dir),
    }


TIMES = {
    "torch": 0.030,
    "onnx": 0.010,
    "onnx-int8": 0.020,
    "channels_last=false": 0.020,
    "channels_last=true": 0.010,
    "off": 0.010,  # train.overlap's splits (two threads: sequential, 1+1)
    "1+1": 0.020,
}


def test_auto_chooses_records_and_reports_then_resume_keeps_it(tmp_path, monkeypatch, caplog):
    from kdkit.config import load_config
    from kdkit.run.job import train_run

    photos = make_photos(tmp_path / "photos", broken=False)
    raw = _config(photos, tmp_path / "run")
    calls: list[str] = []
    fake_clock(monkeypatch, TIMES, calls)
    with caplog.at_level(logging.INFO, logger="kdkit"):
        train_run(load_config(data=raw))
    choices = json.loads((tmp_path / "run" / "choices.json").read_text())
    backend = choices["teacher.backend"]
    assert backend["value"] == ("onnx" if HAS_ORT else "torch")
    assert set(backend["seconds_per_batch"]) | set(backend["skipped"]) >= {
        "torch",
        "torch-compiled",
        "onnx",
        "onnx-int8",
        "tensorrt",
    }
    assert backend["skipped"]["torch-compiled"] == "GPU only"
    assert choices["train.channels_last"]["value"] is True
    assert "channels_last=true" in calls and "torch" in calls
    line = next(r.getMessage() for r in caplog.records if "teacher.backend: auto" in r.getMessage())
    assert f"-> {backend['value']}" in line and "torch 30.0 ms/batch" in line
    report = (tmp_path / "run" / "report.md").read_text()
    assert "teacher.backend: auto ->" in report and "measuring cost" in report
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "backend: auto" in saved and "channels_last: auto" in saved  # the config says auto

    # --resume (extended by an epoch): the recorded choices, no clock
    no_clock(monkeypatch)
    raw["train"]["epochs"] = 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kdkit"):
        train_run(load_config(data=raw), resume=True)
    assert json.loads((tmp_path / "run" / "choices.json").read_text()) == choices
    assert any("recorded by the run" in r.getMessage() for r in caplog.records)


def test_explicit_backend_and_channels_last_are_not_measured(tmp_path, monkeypatch):
    from kdkit.config import load_config
    from kdkit.run.job import build_run
    from kdkit.teachers.torch_teacher import TorchTeacher

    photos = make_photos(tmp_path / "photos", broken=False)
    raw = _config(
        photos, tmp_path / "run", teacher={"backend": "torch"}, channels_last=False, overlap=False
    )
    no_clock(monkeypatch)
    trainer, _, choices = build_run(load_config(data=raw))
    assert choices == []
    assert isinstance(trainer.task.teacher, TorchTeacher)
    assert trainer.inputs.channels_last is False


class _Wrong(Teacher):
    """A fast teacher with the wrong answers: must lose on the agreement check."""

    def forward(self, x, *, index=None, view=None) -> TeacherOutput:
        return TeacherOutput(logits=torch.randn(x.shape[0], 5))

    def fingerprint(self) -> str:
        return "wrong"


def test_a_backend_that_fails_the_gate_or_to_build_is_skipped_with_its_reason(monkeypatch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).eval()
    example = torch.randn(64, 3, 2, 2)
    real = autotune.build_backend

    def build(name, module, **kw):
        if name == "onnx":
            return _Wrong()
        if name == "onnx-int8":
            raise RuntimeError("no int8 kernels for you")
        return real(name, module, **kw)

    monkeypatch.setattr(autotune, "build_backend", build)
    monkeypatch.setattr(autotune, "onnx_file", lambda module, shape: None)
    monkeypatch.setattr(autotune.importlib.util, "find_spec", lambda name: object())
    fake_clock(monkeypatch, {"torch": 0.5, "onnx": 0.1, "onnx-int8": 0.1})
    teacher, choice = autotune.choose_backend(model, example, calibration=object())
    assert choice.value == "torch" and list(choice.seconds) == ["torch"]
    assert "top-1 agreement" in choice.skipped["onnx"]
    assert "failed to build: RuntimeError: no int8 kernels" in choice.skipped["onnx-int8"]
    assert "onnx skipped (top-1 agreement" in choice.line()


def test_features_keep_the_torch_backends_and_a_lone_candidate_is_not_timed(monkeypatch):
    no_clock(monkeypatch)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    teacher, choice = autotune.choose_backend(model, torch.randn(4, 3, 2, 2), features=True)
    assert choice.value == "torch" and choice.seconds == {}
    assert "features" in choice.skipped["onnx"]


@pytest.mark.skipif(not HAS_ORT, reason="needs onnxruntime")
def test_kdkit_teacher_backend_auto(monkeypatch):
    fake_clock(monkeypatch, {"torch": 0.2, "onnx": 0.1})
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 5)).eval()
    t = kdkit.make_teacher(model, backend="auto", input_shape=(3, 6, 6), batch_size=8)
    from kdkit.teachers.onnx_teacher import OnnxTeacher

    assert isinstance(t, OnnxTeacher)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(t(x).logits, model(x), rtol=1e-4, atol=1e-4)


def test_resume_of_a_run_from_before_auto_keeps_what_it_ran_with(tmp_path, monkeypatch):
    from kdkit.config import load_config
    from kdkit.run.job import train_run

    photos = make_photos(tmp_path / "photos", broken=False)
    older = _config(
        photos, tmp_path / "run", teacher={"backend": "torch"}, channels_last=False, overlap=False
    )
    no_clock(monkeypatch)
    train_run(load_config(data=older))  # what config.yaml said before auto was the default
    raw = _config(photos, tmp_path / "run", epochs=2)  # the same file, no keys: auto now
    result = train_run(load_config(data=raw), resume=True)
    assert len(result.history) == 2
    assert not (tmp_path / "run" / "choices.json").exists()
    assert "backend: torch" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_later_candidate_must_be_clearly_faster():
    assert autotune.pick_fastest({"torch": 1.0, "onnx": 0.97, "onnx-int8": 0.96}) == "torch"
    assert autotune.pick_fastest({"torch": 1.0, "onnx": 0.9, "onnx-int8": 0.88}) == "onnx"
    assert autotune.pick_fastest({"false": 1.0, "true": 0.5}) == "true"
