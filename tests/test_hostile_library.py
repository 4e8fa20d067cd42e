"""Hostile library calls (issues 10 and 23): the Distiller's teacher, labels and batches, the
losses' temperatures, masked classes and top-k indices, and weights files. Rows and verdicts:
tests/_hostile/.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from _hostile import Case, judge_row, net, params, run_config, write_yaml
from torch import nn

import kdkit
from kdkit.errors import KDError

pytestmark = pytest.mark.usefixtures("one_thread")


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

    path = fx.root / "evil_weights.pt"
    _pickle_weights_file(path)
    try:
        load_weights(nn.Linear(2, 2), path)
    except KDError as err:
        if "weights_only=False" in str(err):
            raise AssertionError(f"passes on torch's advice: {err}") from None
        raise


def _pickle_teacher_weights_cli(fx):
    """The same file as a config's teacher.weights (the CLI path)."""
    path = fx.root / "evil_weights.pt"
    _pickle_weights_file(path)
    return ["train", write_yaml(fx.root / "evil.yaml", run_config(fx.tree, path)), "--run-dir",
            fx.root / "evil_run"]  # fmt: skip


def _pickle_weights_file(path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"weight": Evil()}, path)


# -- the Distiller's boundaries and the losses' edges (from issue 10) ---------------------------
def _student_as_own_teacher(fx):
    s = net()
    kdkit.Distiller(s, s, kdkit.SoftTargetKL())
    # accepted: report whether the user's student was frozen in place (silent damage)
    return all(p.requires_grad for p in s.parameters()) and s.training and None


def _teacher_shares_parameters(fx):
    s = net()
    kdkit.Distiller(s, nn.Sequential(s, nn.Identity()), kdkit.SoftTargetKL())


def _kd_step(labels, teacher=None, x=None):
    d = kdkit.Distiller(net(), teacher if teacher is not None else net(seed=1),
                        kdkit.SoftTargetKL(2.0))  # fmt: skip
    x = x if x is not None else torch.randn(4, 1, 8, 8)
    return d.step(x, labels)


def _unlabeled_rows_train(fx):
    out = _kd_step(torch.full((4,), -1))
    return "student" not in out.components and torch.isfinite(out.loss).item()


def _teacher_other_dtype(fx):
    _kd_step(torch.zeros(4, dtype=torch.long), teacher=net(seed=1).double())


def _teacher_other_device(fx):
    _kd_step(torch.zeros(4, dtype=torch.long), teacher=net(seed=1).to("meta"))


def _kl_masked_class(fx):
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5)
    t[:, 2] = float("-inf")
    loss = kdkit.SoftTargetKL(temperature=2.0)(s, t)
    loss.backward()
    p = torch.softmax(t[:, [0, 1, 3, 4]] / 2, 1)
    log_q = torch.log_softmax(s.detach() / 2, 1)[:, [0, 1, 3, 4]]
    ref = (p * (p.log() - log_q)).sum(1).mean() * 4
    return torch.isfinite(s.grad).all().item() and math.isclose(
        loss.item(), ref.item(), rel_tol=1e-5
    )


def _dkd_masked_class(fx):
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5)
    t[:, 4] = float("-inf")
    loss = kdkit.DKD(temperature=2.0)(s, t, labels=torch.tensor([0, 1, -1]))
    loss.backward()
    return bool(torch.isfinite(loss).item() and torch.isfinite(s.grad).all().item())


def _topk_negative(fx):
    from kdkit.losses import topk_to_logits

    topk_to_logits(torch.randn(2, 3), torch.tensor([[0, -1, 2], [1, 2, 3]]), 5)


def _hardlabel_negative(fx):
    from kdkit.teachers.base import TopK

    kdkit.HardLabel()(torch.randn(2, 5), TopK(torch.tensor([[3.0, 1.0]] * 2),
                                              torch.tensor([[-2, 1]] * 2)))  # fmt: skip


def _kl_topk_negative(fx):
    from kdkit.teachers.base import TopK

    t = TopK(torch.randn(2, 3), torch.tensor([[0, -1, 2], [1, 2, 3]]))
    kdkit.SoftTargetKL(2.0)(torch.randn(2, 5), t)


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
    # the Distiller's boundaries
    Case("student-as-its-own-teacher", _student_as_own_teacher, "teacher is the student"),
    Case("teacher-shares-student-parameters", _teacher_shares_parameters, "shares its parameters"),
    Case("teacher-other-dtype", _teacher_other_dtype, "teacher cannot run on this batch"),
    Case("teacher-other-device", _teacher_other_device, "teacher cannot run on this batch"),
    Case("float-labels", lambda fx: _kd_step(torch.tensor([0.0, 1.0, 2.0, 1.0])), "integer class ids"),
    Case("label-minus-five", lambda fx: _kd_step(torch.tensor([0, -5, 1, 2])), r"-1 for unlabeled.*\[-5"),
    Case("label-past-the-classes", lambda fx: _kd_step(torch.tensor([0, 1, 4, 2])), r"\[0, 4\)"),
    Case("bool-labels", lambda fx: _kd_step(torch.tensor([True, False, True, False])), "integer class ids"),
    Case("all-unlabeled-rows", _unlabeled_rows_train, expect="correct"),
    # the losses
    Case("temperature-nan", lambda fx: kdkit.SoftTargetKL(temperature=float("nan")), "temperature"),
    Case("temperature-inf", lambda fx: kdkit.SoftTargetKL(temperature=float("inf")), "temperature"),
    Case("temperature-zero", lambda fx: kdkit.SoftTargetKL(temperature=0.0), "temperature"),
    Case("temperature-negative", lambda fx: kdkit.SoftTargetKL(temperature=-4.0), "temperature"),
    Case("temperature-string", lambda fx: kdkit.SoftTargetKL(temperature="4"), "temperature"),
    Case("dkd-temperature-nan", lambda fx: kdkit.DKD(temperature=float("nan")), "temperature"),
    Case("dkd-beta-negative", lambda fx: kdkit.DKD(beta=-1.0), "beta"),
    Case("kl-teacher-minus-inf-logit", _kl_masked_class, expect="correct"),
    Case("dkd-teacher-minus-inf-logit", _dkd_masked_class, expect="correct"),
    Case("topk-negative-index", _topk_negative, "indices must be >= 0"),
    Case("hardlabel-topk-negative-index", _hardlabel_negative, "class"),
    Case("kl-topk-negative-index", _kl_topk_negative, "indices must be >= 0"),
]  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_library(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)


def test_trainer_keeps_user_student_trainable_after_refusal():
    s = net()
    with pytest.raises(KDError):
        kdkit.Distiller(s, s)
    assert all(p.requires_grad for p in s.parameters()) and s.training
    kdkit.Distiller(s, copy.deepcopy(s), kdkit.SoftTargetKL())  # the fix the message suggests
    assert all(p.requires_grad for p in s.parameters())
