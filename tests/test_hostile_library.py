"""Hostile library calls (issue 23): the edges of losses, labels, batches and weights files.

Rows and verdicts as in ``tests/test_hostile.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from _hostile_rows import Case, judge_row, params, write_tally
from torch import nn

import kdkit
from kdkit.errors import KDError

pytestmark = pytest.mark.usefixtures("one_thread")
VERDICTS: dict[str, str] = {}


@pytest.fixture(scope="module")
def fx(tmp_path_factory, one_thread):
    yield tmp_path_factory.mktemp("hostile_library")
    write_tally(VERDICTS)


def _kl_at(t: float) -> bool:
    """Against a float64 reference (close teacher and student, where float32 rounding times
    t**2 used to swamp the value); never negative, gradients finite."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(32, 10, generator=g, dtype=torch.float64) * 5
    teacher = s + torch.randn(32, 10, generator=g, dtype=torch.float64) * 0.5
    lp, lq = F.log_softmax(teacher / min(t, 1e4), 1), F.log_softmax(s / min(t, 1e4), 1)
    ref = float((lp.exp() * (lp - lq)).sum(1).mean()) * min(t, 1e4) ** 2
    student = s.float().requires_grad_()
    loss = kdkit.SoftTargetKL(t)(student, teacher.float())
    loss.backward()
    ok = loss.item() >= 0 and bool(torch.isfinite(student.grad).all())
    return ok and abs(loss.item() - ref) <= 1e-3 * abs(ref) + 1e-9


def _kl_identical_high_t() -> bool:
    s = torch.randn(64, 100) * 10
    return all(kdkit.SoftTargetKL(t)(s, s + 1e-4).item() >= 0 for t in (1e2, 1e3, 1e5, 1e7))


def _step(labels=None, x=None, student=None):
    torch.manual_seed(0)
    net = student or nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    d = kdkit.Distiller(net, None)
    x = torch.randn(4, 1, 4, 4) if x is None else x
    labels = torch.tensor([0, 1, 2, 1]) if labels is None else labels
    return d.step(x, labels)


def _labels_of(dtype):
    def run(fx) -> bool:
        ref = _step(torch.tensor([0, 1, 2, 1])).loss
        return torch.allclose(_step(torch.tensor([0, 1, 2, 1], dtype=dtype)).loss, ref)

    return run


def _tokens_pass(fx) -> bool:
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    return bool(torch.isfinite(_step(x=torch.randint(0, 10, (4, 3)), student=net).loss))


def _pickle_weights(fx) -> None:
    from kdkit.load import load_weights

    path = fx / "evil_weights.pt"
    _pickle_weights_file(path)
    try:
        load_weights(nn.Linear(2, 2), path)
    except KDError as err:
        if "weights_only=False" in str(err):
            raise AssertionError(f"passes on torch's advice: {err}") from None
        raise


def _pickle_teacher_weights_cli(fx):
    """The same file as a config's teacher.weights (the CLI path)."""
    from _hostile_rows import image_tree, run_config, write_yaml

    tree = image_tree(fx / "images")
    path = fx / "evil_weights.pt"
    _pickle_weights_file(path)
    return ["train", write_yaml(fx / "evil.yaml", run_config(tree, path)), "--run-dir",
            fx / "evil_run"]  # fmt: skip


def _pickle_weights_file(path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"weight": Evil()}, path)


CASES: list[Case] = [
    Case("kl-temperature-1e-3", lambda fx: _kl_at(1e-3), expect="correct"),
    Case("kl-temperature-1e3", lambda fx: _kl_at(1e3), expect="correct"),
    Case("kl-temperature-1e5", lambda fx: _kl_at(1e5), expect="correct"),
    Case("kl-near-identical-high-t-never-negative", lambda fx: _kl_identical_high_t(), expect="correct"),
    Case("labels-int32-accepted", _labels_of(torch.int32), expect="correct"),
    Case("labels-int16-accepted", _labels_of(torch.int16), expect="correct"),
    Case("labels-uint8-accepted", _labels_of(torch.uint8), expect="correct"),
    Case("empty-batch-refused", lambda fx: _step(torch.zeros(0, dtype=torch.long), torch.randn(0, 1, 4, 4)), "empty batch"),
    Case("uint8-images-to-step-refused", lambda fx: _step(x=torch.zeros(4, 1, 4, 4, dtype=torch.uint8)), "uint8 images.*to_float"),
    Case("int16-images-to-step-refused", lambda fx: _step(x=torch.zeros(4, 1, 4, 4, dtype=torch.int16)), "int16 images.*to_float"),
    Case("int32-images-to-float-refused", lambda fx: kdkit.data.to_float(torch.zeros(1, 1, 2, 2, dtype=torch.int32), (0.5,), (0.2,)), "uint8 or floating"),
    Case("int64-token-ids-to-step-pass", _tokens_pass, expect="correct"),
    Case("pickle-as-weights-refused", _pickle_weights, "pickled Python objects.*weights_only=True"),
    Case("pickle-as-teacher-weights-cli", _pickle_teacher_weights_cli, "pickled Python objects", cli=True),
]  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_library(case: Case, fx, capsys):
    judge_row(case, fx, capsys, VERDICTS)
