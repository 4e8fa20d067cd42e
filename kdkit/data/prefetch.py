"""Overlap the next batch's host-to-device copy (or GPU decode) with the current step.

A training step that first copies its batch to the GPU and then computes leaves the copy
engine idle during compute and the SMs idle during the copy. :class:`DevicePrefetcher`
issues the next batch's transfer on a side CUDA stream as soon as the consumer asks for it,
which is right after the current step's kernels were queued: the copy (pinned memory,
``non_blocking=True``) runs while they execute. The compute stream then waits on the side
stream before it touches the batch, and every tensor staged there is marked as used by the
compute stream (``record_stream``), so the caching allocator does not recycle its memory
early. Off CUDA it is a plain pass-through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["DevicePrefetcher", "move_images"]


def move_images(batch: Any, device: torch.device) -> Any:
    """Move a batch's images (a tensor, or the first field of a tuple) to ``device``.

    Labels and indices stay on the host: the trainer counts labeled rows and derives views
    from indices there, without waiting for the GPU."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        images = batch[0].to(device, non_blocking=True)
        rest = tuple(batch[1:])
        return type(batch)(images, *rest) if hasattr(batch, "_fields") else (images, *rest)
    return batch


def _cuda_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda:
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _cuda_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _cuda_tensors(item)


class DevicePrefetcher:
    """Iterate ``loader``, applying ``move`` (default :func:`move_images`) to each batch on a
    side stream of ``device``; the batch is ready on the current stream when it is yielded.

    ``move`` may do more than copy (``ImageBytesLoader`` decodes with nvJPEG in it); it runs
    in the calling thread under ``torch.cuda.stream(side)``. ``len()``, ``dataset`` and
    ``set_epoch`` pass through to ``loader``.
    """

    def __init__(
        self,
        loader: Iterable,
        device: torch.device | str,
        move: Callable[[Any], Any] | None = None,
    ) -> None:
        self.loader = loader
        self.device = torch.device(device)
        # no lambda over self here: that would be a reference cycle, freed only by the GC
        self.move = move
        self._stream: torch.cuda.Stream | None = None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def dataset(self) -> Any:
        return getattr(self.loader, "dataset", None)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def _move(self, batch: Any) -> Any:
        return self.move(batch) if self.move is not None else move_images(batch, self.device)

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self._move(batch)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        side = self._stream
        for batch in self.loader:
            with torch.cuda.stream(side):
                staged = self._move(batch)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(side)
            for t in _cuda_tensors(staged):
                t.record_stream(compute)
            yield staged
