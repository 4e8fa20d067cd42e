"""Hostile model files given to the library (issue 10): ``load_model`` and ``make_teacher``
never run code a file names, read roles as written, and refuse damaged weights. (The CLI's
doors to the same files are in test_hostile_export / _bench / _cache / _cli.) Rows and
verdicts: tests/_hostile/.
"""

from __future__ import annotations

import os

import pytest
import torch
from _hostile import Case, flipped, judge_row, params, pwned, resaved, student
from torch import nn

import kdkit

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_weights(module: nn.Module) -> bool:
    ref = student().state_dict()
    return all(torch.equal(v, ref[k]) for k, v in module.state_dict().items())


def _pickled_code(fx):
    class Evil:
        def __reduce__(self):
            return (os.system, ("id > PWNED",))

    path = fx.root / "work" / "evil.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save({"format": "kdkit-checkpoint", "version": 1, "student": Evil()}, path)
    kdkit.load_model(path)


def _trust_code_loads(fx):
    path = resaved(fx, "trusted.pt", student={},
                   student_spec={"model": "python:torch.nn:Identity"})  # fmt: skip
    module, _ = kdkit.load_model(path, trust_code=True)
    return isinstance(module, nn.Identity)


def _teacher_list_with_pwned(fx):
    kdkit.make_teacher([fx.onnx, fx.pwned])


def _as_student(path):
    return kdkit.load_model(path, role="student")


CASES: list[Case] = [
    # 1. files never run code
    Case("teacher-from-pwned-checkpoint", lambda fx: kdkit.make_teacher(fx.pwned), "would import 'subprocess'.*trust_code", post=pwned),
    Case("teacher-from-pwned-python-spec", lambda fx: kdkit.make_teacher(fx.pwned_python), "would import 'subprocess'", post=pwned),
    Case("load-model-pwned", lambda fx: kdkit.load_model(fx.pwned), "would import 'subprocess'", post=pwned),
    Case("load-student-pwned", lambda fx: _as_student(fx.pwned), "would import 'subprocess'", post=pwned),
    Case("teacher-list-with-pwned-member", _teacher_list_with_pwned, "would import 'subprocess'", post=pwned),
    Case("pickled-code-in-checkpoint", _pickled_code, "not a readable checkpoint", post=pwned),
    Case("trust-code-allows-python-spec", _trust_code_loads, expect="correct"),
    # roles
    Case("load-student-on-teacher-file", lambda fx: _as_student(fx.teacher_ckpt), "holds a teacher"),
    Case("load-model-teacher-role", lambda fx: _same_weights(kdkit.load_model(fx.teacher_ckpt, role="teacher")[0]), expect="correct"),
    Case("load-model-any-role", lambda fx: kdkit.load_model(fx.teacher_ckpt)[1].get("role") == "teacher", expect="correct"),
    Case("load-model-unknown-role-arg", lambda fx: kdkit.load_model(fx.ckpt, role="coach"), "role"),
    Case("legacy-v1-checkpoint-loads", lambda fx: _same_weights(kdkit.load_model(fx.legacy_ckpt)[0]), expect="correct"),
    Case("teacher-from-teacher-checkpoint", lambda fx: kdkit.make_teacher(fx.teacher_ckpt) is not None, expect="correct"),
    # 3. damaged files
    Case("flipped-exponent-bits-refused", lambda fx: kdkit.load_model(flipped(fx)), "fails its checksum"),
]  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_checkpoints(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
