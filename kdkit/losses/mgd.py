"""Masked generative distillation: rebuild the teacher's feature map from a masked student's.

Ref: Yang et al. 2022, "Masked Generative Distillation", arXiv:2205.01529.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import KDError
from kdkit.losses._common import upcast

__all__ = ["MGD"]

_REDUCTIONS = ("mean", "sum")


class MGD(nn.Module):
    """MGD: mask the student's map, let a small generator rebuild the teacher's from it.

    For (N, C, H, W) maps of the same height and width: the student map is aligned to the
    teacher's channels by a 1x1 conv (only when the counts differ), each spatial position is
    zeroed with probability ``mask_ratio`` (one mask shared by all channels, drawn afresh
    every call), and a generator ``conv3x3 -> ReLU -> conv3x3`` must produce the teacher's
    map from what is left. The loss is ``alpha`` times the squared error between the
    generated and the teacher map: averaged over elements (``reduction="mean"``, ModelOpt's
    form, scale-free; its defaults ``alpha=1``, ``mask_ratio=0.65``) or summed and divided by
    the batch size (``"sum"``, the paper's form, which needs its small ``alpha``: 2e-5 for
    detection, 7e-5 with ``mask_ratio=0.15`` for ImageNet classification).

    The align and generator layers are parameters of this loss, built in ``__init__`` from
    the channel counts, so an optimizer made from ``distiller.parameters()`` trains them;
    they are discarded with the Distiller at export. The teacher map is a target: no
    gradient flows to it.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        alpha: float = 1.0,
        mask_ratio: float = 0.65,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if student_channels < 1 or teacher_channels < 1:
            raise KDError(
                f"channel counts must be >= 1, got {student_channels} and {teacher_channels}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise KDError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if alpha < 0:
            raise KDError(f"alpha must be >= 0, got {alpha}")
        if reduction not in _REDUCTIONS:
            raise KDError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.alpha, self.mask_ratio, self.reduction = float(alpha), float(mask_ratio), reduction
        self.align = (
            nn.Conv2d(student_channels, teacher_channels, 1)
            if student_channels != teacher_channels
            else None
        )
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.student_channels}->{self.teacher_channels}, alpha={self.alpha:g}, "
            f"mask_ratio={self.mask_ratio:g}, reduction={self.reduction!r}"
        )

    def adapter_summary(self, student_shape, teacher_shape) -> str:
        align = f"conv1x1 {self.student_channels}->{self.teacher_channels} + " if self.align else ""
        return f"{align}mask {self.mask_ratio:g} + generator"

    def mask(self, student: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W): 0 with probability ``mask_ratio``, else 1 (torch's global RNG)."""
        n, _, h, w = student.shape
        keep = torch.rand((n, 1, h, w), device=student.device) >= self.mask_ratio
        return keep.to(student.dtype)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if student.dim() != 4 or teacher.dim() != 4:
            raise KDError(
                f"MGD needs (N, C, H, W) feature maps, got student {tuple(student.shape)} and "
                f"teacher {tuple(teacher.shape)}"
            )
        if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise KDError(
                f"MGD needs maps of the same batch and spatial size; student "
                f"{tuple(student.shape)} vs teacher {tuple(teacher.shape)} (pick layers of the "
                "same stride)"
            )
        if student.shape[1] != self.student_channels or teacher.shape[1] != self.teacher_channels:
            raise KDError(
                f"MGD was built for {self.student_channels} student and "
                f"{self.teacher_channels} teacher channels; got {tuple(student.shape)} and "
                f"{tuple(teacher.shape)}"
            )
        weight = self.generation[0].weight
        student = upcast(student).to(weight.dtype)
        teacher = upcast(teacher).to(weight.dtype).detach()
        if self.align is not None:
            student = self.align(student)
        generated = self.generation(student * self.mask(student))
        if self.reduction == "mean":
            return self.alpha * F.mse_loss(generated, teacher)
        return self.alpha * F.mse_loss(generated, teacher, reduction="sum") / student.shape[0]
