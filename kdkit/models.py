"""Small reference architectures for the Fashion-MNIST demo and the tests.

``fmnist_teacher`` is a ResNet-style CNN (basic blocks, four stages); ``fmnist_student`` is a
plain CNN with roughly 15x fewer parameters. Both take (N, C, H, W) float input and return
logits; both are ordinary ``nn.Module`` classes, so ``named_modules()`` names
(``"stages.3"``, ``"features.2"``...) can be used for feature pairs.

This module imports nothing from kdkit: it is on the ground floor, and ends with a plain
``MODELS`` table that :mod:`kdkit.registry` reads with an ordinary import (``kdkit:NAME``).
Registering by decorator here made registry and models a circle, and made the table an
import side effect.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["MODELS", "ResNetCNN", "SmallCNN", "fmnist_teacher", "fmnist_student"]


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016, arXiv:1512.03385)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, stride)
        self.conv2 = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )
        self.act = nn.ReLU(True)

    def forward(self, x):
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetCNN(nn.Module):
    """ResNet-style classifier: stem, one basic block per stage, global pool, linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (32, 64, 128, 256),
    ) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, widths[0])
        blocks, c = [], widths[0]
        for w in widths:
            # every stage halves the resolution: 28 -> 14 -> 7 -> 4 -> 2 on Fashion-MNIST keeps
            # the FLOPs CPU-friendly while the deep stages carry the parameters.
            blocks.append(BasicBlock(c, w, stride=2))
            c = w
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))


class SmallCNN(nn.Module):
    """A plain conv-BN-ReLU stack with stride-2 downsampling: cheap on CPUs and phones."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (16, 32, 64, 128),
    ) -> None:
        super().__init__()
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            layers.append(_conv_bn(c, w, stride=1 if i == 0 else 2))
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


def fmnist_teacher(num_classes: int = 10, in_channels: int = 1) -> ResNetCNN:
    """The demo teacher: about 1.2M parameters."""
    return ResNetCNN(num_classes, in_channels)


def fmnist_student(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    """The demo student: about 15x fewer parameters than :func:`fmnist_teacher`."""
    return SmallCNN(num_classes, in_channels)


# what ``kdkit:NAME`` builds; users' own ``register_model`` builders live in the registry
MODELS: dict[str, Callable[..., nn.Module]] = {
    "fmnist_teacher": fmnist_teacher,
    "fmnist_student": fmnist_student,
}
