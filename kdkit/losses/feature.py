"""Feature-based losses: the student matches intermediate teacher activations.

Layouts: (N, C, H, W) maps (channels in dim 1), (N, D) vectors, (N, L, D) tokens (channels in
the last dim). Half-precision inputs are upcast to fp32 before any arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import KDError
from kdkit.losses._common import upcast

__all__ = [
    "FeatureMSE",
    "CosineEmbedding",
    "AttentionTransfer",
    "adapter_from_saved",
    "build_saved_adapters",
]

_ADAPTER_KINDS = ("auto", "conv1x1", "linear", None)


def _channels(shape: Sequence[int]) -> int:
    """Channel count of a (N, C, H, W), (N, D) or (N, L, D) shape."""
    return shape[-1] if len(shape) == 3 else shape[1]


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.dim() not in (2, 3, 4) or student.dim() != teacher.dim():
        raise KDError(
            f"{what} needs student and teacher features of the same layout, (N, C, H, W), "
            f"(N, D) or (N, L, D); got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise KDError(
            f"{what}: batch sizes differ, student {tuple(student.shape)} vs teacher "
            f"{tuple(teacher.shape)}"
        )


def _promote(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _adapter_name(adapter: nn.Module) -> str:
    return "conv1x1" if isinstance(adapter, nn.Conv2d) else "linear"


def _apply_channelwise(adapter: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply a 1x1 conv or Linear over the channel dim of any layout (they are the same map)."""
    weight = adapter.weight
    weight2d = weight.reshape(weight.shape[0], weight.shape[1])
    x = x.to(weight.dtype)
    if x.dim() == 4:
        y = F.conv2d(x, weight2d[:, :, None, None], adapter.bias)
    else:
        y = F.linear(x, weight2d, adapter.bias)
    return upcast(y)


