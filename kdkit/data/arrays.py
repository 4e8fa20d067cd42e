"""In-memory datasets and a loader that batches them by tensor indexing.

Small datasets (Fashion-MNIST is 47 MB) fit in memory as one uint8 tensor. Collating them item
by item in Python is what limits a 2-core machine, so :class:`FastLoader` gathers a whole
batch with one indexing operation, optionally on the GPU where the arrays were moved once.

Every item is ``(image, label, index)``: a uint8 CHW image, an int64 label (``-1`` when
hidden) and the sample's index in the ORIGINAL dataset, which stays the same through subsets
and splits so a teacher cache keyed by index finds the right entry.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Subset

from kdkit.errors import KDError

__all__ = [
    "ArrayDataset",
    "Batch",
    "FastLoader",
    "to_float",
    "epoch_seed",
    "dataset_tensors",
    "FINGERPRINT_VERSION",
]

FINGERPRINT_VERSION = b"kdkit-array-dataset-v1"


class Batch(NamedTuple):
    """A batch: uint8 images (B, C, H, W), int64 labels (B,) with -1 = unlabeled, and int64
    dataset indices (B,). A tuple, so ``images, labels, indices = batch`` works."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


class ArrayDataset(torch.utils.data.Dataset):
    """Images and labels held as tensors.

    Args:
        images: uint8 tensor (N, C, H, W).
        labels: integer tensor (N,); -1 marks an unlabeled sample.
        classes: class names, ``classes[label]``; optional.
        indices: index of each row in the original dataset (N,); defaults to ``arange(N)``.
            Subsets keep the original indices so caches keyed by index stay valid.
        base: the dataset whose index space ``indices`` refers to (internal; set by
            :meth:`subset`). A teacher cache should check ``dataset.base.fingerprint()``.

    The tensors are shared, not copied: treat them as read-only, since :meth:`fingerprint` is
    computed once and memoised.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str] | None = None,
        *,
        indices: torch.Tensor | None = None,
        base: ArrayDataset | None = None,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise KDError(
                "ArrayDataset images must be a uint8 tensor of shape (N, C, H, W); got "
                f"{_describe(images)}. Normalisation happens later on the device (to_float)."
            )
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise KDError(
                f"labels must be an integer tensor of shape (N,); got {_describe(labels)}"
            )
        labels = labels.to(torch.int64)
        n = images.shape[0]
        if indices is None:
            indices = torch.arange(n, dtype=torch.int64)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if labels.shape[0] != n or indices.shape != (n,):
            raise KDError(
                f"images, labels and indices disagree on the number of samples: "
                f"{n}, {labels.shape[0]}, {tuple(indices.shape)}"
            )
        if classes is not None:
            classes = list(classes)
            if n and (int(labels.min()) < -1 or int(labels.max()) >= len(classes)):
                raise KDError(
                    f"labels must lie in [-1, {len(classes)}) for {len(classes)} classes; got "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
        self.images = images
        self.labels = labels
        self.classes = classes
        self.indices = indices
        self._base = base
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.images[i], self.labels[i], int(self.indices[i])

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape[1:])
        return f"ArrayDataset({len(self)} images {shape}, {self.num_classes} classes)"

    @property
    def base(self) -> ArrayDataset:
        """The dataset whose index space ``indices`` refers to (``self`` unless a subset)."""
        return self._base if self._base is not None else self

    @property
    def num_classes(self) -> int:
        """``len(classes)`` when names are known, else the largest label + 1."""
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self) else 0

    def fingerprint(self) -> str:
        """SHA-256 of the shapes, dtypes and bytes of the images and their indices.

        It identifies what a teacher sees, for caches of teacher outputs: content-sensitive
        (one changed pixel changes it), but blind to labels, so hiding labels
        (:meth:`without_labels`) keeps it. Hashing 47 MB takes ~0.1 s; the result is memoised.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(FINGERPRINT_VERSION)
            for tensor in (self.images, self.indices):
                array = np.ascontiguousarray(tensor.detach().cpu().numpy())
                digest.update(f"{tuple(array.shape)}{array.dtype.str};".encode())
                digest.update(memoryview(array).cast("B"))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def subset(self, positions: torch.Tensor | Sequence[int]) -> ArrayDataset:
        """The rows at ``positions`` (into this dataset), keeping their original indices."""
        positions = torch.as_tensor(positions, dtype=torch.int64)
        return ArrayDataset(
            self.images[positions],
            self.labels[positions],
            self.classes,
            indices=self.indices[positions],
            base=self.base,
        )

    def without_labels(self) -> ArrayDataset:
        """The same images with every label set to -1, so no code path can read them."""
        return ArrayDataset(
            self.images,
            torch.full_like(self.labels, -1),
            self.classes,
            indices=self.indices,
            base=self.base,
        )


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def dataset_tensors(
    dataset: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(images, labels, indices, rows)`` of an in-memory dataset; ``rows`` selects the rows
    of a ``torch.utils.data.Subset`` (None = all) so subsets are gathered without a copy."""
    if isinstance(dataset, Subset):
        images, labels, indices, rows = dataset_tensors(dataset.dataset)
        picked = torch.as_tensor(dataset.indices, dtype=torch.int64)
        return images, labels, indices, picked if rows is None else rows[picked]
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise KDError(
            f"FastLoader needs an in-memory dataset with .images and .labels tensors (such as "
            f"ArrayDataset or a Subset of one); got {type(dataset).__name__}. For image "
            "folders use ImageFolderManager (a torch DataLoader)."
        )
    indices = getattr(dataset, "indices", None)
    if indices is None:
        indices = torch.arange(images.shape[0], dtype=torch.int64)
    if not (images.shape[0] == labels.shape[0] == len(indices)):
        raise KDError(
            f"{type(dataset).__name__} has {images.shape[0]} images, {labels.shape[0]} "
            f"labels and {len(indices)} indices; they must match"
        )
    return images, labels.to(torch.int64), torch.as_tensor(indices, dtype=torch.int64), None


def epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit seed from (seed, epoch) with no collisions between nearby pairs."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


def lone_last_sample(n: int, batch_size: int, shuffle: bool) -> bool:
    """True when a shuffled (training) epoch would end in a batch of one sample: that sample
    is folded into the previous batch (one batch of ``batch_size + 1``), since BatchNorm
    cannot train on one sample (``Expected more than 1 value per channel``) and dropping it
    would leave a sample out of the epoch. Evaluation (no shuffle) is batched as given."""
    return shuffle and batch_size > 1 and n > 1 and n % batch_size == 1


class FastLoader:
    """Batches an in-memory dataset by tensor indexing. A shuffled epoch that would end in a
    batch of one sample folds it into the batch before (:func:`lone_last_sample`).

    Args:
        dataset: anything with ``.images`` and ``.labels`` tensors and optionally
            ``.indices`` (original indices, e.g. :class:`ArrayDataset`), or a
            ``torch.utils.data.Subset`` of one.
        batch_size: samples per batch (per replica).
        shuffle: reshuffle each epoch; the order depends only on (seed, epoch).
        drop_last: drop the last incomplete batch (and, with replicas, the samples that do
            not split evenly; otherwise the order is padded by wrapping around, as
            ``DistributedSampler`` does).
        seed: base seed of the shuffle.
        device: if given, the arrays are moved there once and batches are gathered there,
            so no image crosses the host-device link during training.
        num_replicas, rank: shard each epoch's order across DDP ranks.

    Call :meth:`set_epoch` before each epoch; :meth:`iter_from` resumes mid-epoch.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise KDError(f"batch_size must be >= 1; got {batch_size}")
        if seed < 0:
            raise KDError(f"seed must be >= 0; got {seed}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise KDError(f"need 0 <= rank < num_replicas; got rank={rank}, {num_replicas=}")
        images, labels, indices, rows = dataset_tensors(dataset)
        if device is not None:
            images, labels, indices = images.to(device), labels.to(device), indices.to(device)
            rows = None if rows is None else rows.to(device)
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.device = images.device
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._images, self._labels, self._indices, self._rows = images, labels, indices, rows
        self._n = images.shape[0] if rows is None else rows.shape[0]

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order of ``epoch`` (deterministic in (seed, epoch))."""
        if epoch < 0:
            raise KDError(f"epoch must be >= 0; got {epoch}")
        self.epoch = epoch

    def _samples_per_replica(self) -> int:
        if self.num_replicas == 1 or self.drop_last:
            return self._n // self.num_replicas
        return math.ceil(self._n / self.num_replicas)

    def __len__(self) -> int:
        per_replica = self._samples_per_replica()
        if self.drop_last or lone_last_sample(per_replica, self.batch_size, self.shuffle):
            return per_replica // self.batch_size
        return math.ceil(per_replica / self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """Positions (into the dataset) this replica visits this epoch, in order (CPU int64)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self._n, generator=generator)
        else:
            order = torch.arange(self._n)
        if self.num_replicas > 1:
            total = self._samples_per_replica() * self.num_replicas
            if total > self._n:  # pad by wrapping around so every rank gets as many samples
                order = order.repeat(math.ceil(total / max(self._n, 1)))
            order = order[self.rank : total : self.num_replicas]
        return order

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, batch_index: int) -> Iterator[Batch]:
        """Yield this epoch's batches from ``batch_index`` on (skipping those already done)."""
        n_batches = len(self)
        if not 0 <= batch_index <= n_batches:
            raise KDError(f"batch_index must be in [0, {n_batches}]; got {batch_index}")
        return self._batches(batch_index, n_batches)

    def _batches(self, start: int, stop: int) -> Iterator[Batch]:
        order = self.epoch_order().to(self.device)
        fold = lone_last_sample(len(order), self.batch_size, self.shuffle) and not self.drop_last
        for b in range(start, stop):
            end = len(order) if fold and b == len(self) - 1 else (b + 1) * self.batch_size
            positions = order[b * self.batch_size : end]
            if self._rows is not None:
                positions = self._rows[positions]
            yield Batch(self._images[positions], self._labels[positions], self._indices[positions])


def to_float(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalise images to float32: ``(images / 255 - mean) / std`` per channel.

    Args:
        images: uint8 (..., C, H, W) on any device; floating input is taken as already in
            [0, 1] (e.g. after an interpolating augmentation).
        mean, std: per-channel statistics in [0, 1] units, of length C or 1.
    """
    if images.dtype == torch.uint8:
        scale = 255.0
    elif images.dtype.is_floating_point:
        scale = 1.0
    else:
        raise KDError(f"to_float expects uint8 or floating images; got {images.dtype}")
    if images.ndim < 3:
        raise KDError(f"to_float expects images shaped (..., C, H, W); got {tuple(images.shape)}")
    channels = images.shape[-3]
    for name, stats in (("mean", mean), ("std", std)):
        if len(stats) not in (1, channels):
            raise KDError(f"{name} has {len(stats)} values but the images have {channels} channels")
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    out = images.to(torch.float32, copy=True)  # never modify the caller's float tensor
    return out.mul_(1.0 / (scale * std_t)).sub_(mean_t / std_t)
