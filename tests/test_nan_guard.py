"""NanGuard (kdkit/train/nan_guard.py): the first non-finite step, named, and never saved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit import Distiller, KDError, Trainer
from kdkit.train.nan_guard import NanGuard

NAN, INF = float("nan"), float("inf")


def _record(guard: NanGuard, step: int, epoch: int = 0, **components: float) -> None:
    values = {k: torch.tensor(v) for k, v in components.items()}
    guard.record(values["total"], values, step, epoch)


def test_reports_the_first_non_finite_step_and_its_component():
    guard = NanGuard(every=10)
    for step in range(3):
        _record(guard, step, output=1.0, student=2.0, total=3.0)
    _record(guard, 3, epoch=1, output=NAN, student=2.0, total=NAN)  # the first bad step
    _record(guard, 4, epoch=1, output=1.0, student=INF, total=INF)  # a later one
    with pytest.raises(KDError) as err:
        guard.check()
    msg = str(err.value)
    assert msg.startswith("non-finite loss at epoch 1 step 3: output = nan (components ")
    assert "'student'" not in msg  # step 4's component is not the cause
    assert "(seen 1 steps later, nan_check_every=10)" in msg
    assert "lower the learning rate or check the inputs" in msg


def test_total_is_named_when_no_component_is_non_finite_alone():
    guard = NanGuard(every=1)
    with pytest.raises(KDError, match=r"at epoch 0 step 7: total = inf \(components"):
        _record(guard, 7, output=1.0, total=INF)


def test_the_flag_is_read_every_n_steps_only():
    guard = NanGuard(every=3)
    _record(guard, 0, total=NAN)
    _record(guard, 1, total=1.0)  # no host read yet: no error
    with pytest.raises(KDError, match="step 0: total = nan .*seen 2 steps later"):
        _record(guard, 2, total=1.0)  # the third record reads it


def test_finite_steps_and_nothing_recorded_never_raise():
    guard = NanGuard(every=2)
    guard.check()  # nothing recorded
    for step in range(5):
        _record(guard, step, output=0.5, total=0.5)
    guard.check()
    with pytest.raises(KDError, match="nan_check_every must be >= 1, got 0"):
        NanGuard(every=0)


def test_names_the_last_good_checkpoint_when_there_is_one(tmp_path):
    last = tmp_path / "last.pt"
    guard = NanGuard(every=1, last_checkpoint=last)
    with pytest.raises(KDError) as err:
        _record(guard, 0, total=NAN)
    assert "last good checkpoint" not in str(err.value)  # none written yet
    last.write_bytes(b"a good state")
    guard = NanGuard(every=1, last_checkpoint=last)
    with pytest.raises(KDError, match=f"the last good checkpoint is {last}$"):
        _record(guard, 0, total=NAN)


def test_a_nan_state_is_never_saved(tmp_path):
    """With the flag read rarely (every 100 steps), ``save`` reads it first: the good
    ``last.pt`` stays as it was and the error names it."""
    torch.manual_seed(0)
    task = Distiller(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), None)
    batches = [(torch.rand(2, 1, 2, 2), torch.tensor([0, 1])) for _ in range(2)]
    tr = Trainer(task, batches, checkpoint_dir=tmp_path, nan_check_every=100, device="cpu",
                 progress=False)  # fmt: skip
    tr.train_step(batches[0])
    good = tr.save("last.pt")
    before = good.read_bytes()
    tr.train_step((torch.full((2, 1, 2, 2), NAN), torch.tensor([0, 1])))  # no error yet
    with pytest.raises(KDError, match=f"step 0: student = nan .*last good checkpoint is {good}"):
        tr.save("last.pt")
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left