def _adapt(loss: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Project the student's channels onto the teacher's with ``loss.adapter``, building it on
    the first call when ``loss.adapter_kind`` allows (FeatureMSE and CosineEmbedding share it).
    """
    c_s, c_t = _channels(student.shape), _channels(teacher.shape)
    what = type(loss).__name__
    if loss.adapter is None:
        if c_s == c_t:
            return student
        if loss.adapter_kind is None:
            raise KDError(
                f"{what}: student features {tuple(student.shape)} have {c_s} channels and "
                f"teacher features {tuple(teacher.shape)} have {c_t}, but adapter=None; use "
                "adapter='auto' (a learnable 1x1 conv / Linear) or project them yourself"
            )
        for name, given, actual in (
            ("student", loss.student_dim, c_s),
            ("teacher", loss.teacher_dim, c_t),
        ):
            if given is not None and given != actual:
                raise KDError(f"{name}_dim={given} but the {name} features have {actual} channels")
        kind = loss.adapter_kind
        if kind == "auto":
            kind = "conv1x1" if student.dim() == 4 else "linear"
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        loss.adapter = _make_adapter(kind, c_s, c_t).to(student.device, dtype)
    weight = loss.adapter.weight
    if (weight.shape[1], weight.shape[0]) != (c_s, c_t):
        raise KDError(
            f"{what}: adapter maps {weight.shape[1]}->{weight.shape[0]} channels but student "
            f"features are {tuple(student.shape)} and teacher features {tuple(teacher.shape)}"
        )
    return _apply_channelwise(loss.adapter, student)


def _make_adapter(kind: str, c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d | nn.Linear:
    if kind == "conv1x1":
        return nn.Conv2d(c_in, c_out, 1, bias=bias)
    return nn.Linear(c_in, c_out, bias=bias)


def adapter_from_saved(weight: torch.Tensor, has_bias: bool) -> nn.Conv2d | nn.Linear:
    """The adapter a checkpoint's ``adapter.weight`` was saved from: created lazily at the
    first forward, a fresh loss has none yet, so loading a state dict builds it first."""
    c_out, c_in = weight.shape[:2]
    kind = "conv1x1" if weight.dim() == 4 else "linear"
    return _make_adapter(kind, c_in, c_out, bias=has_bias).to(weight.device)


def build_saved_adapters(losses: Any, state_dict: Mapping[str, Any], prefix: str) -> None:
    """Give each loss of ``losses`` whose adapter is still to be created lazily the adapter
    ``state_dict`` saved under ``{prefix}{i}.adapter`` (a state dict about to be loaded)."""
    for i, loss in enumerate(losses):
        key = f"{prefix}{i}.adapter"
        if f"{key}.weight" in state_dict and getattr(loss, "adapter", "missing") is None:
            loss.adapter = adapter_from_saved(
                state_dict[f"{key}.weight"], f"{key}.bias" in state_dict
            )


def _init_adapter(
    loss: nn.Module, adapter: str | None, student_dim: int | None, teacher_dim: int | None
) -> None:
    """Set the adapter attributes; build the adapter now when both dims are known."""
    if adapter not in _ADAPTER_KINDS:
        raise KDError(f"adapter must be one of {_ADAPTER_KINDS}, got {adapter!r}")
    loss.adapter_kind = adapter
    loss.student_dim, loss.teacher_dim = student_dim, teacher_dim
    loss.register_module("adapter", None)
    if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
        if adapter is None:
            raise KDError(
                f"student_dim={student_dim} and teacher_dim={teacher_dim} differ but "
                "adapter=None; use adapter='auto' or project the features yourself"
            )
        kind = "linear" if adapter == "linear" else "conv1x1"
        loss.adapter = _make_adapter(kind, student_dim, teacher_dim)


def _summary(loss: nn.Module, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> str:
    """What is done to the student features, e.g. ``"conv1x1 64->128 + resize 8x8->4x4"``."""
    parts = []
    if loss.adapter is not None:
        w = loss.adapter.weight
        parts.append(f"{_adapter_name(loss.adapter)} {w.shape[1]}->{w.shape[0]}")
    elif len(student_shape) in (2, 3, 4) and len(student_shape) == len(teacher_shape):
        c_s, c_t = _channels(student_shape), _channels(teacher_shape)
        if c_s != c_t and loss.adapter_kind is not None:
            kind = loss.adapter_kind
            if kind == "auto":
                kind = "conv1x1" if len(student_shape) == 4 else "linear"
            parts.append(f"{kind} {c_s}->{c_t} (made on first call)")
    if len(student_shape) == 4 and len(teacher_shape) == 4:
        (h, w), (ht, wt) = student_shape[2:], teacher_shape[2:]
        if (h, w) != (ht, wt):
            parts.append(f"resize {h}x{w}->{ht}x{wt}")
    return " + ".join(parts) or "none"


def _adapt_and_resize(
    loss: nn.Module, student: torch.Tensor, teacher: torch.Tensor
) -> torch.Tensor:
    """:func:`_adapt`, then bilinear resizing of a student map to the teacher's size."""
    _check_pair(student, teacher, type(loss).__name__)
    student = _adapt(loss, student, teacher)
    if student.dim() == 4 and student.shape[2:] != teacher.shape[2:]:
        student = F.interpolate(
            student, size=teacher.shape[2:], mode="bilinear", align_corners=False
        )
    return student


class FeatureMSE(nn.Module):
    """FitNets hint loss: mean squared error between student and teacher features.

    When the channel counts differ, ``adapter="auto"`` learns a projection student_dim ->
    teacher_dim (the FitNets regressor): a 1x1 conv for maps, a Linear for vectors and tokens.
    ``"conv1x1"`` / ``"linear"`` force the module type (each is applied as the same
    channel-wise linear map on any layout); ``None`` forbids an adapter (mismatched channels
    are then a :class:`KDError`). When spatial sizes differ the (adapted) student map is
    resized to the teacher's with bilinear interpolation.

    The adapter is built in ``__init__`` when ``student_dim`` and ``teacher_dim`` are given
    (``"auto"`` then makes a 1x1 conv, since the layout is not known yet); otherwise on the
    first call, on the input's device in fp32. A lazily built adapter does not exist when the
    optimizer is created, so either give the dims or run one forward first (the Distiller's
    ``prepare(example_input)`` / ``describe()`` dry run) and build the optimizer after it.

    Ref: Romero et al. 2015 (FitNets), arXiv:1412.6550.
    """

    def __init__(
        self,
        adapter: str | None = "auto",
        student_dim: int | None = None,
        teacher_dim: int | None = None,
    ) -> None:
        super().__init__()
        _init_adapter(self, adapter, student_dim, teacher_dim)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_kind!r}"

    def adapter_summary(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> str:
        """What is done to the student features, e.g. ``"conv1x1 64->128 + resize 8x8->4x4"``."""
        return _summary(self, student_shape, teacher_shape)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        student, teacher = upcast(student), upcast(teacher)
        student = _adapt_and_resize(self, student, teacher)
        if student.shape != teacher.shape:
            raise KDError(
                f"FeatureMSE: student features {tuple(student.shape)} (after the adapter) and "
                f"teacher features {tuple(teacher.shape)} differ; token counts must match"
            )
        return F.mse_loss(*_promote(student, teacher))


class CosineEmbedding(nn.Module):
    """``1 - cos(s, t)`` per sample (non-batch dims flattened), averaged over the batch.

    Scale-free, so it matches the direction of embeddings whose norms differ between models.
    With the default ``adapter=None`` student and teacher must have the same number of
    features per sample. ``adapter="auto"`` / ``"conv1x1"`` / ``"linear"`` (and
    ``student_dim`` / ``teacher_dim``) work as in :class:`FeatureMSE`: a learnable
    projection of the student's channels onto the teacher's (CRD-style embedding heads), and
    a bilinear resize of maps of another size. It is opt-in because the projection changes
    what is compared: the direction of the *projected* student, not of the student itself.
    """

    def __init__(
        self,
        adapter: str | None = None,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
    ) -> None:
        super().__init__()
        _init_adapter(self, adapter, student_dim, teacher_dim)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_kind!r}" if self.adapter_kind is not None else ""

    def adapter_summary(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> str:
        """What is done to the student features before the cosine (``"none"`` without one)."""
        if self.adapter_kind is None:
            return "none"
        return _summary(self, student_shape, teacher_shape)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        student, teacher = upcast(student), upcast(teacher)
        if self.adapter_kind is not None or self.adapter is not None:
            student = _adapt_and_resize(self, student, teacher)
        s, t = _promote(student.flatten(1), teacher.flatten(1))
        if s.shape != t.shape:
            raise KDError(
                f"CosineEmbedding needs the same number of features per sample; student "
                f"{tuple(student.shape)} vs teacher {tuple(teacher.shape)} (use "
                "adapter='auto' to learn a projection)"
            )
        return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


class AttentionTransfer(nn.Module):
    """Attention transfer: match where the networks look, not what they compute.

    The attention map of (N, C, H, W) features is ``mean_c |f_c|^p`` (for (N, L, D) tokens,
    the mean over D per token), flattened and L2-normalised per sample, so channel counts may
    differ. Loss: mean over samples of ``||a_s - a_t||_2``, the (unsquared) 2-norm of the
    paper's formulation; the authors' code instead averages squared differences over
    elements, which differs by scale (they weight it by 1e3). When spatial sizes differ the
    student's attention map is bilinearly resized to the teacher's before normalising.

    Ref: Zagoruyko & Komodakis 2017, arXiv:1612.03928.
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        if p <= 0:
            raise KDError(f"p must be positive, got {p}")
        self.p = float(p)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def _attention(self, f: torch.Tensor) -> torch.Tensor:
        powered = f.pow(2) if self.p == 2 else f.abs().pow(self.p)
        return powered.mean(dim=-1 if f.dim() == 3 else 1)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        student, teacher = _promote(upcast(student), upcast(teacher))
        _check_pair(student, teacher, "AttentionTransfer")
        if student.dim() == 2:
            raise KDError(
                f"AttentionTransfer needs spatial maps (N, C, H, W) or tokens (N, L, D), got "
                f"{tuple(student.shape)} and {tuple(teacher.shape)}"
            )
        a_s, a_t = self._attention(student), self._attention(teacher)
        if a_s.shape != a_t.shape:
            if a_s.dim() != 3:
                raise KDError(
                    f"AttentionTransfer: token counts differ, student {tuple(student.shape)} "
                    f"vs teacher {tuple(teacher.shape)}"
                )
            a_s = F.interpolate(
                a_s.unsqueeze(1), size=a_t.shape[1:], mode="bilinear", align_corners=False
            ).squeeze(1)
        a_s = F.normalize(a_s.flatten(1), dim=1)
        a_t = F.normalize(a_t.flatten(1), dim=1)
        return (a_s - a_t).norm(dim=1).mean()
