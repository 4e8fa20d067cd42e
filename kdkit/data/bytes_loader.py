"""A loader over image files that decodes in batches (CPU workers or nvJPEG) and prefetches.

:class:`ImageBytesLoader` yields :class:`~kdkit.data.Batch` ``(uint8 images (B, 3, H, W) on
the decoder's device, int64 labels, int64 indices)``; labels and indices stay on the host.
With ``backend="cpu"`` the DataLoader workers decode and resize (torchvision's decoders),
the main process only copies the pinned batch to the device on a side stream. With
``backend="gpu"`` workers only read bytes and send them as one concatenated buffer with
offsets (one pinned copy per batch, not one per file); the main process decodes the whole
batch with one batched nvJPEG call on the side stream while the previous step computes.
Unreadable files are dropped from their batch, the first few named, and counted in
:attr:`ImageBytesLoader.unreadable` (a batch with none left stops with a KDError naming
files). The loader holds no reference cycle, so dropping it stops its persistent workers
at once; :meth:`ImageBytesLoader.close` stops them explicitly.
:func:`folder_loaders` builds the train / validation pair for ``ImageFolderManager``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from kdkit.data._workers import stop_workers
from kdkit.data.arrays import Batch
from kdkit.data.decode import DecodedImageDataset, EncodedImageDataset, ImageDecoder
from kdkit.data.prefetch import DevicePrefetcher
from kdkit.data.unreadable import Unreadable, UnreadableLog
from kdkit.errors import KDError

__all__ = [
    "DECODE_CHOICES",
    "ImageBytesLoader",
    "folder_loaders",
    "pack_bytes",
    "resolve_decode",
    "unpack_bytes",
]

log = logging.getLogger(__name__)

DECODE_CHOICES = ("pil", "cpu", "gpu", "auto")


class _Raw(NamedTuple):
    """What a worker sends: decoded ``images`` (CPU backend), or the batch's file bytes
    concatenated into one uint8 buffer ``data`` with ``offsets`` (int64 (N + 1,): file ``i``
    is ``data[offsets[i]:offsets[i + 1]]``). One buffer is one pinned copy per batch instead
    of one per file, and nvJPEG reads the whole batch from it."""

    images: torch.Tensor | None
    data: torch.Tensor | None
    offsets: torch.Tensor | None
    labels: torch.Tensor
    indices: torch.Tensor
    failures: list[tuple[int, str]]  # (dataset index, reason)


def pack_bytes(files: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte strings -> (one uint8 buffer, int64 offsets (N + 1,)); :func:`unpack_bytes` undoes it."""
    sizes = torch.tensor([0] + [int(f.numel()) for f in files], dtype=torch.int64)
    data = torch.cat(list(files)) if files else torch.empty(0, dtype=torch.uint8)
    return data, sizes.cumsum(0)


