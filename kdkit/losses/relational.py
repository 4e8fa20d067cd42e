"""Relational losses: the student matches how the teacher relates samples to each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import KDError
from kdkit.losses._common import upcast

__all__ = ["RKD"]


def _pair_distances(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of all unordered pairs i < j, normalised by their mean."""
    i, j = torch.triu_indices(len(e), len(e), offset=1, device=e.device)
    d = (e[i] - e[j]).norm(dim=1)
    return d / d.mean().clamp_min(1e-12)


def _triplet_cosines(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at e_j between e_i and e_k, for all distinct ordered (i, j, k)."""
    n = len(e)
    unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # [j, i] = (e_i - e_j)/|.|
    cos = unit @ unit.transpose(1, 2)  # [j, i, k]
    eye = torch.eye(n, dtype=torch.bool, device=e.device)
    distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))
    return cos[distinct]


class RKD(nn.Module):
    """Relational KD: match the geometry of the batch, not the embeddings themselves.

    Distance-wise: pairwise distances, each set normalised by its mean (so embedding scales and
    widths may differ), compared with smooth L1. Angle-wise: cosines of the angle each sample
    makes with every other pair (all distinct triplets), compared with smooth L1. Both are
    means over pairs / triplets; embeddings are flattened to (N, D). Batches too small for a
    term (fewer than 2 samples for distances, 3 for angles) contribute zero instead of failing
    on a short last batch.

    Ref: Park et al. 2019, arXiv:1904.05068.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        s, t = upcast(student).flatten(1), upcast(teacher).flatten(1)
        if len(s) != len(t):
            raise KDError(
                f"RKD needs the same batch for student {tuple(student.shape)} and teacher "
                f"{tuple(teacher.shape)}"
            )
        dtype = torch.promote_types(s.dtype, t.dtype)
        s, t = s.to(dtype), t.to(dtype)
        loss = s.sum() * 0.0  # keeps the graph for batches too small for either term
        if len(s) >= 2 and self.distance_weight:
            d = F.smooth_l1_loss(_pair_distances(s), _pair_distances(t))
            loss = loss + self.distance_weight * d
        if len(s) >= 3 and self.angle_weight:
            a = F.smooth_l1_loss(_triplet_cosines(s), _triplet_cosines(t))
            loss = loss + self.angle_weight * a
        return loss
