"""Hostile inputs to ``kdkit export`` and ``export_onnx`` (issue 10): bad checkpoints, bad
options, and outputs that must not destroy a good file. Rows and verdicts: tests/_hostile/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _hostile import (
    SIZE,
    Case,
    cli_rows,
    flipped,
    judge_row,
    params,
    pwned,
    resaved,
    student,
    work_copy,
)
from torch import nn

import kdkit

pytestmark = pytest.mark.usefixtures("one_thread")


def _export(fx, *extra, ckpt=None):
    out = fx.root / "work" / "out.onnx"
    return ["export", str(ckpt or fx.ckpt), "--onnx", str(out), *extra]


def _keeps_good_onnx(fx) -> str | None:
    good = fx.root / "work" / "good.onnx"
    return None if good.read_bytes() == fx.onnx.read_bytes() else "loss"


def _export_over_good(fx, *extra):
    good = work_copy(fx, fx.onnx, "good.onnx")
    return ["export", str(fx.ckpt), "--onnx", str(good), *extra]


def _edited_ckpt(fx, name: str, **changes) -> Path:
    state = torch.load(fx.ckpt, weights_only=True)
    state.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        state.pop(key)
    dst = fx.root / "work" / name
    dst.parent.mkdir(exist_ok=True)
    torch.save(state, dst)
    return dst


def _sealed_ckpt(fx, name: str, **changes) -> Path:
    """Raw checkpoint contents with a valid checksum (where this kdkit has checksums)."""
    state = torch.load(fx.ckpt, weights_only=True)
    state.update(changes)
    try:
        from kdkit.load import checksum

        state["checksum"] = checksum(state)
    except ImportError:
        pass
    dst = fx.root / "work" / name
    dst.parent.mkdir(exist_ok=True)
    torch.save(state, dst)
    return dst


def _truncated_ckpt(fx) -> Path:
    dst = fx.root / "work" / "torn.pt"
    dst.parent.mkdir(exist_ok=True)
    data = fx.ckpt.read_bytes()
    dst.write_bytes(data[: len(data) // 3])
    return dst


def _random_pt(fx) -> Path:
    dst = fx.root / "work" / "random.pt"
    dst.parent.mkdir(exist_ok=True)
    dst.write_bytes(os.urandom(2048))
    return dst


def _empty_dir(fx) -> Path:
    path = fx.root / "work" / "empty_run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _export_keeps_good_file(fx):
    from kdkit.export import export_onnx

    good = work_copy(fx, fx.onnx, "good_lib.onnx")
    try:
        export_onnx(student(), good, (1, SIZE, SIZE), opset=5)
    finally:
        if good.read_bytes() != fx.onnx.read_bytes():
            raise AssertionError("the good .onnx was replaced by a refused export")


def _export_drifting_keeps_good_file(fx):
    """Verification fails (the model is not deterministic): the old file stays."""
    from kdkit.export import export_onnx

    class Noisy(nn.Module):
        def forward(self, x):
            return x.flatten(1) + torch.randn_like(x.flatten(1))

    good = work_copy(fx, fx.onnx, "good_drift.onnx")
    try:
        export_onnx(Noisy(), good, (1, 4, 4))
    finally:
        if good.read_bytes() != fx.onnx.read_bytes():
            raise AssertionError("the good .onnx was replaced by an unverified export")


CLI: list[Case] = cli_rows([
    # the checkpoint
    Case("export-missing-checkpoint", lambda fx: _export(fx, ckpt=fx.root / "nope.pt"), "no checkpoint"),
    Case("export-directory-without-checkpoint", lambda fx: _export(fx, ckpt=_empty_dir(fx)), "no checkpoint|best.pt"),
    Case("export-markdown-as-checkpoint", lambda fx: _export(fx, ckpt=fx.markdown), "not a readable checkpoint"),
    Case("export-truncated-checkpoint", lambda fx: _export(fx, ckpt=_truncated_ckpt(fx)), "not a readable checkpoint"),
    Case("export-random-bytes-checkpoint", lambda fx: _export(fx, ckpt=_random_pt(fx)), "not a readable checkpoint"),
    Case("export-plain-state-dict", lambda fx: _export(fx, ckpt=fx.weights_only), "not a kdkit checkpoint"),
    Case("export-flipped-exponent-bits", lambda fx: _export(fx, ckpt=flipped(fx)), "fails its checksum"),
    Case("export-pwned-legacy-factory", lambda fx: _export(fx, ckpt=fx.pwned), "would import 'subprocess'.*trust", post=pwned),
    Case("export-pwned-python-spec", lambda fx: _export(fx, ckpt=fx.pwned_python), "would import 'subprocess'.*trust", post=pwned),
    Case("export-newer-format-version", lambda fx: _export(fx, ckpt=_edited_ckpt(fx, "v99.pt", version=99)), "newer kdkit"),
    Case("export-unknown-role", lambda fx: _export(fx, ckpt=_sealed_ckpt(fx, "coach.pt", role="coach")), "role 'coach'"),
    Case("export-unknown-kdkit-model", lambda fx: _export(fx, ckpt=resaved(fx, "unk.pt", student_spec={"model": "kdkit:fmnist_studnet"})), "did you mean.*fmnist_student"),
    Case("export-spec-bad-kwargs", lambda fx: _export(fx, ckpt=resaved(fx, "kw.pt", student_spec={"model": "kdkit:fmnist_student", "kwargs": {"bogus": 1}})), "kwargs"),
    Case("export-spec-unknown-prefix", lambda fx: _export(fx, ckpt=resaved(fx, "pre.pt", student_spec={"model": "hub:resnet"})), "unknown model prefix"),
    Case("export-weights-of-other-model", lambda fx: _export(fx, ckpt=resaved(fx, "other.pt", student_spec={"model": "kdkit:fmnist_teacher"})), "do not fit"),
    Case("export-no-spec", lambda fx: _export(fx, ckpt=resaved(fx, "nospec.pt", student_spec=None)), "student_spec"),
    # the options and the output
    Case("export-opset-5-keeps-good-file", lambda fx: _export_over_good(fx, "--opset", "5"), "opset", post=_keeps_good_onnx),
    Case("export-opset-99", lambda fx: _export(fx, "--opset", "99"), "opset"),
    Case("export-opset-not-a-number", lambda fx: _export(fx, "--opset", "seventeen"), "--opset"),
    Case("export-onnx-under-a-file", lambda fx: ["export", fx.ckpt, "--onnx", fx.a_file / "x.onnx"], "is a file"),
    Case("export-onnx-in-proc", lambda fx: ["export", fx.ckpt, "--onnx", "/proc/kdkit-nope/x.onnx"], "cannot write"),
    Case("export-onnx-is-directory", lambda fx: ["export", fx.ckpt, "--onnx", fx.root], "directory"),
    Case("export-input-shape-zero", lambda fx: _export(fx, "--input-shape", "0", "28", "28"), "input-shape|input_shape"),
    Case("export-input-shape-wrong-channels", lambda fx: _export(fx, "--input-shape", "3", "28", "28"), "export.*failed|does not run"),
    Case("export-atol-negative", lambda fx: _export(fx, "--atol", "-1"), "--atol|atol"),
    Case("export-atol-nan", lambda fx: _export(fx, "--atol", "nan"), "--atol|atol"),
    Case("export-missing-onnx-option", lambda fx: ["export", fx.ckpt], "--onnx"),
    Case("export-teacher-role-checkpoint", lambda fx: _export(fx, ckpt=fx.teacher_ckpt), expect="correct"),
])  # fmt: skip

LIB: list[Case] = [
    Case("export-opset-5-keeps-good-file-lib", _export_keeps_good_file, "opset"),
    Case("export-unfaithful-keeps-good-file", _export_drifting_keeps_good_file, "differs from PyTorch"),
    Case("export-under-a-file", lambda fx: kdkit.export_onnx(student(), fx.a_file / "m.onnx", (1, 28, 28)), "is a file"),
    Case("export-atol-nan-lib", lambda fx: kdkit.export_onnx(student(), fx.root / "work" / "n.onnx", (1, 28, 28), atol=float("nan")), "atol"),
]  # fmt: skip

CASES = CLI + LIB


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_export(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
