"""``make_teacher(module, backend="auto")`` without an example: the backend is chosen on the run's
first real batch, as ``kdkit train`` chooses it.

Timing candidates on random inputs of a guessed batch size picked ONNX fp32 over the int8
teacher for a Python API user where ``kdkit train`` picked int8 (issue 39): the batch size,
the views and the thread budget decide which backend wins. So this teacher waits: the
:class:`~kdkit.Trainer` calls :meth:`AutoTeacher.settle` with its first training input (the
run's batch size, views, device and autocast) before the first step, and a bare
``calibration=`` dataset is completed with the run's input pipeline (its views and
normalisation), so the int8 candidate is calibrated on what the teacher will see. Outside a
Trainer the first call settles it. The choice is recorded in the Trainer's checkpoint and
rebuilt on resume, like ``choices.json`` for ``kdkit train``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kdkit._fingerprint import module_fingerprint
from kdkit.teachers import autotune
from kdkit.teachers.autotune import Choice
from kdkit.teachers.base import Teacher, TeacherOutput
from kdkit.teachers.calibration import Calibration

__all__ = ["AutoTeacher"]

log = logging.getLogger(__name__)


class AutoTeacher(Teacher):
    """A teacher whose backend is chosen on the first batch it is given (:meth:`settle`).

    Args:
        module: the teacher model.
        precision: ``fp32`` / ``bf16`` / ``fp16`` of the torch candidates (ONNX runs fp32 only).
        calibration: training images (dataset, loader or tensor) or a
            :class:`~kdkit.teachers.calibration.Calibration`: makes the int8 teacher a
            candidate. Bare data is drawn through the Trainer's views and normalisation.
        gate: the int8 fidelity gate (default: 99% top-1 agreement with fp32).
    """

    def __init__(
        self, module: nn.Module, *, precision: str = "fp32", calibration: Any = None, gate=None
    ) -> None:
        super().__init__()
        self.module, self.precision = module, precision
        self.calibration, self.gate = calibration, gate
        self.chosen: Teacher | None = None
        self.choice: Choice | None = None
        self.device: torch.device | None = None

    def request_features(self, names: Sequence[str]) -> None:
        self.feature_names = tuple(n for n in names if n != "")  # only torch backends give them
        if self.chosen is not None:
            self.chosen.request_features(names)

    def to(self, device: torch.device | str) -> AutoTeacher:
        self.device = torch.device(device)
        if self.chosen is not None:
            self.chosen.to(self.device)
        return self

    def settle(
        self,
        example: torch.Tensor,
        *,
        inputs: Any = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        recorded: dict[str, Any] | None = None,
    ) -> Choice:
        """Choose the backend on ``example`` (a batch as the teacher sees it), once; with
        ``recorded`` (a resumed run's record) build that one instead. ``inputs``: the run's
        input pipeline, whose views and normalisation a bare calibration set is drawn with."""
        if self.chosen is not None and (recorded is None or recorded["value"] == self.choice.value):
            return self.choice
        calibration = self._calibration(inputs)
        if recorded is not None:
            self.choice = Choice.recorded("teacher.backend", recorded)
            teacher = autotune.build_backend(
                self.choice.value, self.module, input_shape=tuple(example.shape[1:]),
                precision=self.precision, calibration=calibration, gate=self.gate,
                batch_size=int(example.shape[0]),
            ).to(example.device)  # fmt: skip
            log.info("%s", self.choice.line())
        else:
            teacher, self.choice = autotune.choose_backend(
                self.module, example, precision=self.precision,
                features=bool(self.feature_names), calibration=calibration, gate=self.gate,
                autocast=autocast,
            )  # fmt: skip
        if self.feature_names:
            teacher.request_features(self.feature_names)
        if self.chosen is not None and hasattr(self.chosen, "close"):
            self.chosen.close()
        self.chosen = teacher
        return self.choice

    def _calibration(self, inputs: Any) -> Any:
        """Bare calibration data drawn as the run draws its batches (views, mean, std)."""
        cal = self.calibration
        if cal is None or inputs is None or isinstance(cal, (Calibration, dict)):
            return cal
        views, mean, std = (getattr(inputs, k, None) for k in ("sampler", "mean", "std"))
        return Calibration(cal, views=views, mean=mean, std=std)

    def forward(self, x, *, index=None, view=None) -> TeacherOutput:
        if self.chosen is None:  # outside a Trainer: the first call's batch decides
            self.settle(x)
        return self.chosen.forward(x, index=index, view=view)

    def fingerprint(self) -> str:
        if self.chosen is not None:
            return self.chosen.fingerprint()
        return module_fingerprint(self.module)  # the torch teacher's, until it is chosen

    def close(self) -> None:
        if self.chosen is not None and hasattr(self.chosen, "close"):
            self.chosen.close()

    def __repr__(self) -> str:
        return f"AutoTeacher({type(self.module).__name__}, chosen={self.chosen!r})"
