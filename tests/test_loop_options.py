"""LoopOptions (kdkit/train/options.py): the loop's typed options, their ranges and device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kdkit import KDError, LoopOptions
from kdkit.config import SchedulerConfig, TrainConfig
from kdkit.train.options import loop_options


def test_fields_are_the_loop_options_in_order_with_their_defaults():
    assert LoopOptions.fields() == (
        "epochs", "precision", "grad_accum", "max_grad_norm", "scheduler_interval",
        "checkpoint_every", "nan_check_every", "progress", "device", "early_stopping",
        "ema_decay", "overlap",
    )  # fmt: skip
    o = LoopOptions()
    assert (o.epochs, o.precision, o.grad_accum, o.scheduler_interval) == (1, "fp32", 1, "epoch")
    assert (o.max_grad_norm, o.checkpoint_every, o.nan_check_every, o.ema_decay) == (None,) * 4
    assert o.progress is True and o.device is None and o.early_stopping is None
    assert o.overlap == "auto"  # the teacher beside the student when that measures faster
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.epochs = 3


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("epochs", 0, "an integer >= 1"),
        ("grad_accum", 0, "an integer >= 1"),
        ("precision", "fp8", "one of ['fp32', 'bf16', 'fp16']"),
        ("scheduler_interval", "batch", "'epoch' or 'step'"),
        ("checkpoint_every", 0, "None or >= 1"),
        ("nan_check_every", 0, "None or >= 1"),
        ("max_grad_norm", 0.0, "None or > 0"),
        ("max_grad_norm", -1.0, "None or > 0"),
        ("ema_decay", 1.0, "None or in (0, 1)"),
        ("ema_decay", 0.0, "None or in (0, 1)"),
    ],
)
def test_a_value_out_of_range_is_refused_naming_the_field_and_the_range(field, value, expected):
    with pytest.raises(KDError) as err:
        LoopOptions(**{field: value})
    assert str(err.value) == f"{field} must be {expected}, got {value!r}"


def test_the_edges_of_each_range_are_accepted():
    o = LoopOptions(epochs=1, grad_accum=1, precision="bf16", scheduler_interval="step",
                    checkpoint_every=1, nan_check_every=1, max_grad_norm=1e-6, ema_decay=0.9999)  # fmt: skip
    assert (o.precision, o.scheduler_interval, o.ema_decay) == ("bf16", "step", 0.9999)
    assert LoopOptions(precision="fp16").precision == "fp16"


def test_a_device_string_is_checked_when_the_options_are_made():
    assert LoopOptions(device="cpu").device == "cpu"
    assert LoopOptions(device=torch.device("cpu")).device == torch.device("cpu")
    with pytest.raises(KDError, match=r"device: 'foo' is not a device; use cpu, cuda or cuda:N"):
        LoopOptions(device="foo")
    with pytest.raises(KDError, match="kdkit runs on cpu or cuda, got 'meta'"):
        LoopOptions(device="meta")
    if torch.cuda.is_available():
        with pytest.raises(KDError, match=r"CUDA device\(s\) are visible"):
            LoopOptions(device="cuda:99")
    else:
        with pytest.raises(KDError, match="no CUDA device is visible here; use device cpu"):
            LoopOptions(device="cuda")


def test_loop_options_reads_a_train_section_and_takes_overrides():
    train = TrainConfig(epochs=3, precision="bf16", grad_accum=2, max_grad_norm=1.0,
                        scheduler=SchedulerConfig(name="StepLR", interval="step"),
                        checkpoint_every=5, progress=False, device="cpu")  # fmt: skip
    o = loop_options(train, epochs=7)
    assert (o.epochs, o.precision, o.grad_accum, o.max_grad_norm) == (7, "bf16", 2, 1.0)
    assert (o.scheduler_interval, o.checkpoint_every, o.progress, o.device) == (
        "step",
        5,
        False,
        "cpu",
    )
    plateau = SchedulerConfig(name="ReduceLROnPlateau", interval="step")
    assert loop_options(TrainConfig(scheduler=plateau)).scheduler_interval == "epoch"
