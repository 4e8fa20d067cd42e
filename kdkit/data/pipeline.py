"""The input pipeline: a raw batch -> the model input of one step, on the host and the device.

One place turns what a loader yields (``images``, ``(images, labels)`` or ``(images, labels,
index)``) into a :class:`ModelInput`: uint8 images moved to the device once, the augmentation
view of every sample applied there (the same view for teacher and student), normalised, and
the labels checked. What the step needs to know about the labels (any labeled row?) is decided
here, on the host, so the step never syncs on it; ``labels``, ``index`` and ``view_ids`` stay
on the CPU and a teacher that wants them elsewhere moves them (a cache reads them on the CPU).
:func:`prepare_input` is the same path for code with no loop (cache precompute, calibration).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdkit.data.labels import check_labels
from kdkit.data.mixing import MixPool
from kdkit.errors import KDError

__all__ = ["ModelInput", "InputPipeline", "prepare_input", "unpack_batch"]


@dataclass(frozen=True)
class ModelInput:
    """One step's input: ``x`` on the device; ``labels`` (-1 = unlabeled), ``index`` and
    ``view_ids`` on the CPU; ``labeled`` is whether any row has a label (a host bool);
    ``teacher``: the teacher's output for ``x``, started beside an earlier step (a pending
    result, :mod:`kdkit.train.overlap`), or None (the step runs the teacher)."""

    x: torch.Tensor
    labels: torch.Tensor | None = None
    labeled: bool = False
    index: torch.Tensor | None = None
    view_ids: torch.Tensor | None = None
    teacher: Any = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(images, labels or None, index or None)`` from any batch form a loader yields."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        x, y, idx = (*batch, None, None)[:3]
        return x, y, idx
    raise KDError("batches must be images, (images, labels) or (images, labels, indices)")


class InputPipeline:
    """Raw batches -> :class:`ModelInput` for one run.

    Args:
        sampler: a :class:`~kdkit.data.ViewSampler` (function matching: the teacher sees
            exactly the student's augmented view), or None for no augmentation.
        mean, std: per-channel normalisation of the [0, 1] images (None: skip).
        device: where ``x`` goes.
        channels_last: give 4-D inputs the channels-last memory format: True, False, or
            ``"auto"`` (the default): the Trainer measures the student's step in both formats
            on its first batch, as ``kdkit train`` does, and sets True or False here
            (:func:`kdkit.teachers.autotune.choose_channels_last`); until then, False.
        pool: the partner images of mixing views (:class:`~kdkit.data.mixing.MixPool`);
            built from ``dataset`` on first use when not given.
        dataset: the training dataset, for the pool.
    """

    def __init__(
        self,
        sampler: Any = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        device: torch.device | str = "cpu",
        channels_last: bool | str = "auto",
        pool: MixPool | None = None,
        dataset: Any = None,
    ) -> None:
        self.sampler = sampler
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self.device = torch.device(device)
        if channels_last not in (True, False, "auto"):
            raise KDError(f"channels_last must be True, False or 'auto', not {channels_last!r}")
        self.channels_last = channels_last
        self._pool = pool
        self._dataset = dataset

    def to(self, device: torch.device | str) -> InputPipeline:
        self.device = torch.device(device)
        return self

    def pool(self) -> MixPool | None:
        """The mixing partners (None when the sampler does not mix), built once."""
        if self.sampler is None or not self.sampler.mixes:
            return None
        if self._pool is None:
            if self._dataset is None:
                raise KDError("mixup/cutmix views need a training loader with a .dataset")
            self._pool = MixPool.from_dataset(self._dataset)
        return self._pool

    def __call__(self, batch: Any, epoch: int = 0, *, augment: bool = True) -> ModelInput:
        """``batch`` -> :class:`ModelInput`; ``augment=False`` (evaluation) skips the views."""
        images, labels, index = unpack_batch(batch)
        labeled = False
        if labels is not None:
            labels = torch.as_tensor(labels)
            check_labels(labels)  # its range check reads host labels only: no device copy
            labeled = bool((labels >= 0).any())  # host labels (the loaders'): no device sync
        sampler = self.sampler if augment else None
        view_ids = None
        if sampler is not None:
            if index is None:
                raise KDError("augmentation views need dataset indices: yield (x, y, index)")
            index = torch.as_tensor(index)
            view_ids = sampler.view_ids(index, epoch)
        pool = self.pool() if sampler is not None else None
        x = prepare_input(images, index, view_ids, sampler, self.mean, self.std, self.device, pool)
        if self.channels_last is True and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return ModelInput(x, labels, labeled, index, view_ids)


def check_pixels(images: Any, mean: Any, std: Any) -> None:
    """Pixels kdkit can scale (uint8 0..255, or floats already in [0, 1]) and per-channel
    statistics that fit them: anything else is one line, never a silent rescale."""
    if not isinstance(images, torch.Tensor):
        return
    if not (images.dtype == torch.uint8 or images.dtype.is_floating_point):
        raise KDError(
            f"images are {images.dtype}; kdkit takes uint8 pixels (0..255) or floats in [0, 1] "
            "(an integer tensor would be taken as [0, 1] values): convert with .to(torch.uint8)"
        )
    channels = images.shape[1] if images.dim() == 4 else None
    for name, v in (("mean", mean), ("std", std)):
        t = None if v is None else torch.as_tensor(v)
        n = None if t is None or t.dim() > 1 else t.numel()  # a per-pixel tensor broadcasts
        if channels is not None and n is not None and n not in (1, channels):
            raise KDError(f"{name} has {n} values but the images have {channels} channel(s)")


def _channel_stat(v: float | Sequence[float] | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=x.dtype).to(x.device, non_blocking=True)
    return t.reshape(1, -1, 1, 1) if t.dim() == 1 else t


def prepare_input(
    images: torch.Tensor,
    index: torch.Tensor | None,
    view_ids: torch.Tensor | None,
    sampler: Any,
    mean: float | Sequence[float] | torch.Tensor | None,
    std: float | Sequence[float] | torch.Tensor | None,
    device: torch.device | str | None,
    pool: MixPool | None = None,
) -> torch.Tensor:
    """Raw batch -> model input; the single path shared by training and cache precompute.

    ``images`` (N, C, H, W) uint8 (scaled to [0, 1]) or float (taken as already in [0, 1])
    moves to ``device`` once (other integer types are refused: int64 pixels 0..255 would be
    taken as [0, 1] values; ``mean``/``std`` must have 1 or C values); then the views of ``(index, view_ids)`` are applied when
    ``sampler`` is given (a mixing sampler fetches its partners' images from ``pool``), then
    ``(x - mean) / std`` per channel (``None``: skip that part). Returns float32
    (N, C, H', W') on ``device``.
    """

    def to_unit(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, non_blocking=True) if device is not None else t
        return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()

    check_pixels(images, mean, std)
    x = to_unit(images)
    if sampler is not None:
        if index is None or view_ids is None:
            raise KDError(
                "a ViewSampler needs the batch's sample index and view ids "
                "(view_ids = sampler.view_ids(index, epoch))"
            )
        views = sampler.sample(index, view_ids, pool)
        partner = None
        if views.mixed:
            partner = to_unit(pool.fetch(views.partner)).to(x.device, non_blocking=True)  # type: ignore[union-attr]
        x = sampler.apply(x, views, partner)
    if mean is not None:
        x = x - _channel_stat(mean, x)
    if std is not None:
        x = x / _channel_stat(std, x)
    return x
