"""kdkit's older names and the Trainer's older flat keywords: they still work, and warn.

Every other test calls the current API, so that the suite can run with kdkit's deprecations
as errors (``-W error::kdkit.errors.KDDeprecationWarning``); this file is where the old
spellings are called on purpose, each inside ``pytest.warns``.
"""

from __future__ import annotations

import importlib
import re
import warnings

import pytest
import torch
from torch import nn

import kdkit
from kdkit import Distiller, KDError, Trainer
from kdkit.data import ArrayDataset, FastLoader, ViewSampler
from kdkit.data.pipeline import InputPipeline
from kdkit.errors import KDDeprecationWarning


@pytest.mark.parametrize("name", sorted(kdkit._MOVED))
def test_a_moved_name_warns_with_its_new_home_and_is_the_same_object(name):
    module, attr, new = kdkit._MOVED[name]
    with pytest.warns(KDDeprecationWarning, match=re.escape(f"kdkit.{name} moved: use {new}")):
        old = getattr(kdkit, name)
    assert old is getattr(importlib.import_module(module), attr)


def test_load_student_is_load_model_as_a_student(tmp_path):
    from kdkit.load import save_checkpoint

    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    spec = {"model": "python:torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 2}}
    path = save_checkpoint(tmp_path / "s.pt", {"student": net.state_dict(), "student_spec": spec})
    with pytest.warns(KDDeprecationWarning, match="load_model"):
        old, meta = kdkit.load_student(path, trust_code=True)
    new, _ = kdkit.load_model(path, role="student", trust_code=True)
    assert torch.equal(old.weight, new.weight) and torch.equal(old.weight, net.weight)
    assert meta["student_spec"] == spec


# -- the Trainer's flat keywords (kdkit.train.legacy.translate_older_keywords) ---------------
def _setup():
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(
        torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8, generator=g),
        torch.randint(0, 2, (8,), generator=g),
    )
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(32, 2))
    return Distiller(student, None), FastLoader(data, 4, seed=0)


def test_flat_pipeline_keywords_build_the_input_pipeline():
    task, loader = _setup()
    views = ViewSampler(size=4)
    with pytest.warns(KDDeprecationWarning, match="channels_last=, mean=, std=, views="):
        tr = Trainer(task, loader, views=views, mean=(0.5,), std=(0.25,), channels_last=True,
                     device="cpu", progress=False)  # fmt: skip
    assert isinstance(tr.inputs, InputPipeline) and tr.inputs.sampler is views
    assert (tr.inputs.mean, tr.inputs.std, tr.inputs.channels_last) == ((0.5,), (0.25,), True)
    assert task.student[0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(KDError, match=r"pass \['mean'\] to the InputPipeline"):
        with pytest.warns(KDDeprecationWarning, match="mean="):
            Trainer(task, loader, inputs=InputPipeline(), mean=(0.5,), device="cpu")


def test_flat_run_info_keywords_and_epoch_callbacks(tmp_path):
    task, loader = _setup()
    rows = []
    with pytest.warns(KDDeprecationWarning, match="epoch_callbacks=, input_shape=, run_config="):
        tr = Trainer(task, loader, epochs=2, checkpoint_dir=tmp_path, device="cpu",
                     progress=False, input_shape=(1, 4, 4), run_config={"name": "x"},
                     epoch_callbacks=[lambda t, row: rows.append(row["epoch"])])  # fmt: skip
    assert tr.run_info == {"input_shape": (1, 4, 4), "config": {"name": "x"}}
    tr.fit()
    assert rows == [0, 1]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["input_shape"] == [1, 4, 4] and state["config"] == {"name": "x"}


def test_seed_and_cache_check_keywords_still_work():
    """``seed=`` seeds torch inside the Trainer (after the models were built); the
    ``cache_check_*`` keywords reach the cache check, which refuses a live teacher beside a
    teacher that is not a cache."""
    task, loader = _setup()
    with pytest.warns(KDDeprecationWarning, match=r"Trainer\(seed=\.\.\.\)"):
        Trainer(task, loader, seed=5, device="cpu", progress=False)
    after_trainer = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_trainer, torch.rand(3))
    with (
        pytest.warns(KDDeprecationWarning),
        pytest.raises(KDError, match="cache_check_teacher= is for runs whose teacher is a"),
    ):
        Trainer(task, loader, cache_check_teacher=nn.Identity(), device="cpu", progress=False)


def test_loop_option_keywords_are_not_deprecated():
    task, loader = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KDDeprecationWarning)
        tr = Trainer(task, loader, epochs=3, precision="fp32", device="cpu", progress=False)
    assert tr.options.epochs == 3 and tr.options.progress is False


def test_an_unknown_keyword_is_refused_with_the_closest_name():
    task, loader = _setup()
    with pytest.raises(KDError, match="unexpected keyword 'epoch'; did you mean 'epochs'"):
        Trainer(task, loader, epoch=2)
