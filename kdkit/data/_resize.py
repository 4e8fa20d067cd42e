"""Resize a batch of images of different shapes in one pass: two batched matmuls.

nvJPEG returns one tensor per file, and a folder of photos has nearly as many shapes as
files (ImageNet: 500x375, 375x500, 500x333, ...). Resizing per shape launches a chain of
kernels (stack, convert, resize, round) for every shape, several hundred launches per batch
of 256 from the one Python thread that also feeds the GPU. Antialiased bilinear resizing is
linear and separable, so image ``i`` resized is ``A_i @ X_i @ B_i^T`` with ``A_i`` (H, h_i)
and ``B_i`` (W, w_i) the row and column filters; a centre crop is a slice of those rows.
Zero-padding every image and filter to the batch's largest shape turns the whole batch into
two batched matmuls. The filters are torch's own: ``F.interpolate(..., antialias=True)``
applied to an identity matrix, computed once per (input, output) length on the host and
sent with one copy per batch. Results match ``torchvision.transforms.v2.functional.resize``
to within one intensity level (float rounding).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["resize_mixed", "resized_shape"]

_BUDGET_BYTES = 256 * 2**20  # float32 padded images resized at once


@functools.lru_cache(maxsize=256)  # (n_out, n_in) floats each: <= ~0.5 MB for photos
def _filter(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float32 weights of torch's antialiased bilinear resize, on the CPU."""
    eye = torch.eye(n_in).reshape(1, 1, n_in, n_in)
    out = F.interpolate(eye, size=(n_in, n_out), mode="bilinear", antialias=True)
    return out[0, 0].T.contiguous()


def resized_shape(h: int, w: int, shorter: int) -> tuple[int, int]:
    """torchvision's ``resize(image, shorter)`` output shape: the shorter side to
    ``shorter``, the longer one scaled and truncated."""
    if w <= h:
        return int(shorter * h / w), shorter
    return shorter, int(shorter * w / h)


def _crop_filter(n_in: int, n_resized: int, n_out: int) -> torch.Tensor:
    """Resize ``n_in -> n_resized`` then take the centred ``n_out`` (torchvision's rounding)."""
    start = int(round((n_resized - n_out) / 2.0))
    return _filter(n_in, n_resized)[start : start + n_out]


def resize_mixed(
    images: Sequence[torch.Tensor],
    size: tuple[int, int],
    *,
    shorter: int | None = None,
) -> torch.Tensor:
    """uint8 images (3, h_i, w_i) of any shapes, on one device -> uint8 (N, 3, H, W).

    ``shorter=None``: each image squashed to ``size``; else its shorter side resized to
    ``shorter`` and the centre ``size`` cropped (``shorter >= max(size)``)."""
    out_h, out_w = size
    device = images[0].device
    rows, cols = [], []
    for image in images:
        h, w = image.shape[-2:]
        if shorter is None:
            rows.append(_filter(h, out_h))
            cols.append(_filter(w, out_w))
        else:
            rh, rw = resized_shape(h, w, shorter)
            rows.append(_crop_filter(h, rh, out_h))
            cols.append(_crop_filter(w, rw, out_w))
    result = torch.empty((len(images), 3, out_h, out_w), dtype=torch.uint8, device=device)
    start = 0
    while start < len(images):
        stop = _chunk_end(images, start)
        result[start:stop] = _resize_chunk(
            images[start:stop], rows[start:stop], cols[start:stop], device
        )
        start = stop
    return result


def _chunk_end(images: Sequence[torch.Tensor], start: int) -> int:
    """The end of the chunk from ``start`` whose padded float copy fits the budget."""
    h_max = w_max = 0
    stop = start
    while stop < len(images):
        h, w = images[stop].shape[-2:]
        h2, w2 = max(h_max, h), max(w_max, w)
        if stop > start and (stop - start + 1) * 3 * h2 * w2 * 4 > _BUDGET_BYTES:
            break
        h_max, w_max, stop = h2, w2, stop + 1
    return stop


def _resize_chunk(
    images: Sequence[torch.Tensor],
    rows: list[torch.Tensor],
    cols: list[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    n = len(images)
    h_max = max(int(i.shape[-2]) for i in images)
    w_max = max(int(i.shape[-1]) for i in images)
    out_h, out_w = rows[0].shape[0], cols[0].shape[0]
    # the filters, zero-padded to the chunk's largest shape: built on the host, one copy
    pinned = device.type == "cuda"
    a = torch.zeros((n, out_h, h_max), pin_memory=pinned)
    b = torch.zeros((n, out_w, w_max), pin_memory=pinned)
    x = torch.zeros((n, 3, h_max, w_max), device=device)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        a[i, :, :h] = rows[i]
        b[i, :, :w] = cols[i]
        x[i, :, :h, :w] = image
    a = a.to(device, non_blocking=True)
    b = b.to(device, non_blocking=True)
    out = torch.matmul(torch.matmul(a.unsqueeze(1), x), b.transpose(1, 2).unsqueeze(1))
    return out.round_().clamp_(0, 255).to(torch.uint8)
