"""The small things many tests train: quadrant blobs (learnable in a few steps) and the CNN
that learns them. Tests import these instead of writing their own copies."""

from __future__ import annotations

import torch
from torch import nn


def blob_tensors(n: int, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 1x8x8 uint8 images and their labels: the class is the bright quadrant."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for c in range(classes):
        r, col = divmod(c, 2)
        x[y == c, :, r * 4 : r * 4 + 4, col * 4 : col * 4 + 4] += 150
    return x, y


def quadrant_net(width: int = 8, classes: int = 4) -> nn.Sequential:
    """A 1-channel CNN small enough to train in a test: conv, pool to 2x2, linear."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )
