"""Compact encodings of a top-k cache's arrays, each exact to a stated bound.

Token ids are the lever (shared/LM-ANCHORS.md: 84% of DistillKit's bytes are ids): they are
bit-packed in ``ceil(log2 V)`` bits each. Log-probabilities come sorted (``torch.topk``), so
``q8`` stores the top value in fp16 and every other as an 8-bit offset below it with a per-token
scale (the largest offset / 255): the error is at most ``scale / 2`` per value, about 0.02 nats
for a 10-nat spread. ``f16`` keeps each value in fp16 (error ~5e-4 relative).

Pure numpy, so DataLoader workers decode without torch's thread pool.
"""

from __future__ import annotations

import math

import numpy as np

from kdkit.errors import KDError

__all__ = ["ENCODINGS", "id_bits", "pack_ids", "unpack_ids", "encode_logp", "decode_logp"]

ENCODINGS = ("f16", "q8")


def id_bits(vocab: int) -> int:
    """Bits per token id for a vocabulary of ``vocab`` rows (at least 1)."""
    return max(1, math.ceil(math.log2(max(vocab, 2))))


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """``ids`` (any shape, values < 2**bits) as a little-endian bit stream of ``bits`` each."""
    flat = np.ascontiguousarray(ids, dtype=np.uint32).reshape(-1)
    if flat.size and int(flat.max()) >= 1 << bits:
        raise KDError(f"token id {int(flat.max())} does not fit {bits} bits")
    shifts = np.arange(bits, dtype=np.uint32)
    stream = ((flat[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_ids(packed: np.ndarray, bits: int, start: int, count: int) -> np.ndarray:
    """Ids ``start .. start+count`` (in id units) of a stream made by :func:`pack_ids`."""
    first, last = start * bits, (start + count) * bits
    lo, hi = first // 8, -(-last // 8)
    stream = np.unpackbits(np.asarray(packed[lo:hi]), bitorder="little")
    stream = stream[first - lo * 8 : first - lo * 8 + count * bits].reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.int64)).astype(np.int64)
    return stream.astype(np.int64) @ weights


def encode_logp(logp: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """Sorted ``[E, k]`` log-probabilities -> the arrays of ``encoding``."""
    if encoding == "f16":
        return {"topk_logp": logp.astype(np.float16)}
    if encoding == "q8":
        top = logp[:, :1].astype(np.float16)
        offsets = top.astype(np.float32) - logp[:, 1:]
        span = np.maximum(offsets.max(axis=1, initial=0.0), 1e-6)
        scale = (span / 255.0).astype(np.float16)
        step = np.maximum(scale.astype(np.float32), 1e-12)[:, None]
        q = np.clip(np.rint(offsets / step), 0, 255).astype(np.uint8)
        return {"topk_top": top[:, 0], "topk_scale": scale, "topk_q": q}
    raise KDError(f"unknown log-prob encoding {encoding!r}; expected one of {list(ENCODINGS)}")


def decode_logp(arrays: dict[str, np.ndarray], encoding: str, rows: slice) -> np.ndarray:
    """The ``[rows, k]`` float32 log-probabilities of entries ``rows``."""
    if encoding == "f16":
        return np.asarray(arrays["topk_logp"][rows], dtype=np.float32)
    top = np.asarray(arrays["topk_top"][rows], dtype=np.float32)[:, None]
    scale = np.asarray(arrays["topk_scale"][rows], dtype=np.float32)[:, None]
    rest = top - np.asarray(arrays["topk_q"][rows], dtype=np.float32) * scale
    return np.concatenate([top, rest], axis=1)
