"""The Python API's memory format: an InputPipeline left at ``channels_last="auto"`` (its
default) is measured on the Trainer's first batch as ``kdkit train`` measures it, recorded
with the run's other choices and kept on resume. Timings are never asserted: the clock is
replaced (issue 39: the API default within 5% of the CLI default)."""

from __future__ import annotations

import pytest
import torch
from _tiny import blob_tensors, quadrant_net
from torch import nn

from kdkit import Distiller, KDError, SoftTargetKL, Trainer
from kdkit.data import ArrayDataset, FastLoader
from kdkit.data.pipeline import InputPipeline
from kdkit.teachers import autotune


def student_net() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 4),
    )  # fmt: skip


def trainer(tmp_path, inputs=None, epochs=1) -> Trainer:
    torch.manual_seed(1)
    x, y = blob_tensors(64)
    d = Distiller(student_net(), quadrant_net(8), SoftTargetKL())
    return Trainer(
        d, FastLoader(ArrayDataset(x, y), 16, seed=3), epochs=epochs, device="cpu",
        progress=False, checkpoint_dir=tmp_path / "run", overlap=False,
        inputs=inputs if inputs is not None else InputPipeline(None, (0.5,), (0.25,)),
    )  # fmt: skip


def clock(monkeypatch, faster: str) -> list[str]:
    """``measure`` answers ``channels_last=<faster>`` as the faster one; the labels asked."""
    asked: list[str] = []
    monkeypatch.setenv("KDKIT_AUTOTUNE", "on")

    def measure(label, fn, device):
        fn()  # the candidate must run
        asked.append(label)
        return 0.1 if label == f"channels_last={faster}" else 1.0

    monkeypatch.setattr(autotune, "measure", measure)
    return asked


def fmt(tr: Trainer) -> dict:
    return {c.key: c for c in tr.choices}


def test_the_pipeline_default_is_auto_and_a_bad_value_is_one_line():
    assert InputPipeline().channels_last == "auto"
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    assert InputPipeline()((x, None, None)).x.is_contiguous()  # auto: contiguous until chosen
    with pytest.raises(KDError, match="channels_last must be True, False or 'auto'"):
        InputPipeline(channels_last="yes")


@pytest.mark.parametrize("faster", ["true", "false"])
def test_auto_is_measured_on_the_first_batch_and_applied(monkeypatch, tmp_path, faster):
    asked = clock(monkeypatch, faster)
    tr = trainer(tmp_path)
    tr.fit()
    choice = fmt(tr)["train.channels_last"]
    assert choice.measured and choice.value is (faster == "true")
    assert asked[:2] == ["channels_last=false", "channels_last=true"]
    assert tr.inputs.channels_last is (faster == "true")
    conv = tr.task.student[0].weight  # [4, 1, 3, 3]: one channel, so read the stride
    assert conv.stride()[1] == (1 if faster == "true" else 9)


def test_the_choice_is_kept_on_resume_without_measuring(monkeypatch, tmp_path):
    clock(monkeypatch, "true")
    trainer(tmp_path, epochs=1).fit()
    asked = clock(monkeypatch, "false")  # a resumed run does not measure again
    resumed = trainer(tmp_path, epochs=2)
    resumed.fit(resume=True)
    assert fmt(resumed)["train.channels_last"].value is True and not asked
    assert resumed.inputs.channels_last is True


def test_autotune_off_and_explicit_values_are_not_measured(monkeypatch, tmp_path):
    monkeypatch.setenv("KDKIT_AUTOTUNE", "off")
    off = trainer(tmp_path / "off")
    off.fit()
    assert fmt(off)["train.channels_last"].value is False
    assert "KDKIT_AUTOTUNE=off" in fmt(off)["train.channels_last"].skipped["true"]
    asked = clock(monkeypatch, "true")
    given = trainer(tmp_path / "given", InputPipeline(None, (0.5,), (0.25,), channels_last=False))
    given.fit()
    assert "train.channels_last" not in fmt(given) and not asked
