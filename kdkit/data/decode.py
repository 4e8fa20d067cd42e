"""Decode image files in batches: libjpeg-turbo on CPU workers, or nvJPEG on the GPU.

The PIL loader of :class:`~kdkit.data.ImageFolderManager` decodes and augments in worker
processes, about 200 images/s per core for 500x375 JPEGs (DESIGN.md), which caps online
distillation near 3,000 img/s on 16 cores. This path splits the work differently:

1. workers only read file bytes (:class:`EncodedImageDataset`);
2. an :class:`ImageDecoder` turns a batch of byte strings into one uint8 batch
   (N, 3, H, W) at a fixed *working size*: on CUDA with torchvision's batched
   ``decode_jpeg(list, device="cuda")`` (nvJPEG; measured 11,556 img/s on an H100 against
   599 per core for the CPU decoder), on CPU with ``torchvision.io.decode_image`` in the
   workers. Files that are not baseline JPEGs go to the CPU decoder (PNG, BMP through PIL);
3. the augmentation views (:class:`~kdkit.data.ViewSampler`, applied by ``prepare_input``
   on the device) crop from the working-size image.

Views are functions of (seed, index, view id) only, so whichever decoder made the pixels the
student and a teacher cache see the same crops; nvJPEG and libjpeg-turbo differ by a few
intensity levels at most (their IDCTs differ), the scale of bf16 rounding.

A file no decoder can read is skipped, counted and logged, never the end of an epoch.
``fit="squash"`` resizes the whole image to the working size (training: the view box is in
units of the image, so squashing first does not change what a box covers); ``fit="center"``
resizes the shorter side to ``max(size) / crop_pct`` and center-crops (evaluation).
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from kdkit._io import sha256_file
from kdkit.data._resize import resize_mixed
from kdkit.data.pixels import check_encoded_pixels, pil_to_rgb, to_uint8
from kdkit.errors import KDError

__all__ = [
    "DECODE_BACKENDS",
    "FITS",
    "Decoded",
    "DecodedImageDataset",
    "EncodedImageDataset",
    "ImageDecoder",
    "decode_cpu",
    "is_jpeg",
    "jpeg_components",
    "read_image_bytes",
]

log = logging.getLogger(__name__)

DECODE_BACKENDS = ("cpu", "gpu")
FITS = ("squash", "center")
_SOI = (0xFF, 0xD8, 0xFF)  # JPEG start-of-image marker + the next marker's 0xFF
_EOI = (0xFF, 0xD9)  # end-of-image: a truncated JPEG lacks it


def read_image_bytes(path: str | Path) -> torch.Tensor:
    """The file's bytes as a uint8 tensor (1-D): what a worker sends instead of pixels."""
    data = Path(path).read_bytes()
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def is_jpeg(data: torch.Tensor, complete: bool = False) -> bool:
    """Whether ``data`` starts like a JPEG (and, with ``complete``, ends with the EOI marker).

    nvJPEG fills the missing rows of a truncated file with grey instead of failing; files
    without EOI are sent to libjpeg-turbo, which refuses them."""
    if data.numel() < 4 or tuple(data[:3].tolist()) != _SOI:
        return False
    return not complete or tuple(data[-2:].tolist()) == _EOI


def jpeg_components(data: torch.Tensor) -> int | None:
    """Colour components of a JPEG from its frame header (1 grey, 3 YCbCr, 4 CMYK/YCCK);
    ``None`` if no frame header is found. nvJPEG gets only 1- and 3-component files."""
    buf = data.numpy()
    i, n = 2, buf.shape[0]
    while i + 9 < n:
        if buf[i] != 0xFF:
            return None
        marker = int(buf[i + 1])
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            return int(buf[i + 9])
        if marker == 0xDA or marker == 0xD9:  # scan or end before any frame header
            return None
        i += 2 + (int(buf[i + 2]) << 8 | int(buf[i + 3]))
    return None


