"""Several teachers as one: the weighted mean of their predictions.

Ensembles of teachers give better soft targets than any one member (Hinton et al. 2015,
arXiv:1503.02531, section 2; You et al. 2017, "Learning from Multiple Teacher Networks").
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.teachers.base import Teacher, TeacherOutput
from kdkit.teachers.torch_teacher import TorchTeacher

__all__ = ["EnsembleTeacher", "COMBINES"]

COMBINES = ("mean_probs", "mean_logits")


def _member(i: int, obj: Any) -> Teacher:
    if isinstance(obj, Teacher):
        return obj
    if isinstance(obj, nn.Module):
        return TorchTeacher(obj)
    raise KDError(
        f"ensemble member {i} is a {type(obj).__name__}; EnsembleTeacher takes Teachers or "
        "nn.Modules. For files use kdkit.make_teacher([...]), which opens each one first"
    )


class EnsembleTeacher(Teacher):
    """Combine teachers into one.

    Members are :class:`Teacher` objects or ``nn.Module`` s (run as :class:`TorchTeacher`);
    for files (``.onnx``, checkpoints) build the ensemble with ``kdkit.make_teacher([...])``,
    which makes each member first.

    ``weights`` (default: equal) are normalised to sum to 1. ``combine``:

    - ``"mean_probs"`` (default) returns ``log(sum_i w_i * softmax(z_i))``, the log of the
      weighted mean probability, computed stably with logsumexp in float32. These are valid
      logits: ``softmax`` of them gives back exactly the mean probabilities. Note that a
      distillation temperature T is then applied to the *mean*: ``softmax(out / T)`` is not
      the mean of the members' ``softmax(z_i / T)``.
    - ``"mean_logits"`` returns ``sum_i w_i * z_i``.

    Output shape ``(N, classes)``, float32. Members must agree on the class count.
    """

    def __init__(
        self,
        teachers: Sequence[Any],
        weights: Sequence[float] | None = None,
        combine: str = "mean_probs",
    ) -> None:
        super().__init__()
        if isinstance(teachers, (str, bytes)) or not isinstance(teachers, Sequence):
            raise KDError("EnsembleTeacher takes a list of teachers")
        if len(teachers) == 0:
            raise KDError("EnsembleTeacher needs at least one teacher")
        if combine not in COMBINES:
            raise KDError(f"combine must be one of {list(COMBINES)}, got {combine!r}")
        if weights is None:
            weights = [1.0] * len(teachers)
        weights = [float(w) for w in weights]
        if len(weights) != len(teachers):
            raise KDError(f"{len(weights)} weights for {len(teachers)} teachers; give one each")
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise KDError(f"weights must be finite, >= 0 and not all zero, got {weights}")
        total = sum(weights)
        self.weights = tuple(w / total for w in weights)
        self.combine = combine
        self.members = [_member(i, t) for i, t in enumerate(teachers)]

    def to(self, device: torch.device | str) -> EnsembleTeacher:
        self.members = [m.to(device) for m in self.members]
        self.device = torch.device(device)
        return self

    def forward(self, x, *, index=None, view=None) -> TeacherOutput:
        outs = [m(x, index=index, view=view).logits for m in self.members]
        for i, z in enumerate(outs):
            if not isinstance(z, torch.Tensor):
                raise KDError(
                    f"ensemble member {i} ({type(self.members[i]).__name__}) returned "
                    f"{type(z).__name__}; an ensemble needs full logits (no top-k caches)"
                )
        shapes = {tuple(z.shape) for z in outs}
        if len(shapes) != 1:
            raise KDError(f"ensemble members disagree on the output shape: {sorted(shapes)}")
        z = torch.stack([o.to(outs[0].device, torch.float32) for o in outs])  # (T, N, C)
        w = torch.tensor(self.weights, dtype=torch.float32, device=z.device)
        w = w.view(-1, *([1] * (z.dim() - 1)))
        if self.combine == "mean_logits":
            return TeacherOutput(logits=(w * z).sum(0))
        # log sum_i w_i softmax(z_i) = logsumexp_i(log w_i + log_softmax(z_i)); w_i = 0 -> -inf
        logp = torch.log_softmax(z, dim=-1) + torch.log(w)
        return TeacherOutput(logits=torch.logsumexp(logp, dim=0))

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"ensemble:{self.combine}:{self.weights}".encode())
        for m in self.members:
            h.update(m.fingerprint().encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.members)
        return f"EnsembleTeacher([{names}], weights={self.weights}, combine={self.combine!r})"
