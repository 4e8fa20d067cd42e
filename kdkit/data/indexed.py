"""A dataset wrapper that adds each item's index: what lets a plain ``(x, y)`` dataset feed a
teacher cache.

A :class:`~kdkit.cache.CachedTeacher` reads the teacher's outputs by dataset index, and
augmentation views are drawn from it. kdkit's own datasets yield ``(image, label, index)``;
a torchvision dataset or a ``TensorDataset`` yields ``(image, label)``. Wrapping it keeps
the user's DataLoader (shuffle, workers, sampler) and adds the one thing missing::

    loader = DataLoader(kdkit.data.WithIndex(trainset), batch_size=64, shuffle=True)
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

__all__ = ["WithIndex"]


class WithIndex(Dataset):
    """``dataset[i]`` as ``(*dataset[i], i)``; length and fingerprintable items unchanged."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        item = self.dataset[i]
        return (*item, i) if isinstance(item, (tuple, list)) else (item, -1, i)