@contextmanager
def _quiet() -> Iterator[None]:
    """torchvision 0.29 marks its image IO deprecated (in favour of TorchCodec) on every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def decode_cpu(data: torch.Tensor) -> torch.Tensor:
    """Decode one image to uint8 RGB (3, H, W) on the CPU; raises ``ValueError`` if unreadable.

    torchvision (libjpeg-turbo, libpng, libwebp) first; PIL for what it lacks (BMP, TIFF).
    The first frame of an animated image."""
    if data.numel() == 0:
        raise ValueError("empty or unreadable file")
    try:
        check_encoded_pixels(data)
    except KDError as err:  # a decompression bomb: refused before it is decoded
        raise ValueError(str(err)) from None
    try:
        with _quiet():
            image = to_uint8(decode_image(data, mode=ImageReadMode.RGB))  # 16-bit PNGs
    except RuntimeError as tv_err:
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as pil:
                rgb = np.array(pil_to_rgb(pil), dtype=np.uint8)
        except Exception as pil_err:  # PIL raises many types for bad files
            raise ValueError(f"{_first_line(tv_err)} (PIL: {_first_line(pil_err)})") from None
        image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    return image[0] if image.dim() == 4 else image


def _first_line(err: BaseException) -> str:
    """A one-line reason: torchvision's ``"fn, file.cpp:171, msg"`` and PIL's
    ``"cannot identify image file <_io.BytesIO ...>"`` shortened to the message."""
    lines = str(err).strip().splitlines()
    text = lines[-1] if lines else ""
    if ".cpp:" in text:
        text = text.rsplit(", ", 1)[-1]
    return text.split(" <", 1)[0] or type(err).__name__


@dataclass
class Decoded:
    """A decoded batch: ``images`` uint8 (M, 3, H, W) for the rows ``keep`` (positions in the
    input list, M <= N) and ``(position, reason)`` for every row that could not be decoded."""

    images: torch.Tensor
    keep: list[int]
    failures: list[tuple[int, str]]


class ImageDecoder:
    """Byte strings -> one uint8 batch (N, 3, H, W) at ``size`` on ``device``.

    ``backend="cpu"``: torchvision's CPU decoders (PIL as the fallback), run where the call
    is (a DataLoader worker). ``backend="gpu"``: complete grey or YCbCr JPEGs are decoded
    together by nvJPEG on ``device`` (CUDA), one call per batch; anything nvJPEG refuses is
    retried alone, then on the CPU, as are CMYK JPEGs and other formats. Resizing (antialiased
    bilinear) runs on the images' device, batched over images of equal shape; on a GPU a
    batch of mixed shapes is resized at once (:func:`kdkit.data._resize.resize_mixed`).
    ``fit``: ``"squash"`` (whole image to ``size``) or ``"center"`` (shorter side to
    ``max(size) / crop_pct``, then center crop).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        *,
        backend: str = "cpu",
        device: torch.device | str | None = None,
        fit: str = "squash",
        crop_pct: float = 0.875,
    ) -> None:
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if backend not in DECODE_BACKENDS:
            raise KDError(f"decode backend must be one of {list(DECODE_BACKENDS)}, got {backend!r}")
        if fit not in FITS:
            raise KDError(f"fit must be one of {list(FITS)}, got {fit!r}")
        if min(h, w) < 1 or not 0 < crop_pct <= 1:
            raise KDError(f"need a positive size and 0 < crop_pct <= 1, got {(h, w)}, {crop_pct}")
        device = torch.device(device if device is not None else "cpu")
        if backend == "gpu" and device.type != "cuda":
            raise KDError(
                f"decode backend 'gpu' (nvJPEG) needs a CUDA device, got {str(device)!r}; "
                "use backend='cpu'"
            )
        self.size = (h, w)
        self.backend, self.device, self.fit, self.crop_pct = backend, device, fit, crop_pct

    def config(self) -> dict:
        """What decides the pixels (the decoder backend aside): part of dataset fingerprints."""
        return {"size": list(self.size), "fit": self.fit, "crop_pct": self.crop_pct}

    def __repr__(self) -> str:
        return (
            f"ImageDecoder(size={self.size}, backend={self.backend!r}, "
            f"device={str(self.device)!r}, fit={self.fit!r})"
        )

    def __call__(self, data: Sequence[torch.Tensor]) -> Decoded:
        decoded: list[torch.Tensor | None] = [None] * len(data)
        failures: dict[int, str] = {}
        todo_cpu = list(range(len(data)))
        if self.backend == "gpu":
            jpegs = [
                i
                for i in todo_cpu
                if is_jpeg(data[i], complete=True) and jpeg_components(data[i]) in (1, 3)
            ]
            for i, image in zip(jpegs, self._decode_gpu([data[i] for i in jpegs]), strict=True):
                decoded[i] = image
            todo_cpu = [i for i in todo_cpu if decoded[i] is None]
        for i in todo_cpu:
            try:
                decoded[i] = decode_cpu(data[i]).to(self.device, non_blocking=True)
            except ValueError as err:
                failures[i] = str(err)
        keep = [i for i, image in enumerate(decoded) if image is not None]
        images = self._fit_all([decoded[i] for i in keep])  # type: ignore[misc]
        return Decoded(images, keep, sorted(failures.items()))

    def _decode_gpu(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """nvJPEG for the whole list; a failing batch is retried image by image (``None``:
        nvJPEG refused it, the CPU decoder gets a try)."""
        if not data:
            return []
        with _quiet():
            try:
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                pass
            out: list[torch.Tensor | None] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def _fit_all(self, images: list[torch.Tensor]) -> torch.Tensor:
        h, w = self.size
        if not images:
            return torch.empty((0, 3, h, w), dtype=torch.uint8, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        if len(groups) > 1 and self.device.type == "cuda":
            # mixed shapes on the GPU: two batched matmuls, not one kernel chain per shape
            # (kdkit.data._resize); on a CPU worker the per-shape uint8 resize is cheaper
            shorter = None if self.fit == "squash" else round(max(h, w) / self.crop_pct)
            return resize_mixed(images, (h, w), shorter=shorter)
        chunks = [self.fit_images(torch.stack([images[i] for i in g])) for g in groups.values()]
        if len(chunks) == 1:
            return chunks[0]
        order = torch.tensor([i for g in groups.values() for i in g]).argsort()
        # non_blocking: a blocking host-to-device copy would wait for the whole GPU queue
        return torch.cat(chunks).index_select(0, order.to(self.device, non_blocking=True))

    def fit_images(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, h, w) of one shape -> uint8 (N, 3, H, W) by :attr:`fit`."""
        h, w = self.size
        if self.fit == "squash":
            if tuple(x.shape[-2:]) == (h, w):
                return x
            return TF.resize(x, [h, w], antialias=True)
        shorter = round(max(h, w) / self.crop_pct)
        return TF.center_crop(TF.resize(x, shorter, antialias=True), [h, w])


class EncodedImageDataset(Dataset):
    """Image files with labels; item ``i`` is ``(file bytes uint8 (L,), label, i)``.

    What DataLoader workers hand to an :class:`ImageDecoder`: reading is cheap, so the
    workers never decode. ``samples`` are ``(path, label)`` pairs; the position is the
    sample's index (the key of a teacher cache)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], classes: Sequence[str]) -> None:
        self.samples = [(Path(p), int(y)) for p, y in samples]
        self.classes = list(classes)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        path, label = self.samples[i]
        try:
            data = read_image_bytes(path)
        except OSError:  # unreadable: decoding an empty file fails, and it is counted then
            data = torch.empty(0, dtype=torch.uint8)
        return data, label, i

    def path(self, i: int) -> Path:
        return self.samples[i][0]

    def fingerprint(self) -> str:
        """sha256 over every file's content and label, in order (not over paths, so a moved
        folder keeps its caches); computed once, about 1 s per GB."""
        if self._fingerprint is None:
            h = hashlib.sha256(b"kdkit-encoded-images-v1")
            for path, label in self.samples:
                h.update(f"{label}:{sha256_file(path)};".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


class DecodedImageDataset(Dataset):
    """``encoded`` decoded one item at a time on the CPU: ``(uint8 (3, H, W), label, i)``.

    For what reads single items (cache precompute and its fidelity check); training batches
    come from :class:`~kdkit.data.ImageBytesLoader`. The fingerprint covers the files and
    the working size, not the decoder, so a cache serves CPU- and GPU-decoded runs alike.
    An unreadable file raises :class:`KDError` here: a cache needs every row."""

    def __init__(self, encoded: EncodedImageDataset, decoder: ImageDecoder) -> None:
        self.encoded = encoded
        self.decoder = ImageDecoder(
            decoder.size, backend="cpu", fit=decoder.fit, crop_pct=decoder.crop_pct
        )
        self.classes = encoded.classes

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        data, label, index = self.encoded[i]
        out = self.decoder([data])
        if out.failures:
            raise KDError(f"cannot decode image {self.encoded.path(i)}: {out.failures[0][1]}")
        return out.images[0], label, index

    def fingerprint(self) -> str:
        cfg = ",".join(f"{k}={v}" for k, v in sorted(self.decoder.config().items()))
        return hashlib.sha256(f"{self.encoded.fingerprint()}|{cfg}".encode()).hexdigest()
