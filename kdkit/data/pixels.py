"""Pixels from files that are not plain 8-bit RGB: 16-bit images and decompression bombs.

A 16-bit PNG opens in PIL as mode ``I;16`` (0..65535); ``convert("RGB")`` clips every value
above 255 to white, so such an image trains as a white square. Here values are scaled by
their range (65535 is white). An image whose header claims more than :data:`MAX_PIXELS`
pixels (a "decompression bomb": a few KB that decode to gigabytes) is refused per file,
before it is decoded, with the file named.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdkit.errors import KDError

__all__ = ["MAX_PIXELS", "check_pixels", "pil_to_rgb", "to_uint8", "check_encoded_pixels"]

#: PIL's own warning threshold (about 89 Mpx, a 9500 x 9500 image)
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def check_pixels(size: tuple[int, int], path: str | Path = "") -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise KDError(
            f"refused image{f' {path}' if path else ''}: {w} x {h} = {w * h:,} pixels is above the limit of "
            f"{MAX_PIXELS:,} (a decompression bomb?); resize it or remove it"
        )


def pil_to_rgb(image: Image.Image, path: str | Path = "") -> Image.Image:
    """``image`` as 8-bit RGB: 16-bit (and 32-bit integer) grey scaled by value range."""
    check_pixels(image.size, path)
    if image.mode in _WIDE_MODES:
        wide = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A decoded uint16 tensor (torchvision's 16-bit PNGs) scaled to uint8 by value range."""
    if image.dtype == torch.uint16:
        return (image.to(torch.float32) / 257.0).round().clamp(0, 255).to(torch.uint8)
    return image


def check_encoded_pixels(data: torch.Tensor, path: str | Path = "") -> None:
    """:func:`check_pixels` on an encoded file's header (PIL reads the header only)."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as header:
            size = header.size
    except Exception:  # noqa: BLE001 - unreadable: the decoder says why
        return
    check_pixels(size, path)
