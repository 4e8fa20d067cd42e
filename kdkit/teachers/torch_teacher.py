"""Eager / compiled PyTorch teacher: the default backend for an ``nn.Module``."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from kdkit._compile import compile_static
from kdkit._fingerprint import module_fingerprint
from kdkit._precision import FLOAT_DTYPES
from kdkit.capture import Capture, unwrap
from kdkit.teachers.base import Teacher, TeacherOutput

__all__ = ["TorchTeacher", "PRECISIONS", "module_fingerprint"]

PRECISIONS = FLOAT_DTYPES  # the one table, kdkit._precision


class TorchTeacher(Teacher):
    """A frozen ``nn.Module`` run in eval mode under ``no_grad``.

    ``precision`` casts the weights once (not per step, as autocast would) and the input per
    batch; outputs come back as float32 so losses see one dtype. The teacher runs in the
    precision it was given whatever the caller's autocast: autocast is off around an fp32
    teacher (the Trainer's bf16 autocast would otherwise run it in bf16 without saying so)
    and on, in the teacher's dtype, around a bf16 / fp16 one. A compiled teacher therefore
    sees one autocast state in a dry run and in training (Dynamo guards on it), and its batch
    dimension is static (:func:`kdkit._compile.compile_static`). ``channels_last`` and
    ``compile`` are the two cheap speed-ups on GPUs. ``input_transform`` converts the
    student's batch when the teacher expects another normalisation or resolution, so both
    models still see the same augmented image.

    The module is deep-copied only when its dtype must change, so the user's own teacher is
    never cast behind their back.
    """

    def __init__(
        self,
        model: nn.Module,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            from kdkit.errors import KDError

            raise KDError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        module = unwrap(model)
        if self.dtype != torch.float32:
            module = copy.deepcopy(module).to(self.dtype)
        module.eval().requires_grad_(False)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.channels_last = channels_last
        self.input_transform = input_transform
        self._run: Callable[[torch.Tensor], object] = compile_static(module) if compile else module
        self._capture: Capture | None = None
        try:
            self.device = next(module.parameters()).device
        except StopIteration:
            self.device = None

    def request_features(self, names: Sequence[str]) -> None:
        if self._capture is not None:
            self._capture.remove()
        self.feature_names = tuple(n for n in dict.fromkeys(names) if n != "")
        self._capture = Capture(self.module, self.feature_names, role="teacher")

    def to(self, device: torch.device | str) -> TorchTeacher:
        self.module.to(device)
        self.device = torch.device(device)
        return self

    def eval(self) -> TorchTeacher:
        """Teachers are always in eval mode; present so module-like code keeps working."""
        return self

    def forward(self, x, *, index=None, view=None) -> TeacherOutput:
        self.module.eval()  # guard against a user flipping it to train() in between
        if self.input_transform is not None:
            x = self.input_transform(x)
        if x.is_floating_point():
            x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        cap = self._capture
        if cap is not None:
            cap.clear()
        with self._autocast(x.device.type):
            out = self._run(x)
        logits = _to_fp32(out)
        feats = {n: _to_fp32(cap[n]) for n in self.feature_names} if cap is not None else {}
        return TeacherOutput(logits=logits, features=feats)

    def _autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """Autocast off for an fp32 teacher, on in its dtype for a half-precision one."""
        if not torch.amp.is_autocast_available(device_type):
            return contextlib.nullcontext()
        if self.dtype == torch.float32:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self.dtype)

    def fingerprint(self) -> str:
        return module_fingerprint(self.module)

    def close(self) -> None:
        """Remove the feature hooks from the teacher module."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None


def _to_fp32(t: object) -> object:
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32:
        return t.float()
    return t