def unpack_bytes(data: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The files of a :func:`pack_bytes` buffer, as views into it (no copies)."""
    return list(torch.split(data, offsets.diff().tolist()))


class _Collate:
    """Runs in the workers: pack the bytes, or decode them when ``decoder`` is given."""

    def __init__(self, decoder: ImageDecoder | None) -> None:
        self.decoder = decoder

    def __call__(self, items: list[tuple[torch.Tensor, int, int]]) -> _Raw:
        data, labels, indices = zip(*items, strict=True)
        labels_t = torch.tensor(labels, dtype=torch.int64)
        indices_t = torch.tensor(indices, dtype=torch.int64)
        if self.decoder is None:
            buffer, offsets = pack_bytes(data)
            return _Raw(None, buffer, offsets, labels_t, indices_t, [])
        out = self.decoder(list(data))
        failures = [(int(indices[i]), why) for i, why in out.failures]
        return _Raw(out.images, None, None, labels_t[out.keep], indices_t[out.keep], failures)


class _Finish:
    """Main process, on the prefetch stream: decode (GPU) or move (CPU-decoded) one worker
    batch, and count the files that could not be read.

    Its own object rather than a bound method of the loader: the prefetcher that calls it
    then holds no reference back to the loader, which is freed by refcount (its workers
    stopped at once) when its last user drops it."""

    def __init__(self, decoder: ImageDecoder, encoded: EncodedImageDataset) -> None:
        self.decoder, self.encoded = decoder, encoded
        self.skipped = 0  # unreadable rows over every pass; distinct files: self.unreadable
        self.unreadable = UnreadableLog()

    def __call__(self, raw: _Raw) -> Batch:
        failures = list(raw.failures)
        if raw.images is not None:
            images, labels, indices = raw.images, raw.labels, raw.indices
            images = images.to(self.decoder.device, non_blocking=True)
        else:
            files = unpack_bytes(raw.data, raw.offsets) if raw.data is not None else []
            out = self.decoder(files)
            images = out.images
            failures += [(int(raw.indices[i]), why) for i, why in out.failures]
            labels, indices = raw.labels[out.keep], raw.indices[out.keep]
        self.skipped += len(failures)
        bad = [Unreadable(str(self.encoded.path(index)), why) for index, why in failures]
        self.unreadable.record(bad, kept=int(images.shape[0]))  # a whole batch: KDError
        return Batch(images, labels, indices)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


class ImageBytesLoader:
    """Batches of ``dataset`` decoded by ``decoder`` onto ``decoder.device``.

    ``shuffle`` order depends only on ``(seed, epoch)`` (call :meth:`set_epoch`), so a
    resumed run sees the same order; under DDP (a process group of more than one) each rank
    reads its ``DistributedSampler`` shard. ``prefetch`` overlaps the transfer or GPU decode with
    the consumer's step (CUDA only). ``dataset`` is a :class:`DecodedImageDataset` view
    (for cache precompute and checks); the files are in :attr:`encoded`.
    """

    def __init__(
        self,
        dataset: EncodedImageDataset,
        decoder: ImageDecoder,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        workers: int = 2,
        seed: int = 0,
        prefetch: bool = True,
    ) -> None:
        if batch_size < 1 or workers < 0:
            raise KDError(f"need batch_size >= 1 and workers >= 0, got {batch_size}, {workers}")
        self.encoded = dataset
        self.decoder = decoder
        self.device = decoder.device
        self.seed, self.epoch = seed, 0
        self._finish = _Finish(decoder, dataset)
        in_workers = decoder.backend == "cpu"
        worker_decoder = (
            ImageDecoder(decoder.size, backend="cpu", fit=decoder.fit, crop_pct=decoder.crop_pct)
            if in_workers
            else None
        )
        self._generator = torch.Generator()
        sampler: Sampler = SequentialSampler(dataset)
        if shuffle and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # under DDP each rank reads its own shard, reshuffled per epoch by set_epoch
            sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=drop_last)
        elif shuffle:
            sampler = RandomSampler(dataset, generator=self._generator)
        self._sampler = sampler
        self._loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            collate_fn=_Collate(worker_decoder),
            pin_memory=self.device.type == "cuda",  # pixels, or the one buffer of bytes
            persistent_workers=workers > 0,
        )
        self._prefetcher = (
            DevicePrefetcher(self._loader, self.device, self._finish) if prefetch else None
        )

    @property
    def skipped(self) -> int:
        """Unreadable rows dropped from their batches so far, over every pass."""
        return self._finish.skipped

    @property
    def unreadable(self) -> UnreadableLog:
        """The distinct unreadable files (the first few named in the log)."""
        return self._finish.unreadable

    def close(self) -> None:
        """Stop the DataLoader workers now (they persist across epochs otherwise, until the
        loader is freed); iterating again starts new ones."""
        stop_workers(self._loader)

    def __enter__(self) -> ImageBytesLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def dataset(self) -> DecodedImageDataset:
        return DecodedImageDataset(self.encoded, self.decoder)

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if isinstance(self._sampler, DistributedSampler):
            self._sampler.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[Batch]:
        self._generator.manual_seed(_epoch_seed(self.seed, self.epoch))
        before = self.skipped
        batches = (
            self._prefetcher if self._prefetcher is not None else map(self._finish, self._loader)
        )
        kept = 0
        for batch in batches:
            if batch.images.shape[0]:
                kept += int(batch.images.shape[0])
                yield batch
        self.unreadable.end_pass(kept, self.skipped - before)  # nothing decoded: KDError
        if self.skipped > before:
            log.warning(
                "skipped %d unreadable images in this pass over %d files (%d in total so far)",
                self.skipped - before,
                len(self.encoded),
                self.skipped,
            )


def resolve_decode(decode: str, device: torch.device) -> str:
    """``"auto"`` -> ``"gpu"`` on a CUDA device, else ``"cpu"``; checks the choice."""
    if decode not in DECODE_CHOICES:
        raise KDError(f"decode must be one of {list(DECODE_CHOICES)}, got {decode!r}")
    if decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return decode


def folder_loaders(
    train_samples: Sequence[tuple[Path, int]],
    val_samples: Sequence[tuple[Path, int]],
    classes: Sequence[str],
    size: tuple[int, int],
    *,
    decode: str,
    device: torch.device | str | None = None,
    work_size: int | Sequence[int] | None = None,
    crop_pct: float = 0.875,
    batch_size: int = 128,
    workers: int = 2,
    seed: int = 0,
    drop_last: bool = True,
) -> tuple[ImageBytesLoader, ImageBytesLoader]:
    """Train and validation :class:`ImageBytesLoader` for an image folder.

    Training batches come at ``work_size`` (default: square ``max(size) / crop_pct``, e.g.
    256 for 224) with no augmentation: pass ``views=ViewSampler(size=size)`` to the Trainer
    to crop and flip on the device. Validation batches are final: shorter side to
    ``max(size) / crop_pct``, center crop ``size``.
    """
    dev = torch.device(device) if device is not None else _default_device()
    backend = resolve_decode(decode, dev)
    if backend == "pil":
        raise KDError("folder_loaders builds the 'cpu' / 'gpu' decode paths, not 'pil'")
    if work_size is None:
        work_size = round(max(size) / crop_pct)
    common = dict(batch_size=batch_size, workers=workers, seed=seed)
    train = ImageBytesLoader(
        EncodedImageDataset(train_samples, classes),
        ImageDecoder(work_size, backend=backend, device=dev, fit="squash", crop_pct=crop_pct),
        shuffle=True,
        drop_last=drop_last,
        **common,
    )
    val = ImageBytesLoader(
        EncodedImageDataset(val_samples, classes),
        ImageDecoder(size, backend=backend, device=dev, fit="center", crop_pct=crop_pct),
        shuffle=False,
        drop_last=False,
        **common,
    )
    return train, val


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
