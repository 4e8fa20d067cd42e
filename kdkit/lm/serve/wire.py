"""The bodies ``kdkit lm serve`` and its client exchange: safetensors bytes, checked on arrival.

Request (``POST /kdkit/v1/topk``), the rows to score, flattened:

===============  ============  ====================================================
array            dtype, shape  meaning
===============  ============  ====================================================
``input_ids``    int32 [T]     every row's token ids, one after the other
``doc_ids``      int32 [T]     each token's document within its row (packing)
``trainable``    uint8 [T]     1 where the token is a target (the cache's rows)
``row_lengths``  int64 [R]     tokens per row
===============  ============  ====================================================

with ``__metadata__`` ``{"format": "kdkit-served-rows", "version": "1", "topk": K,
"temperature": T, "mass": "0"|"1"}``. Response: ``ids`` int32 ``[E, K]``, ``logp`` float32
``[E, K]``, ``tail`` float32 ``[E]`` (and ``mass`` float64 ``[V]`` when asked), metadata
``{"format": "kdkit-served-topk", "version": "1", "fingerprint": ..., "topk", "temperature"}``:
exactly what a ``kdkit lm capture`` cache holds per trained position (:mod:`kdkit.lm.topk`),
in float32 (no q8 rounding). About ``8 K + 4`` bytes per token, no JSON floats.

Nothing received is trusted: :func:`decode_rows` (server) and :func:`decode_topk` (client)
check every dtype, shape, range and sum before an array is used, and each names what it
refused in one line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdkit.errors import KDError
from kdkit.lm.data import TokenRow
from kdkit.lm.topk import TopK

__all__ = [
    "VERSION",
    "INFO_PATH",
    "TOPK_PATH",
    "MEDIA_TYPE",
    "FINGERPRINT_HEADER",
    "Limits",
    "RowsRequest",
    "encode_rows",
    "decode_rows",
    "encode_topk",
    "decode_topk",
]

VERSION = 1
INFO_PATH = "/kdkit/v1/info"
TOPK_PATH = "/kdkit/v1/topk"
MEDIA_TYPE = "application/vnd.kdkit.safetensors"
FINGERPRINT_HEADER = "X-KDKit-Teacher"
_ROWS, _TOPK = "kdkit-served-rows", "kdkit-served-topk"
#: a probability mass off 1 by more than this is not a distribution (float32 sums of k terms)
MASS_TOLERANCE = 1e-3


class WireError(KDError):
    """A body that is not what the protocol says (the server answers HTTP 400 with it)."""


@dataclass(frozen=True)
class Limits:
    """What a server accepts in one request."""

    vocab_rows: int  # input ids must be below it
    vocab: int  # top-k ids come from the first ``vocab`` rows (padded rows are never a target)
    max_topk: int
    max_tokens: int
    max_positions: int | None = None


@dataclass(frozen=True)
class RowsRequest:
    rows: list[TokenRow]
    topk: int
    temperature: float
    mass: bool


def _header(body: bytes, what: str) -> dict[str, Any]:
    """The safetensors header of ``body`` (bounded by the body's own size), checked."""
    if len(body) < 8:
        raise WireError(f"{what}: {len(body)} bytes is not a safetensors body")
    size = int.from_bytes(body[:8], "little")
    if not 0 < size <= len(body) - 8:
        raise WireError(f"{what}: its header declares {size} bytes of {len(body) - 8}")
    try:
        header = json.loads(body[8 : 8 + size])
    except (ValueError, RecursionError):
        raise WireError(f"{what}: its header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise WireError(f"{what}: its header has no __metadata__")
    return header


def _arrays(body: bytes, want: dict[str, str], what: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(metadata, arrays)``: exactly the arrays ``want`` names, each of its dtype."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    header = _header(body, what)
    names = sorted(k for k in header if k != "__metadata__")
    if names != sorted(want):
        raise WireError(f"{what}: arrays {names}, expected {sorted(want)}")
    for name, dtype in want.items():
        if not isinstance(header[name], dict) or header[name].get("dtype") != dtype:
            raise WireError(f"{what}: {name!r} is not {dtype}")
    try:
        arrays = load(body)
    except (SafetensorError, ValueError) as err:
        raise WireError(f"{what}: {str(err).splitlines()[0]}") from None
    return header["__metadata__"], arrays


def _meta_number(meta: dict, key: str, kind: type, what: str) -> Any:
    try:
        return kind(meta[key])
    except (KeyError, TypeError, ValueError):
        raise WireError(f"{what}: metadata {key!r} missing or not a number") from None


def _check_format(meta: dict, name: str, what: str) -> None:
    if meta.get("format") != name or meta.get("version") != str(VERSION):
        raise WireError(
            f"{what}: format {meta.get('format')!r} version {meta.get('version')!r}; this kdkit "
            f"speaks {name} version {VERSION} (run the same kdkit on both machines)"
        )


# -- requests ---------------------------------------------------------------------------------
def encode_rows(rows: list[TokenRow], *, topk: int, temperature: float, mass: bool) -> bytes:
    from safetensors.numpy import save

    arrays = {
        "input_ids": np.concatenate([r.input_ids.numpy() for r in rows]).astype(np.int32),
        "doc_ids": np.concatenate([r.doc_ids.numpy() for r in rows]).astype(np.int32),
        "trainable": np.concatenate([r.trainable.numpy() for r in rows]).astype(np.uint8),
        "row_lengths": np.asarray([len(r) for r in rows], dtype=np.int64),
    }
    meta = {"format": _ROWS, "version": str(VERSION), "topk": str(topk),
            "temperature": repr(float(temperature)), "mass": "1" if mass else "0"}  # fmt: skip
    return save(arrays, metadata=meta)


def decode_rows(body: bytes, limits: Limits) -> RowsRequest:
    """The rows of a request body, every value in range for ``limits`` (else :class:`WireError`)."""
    what = "the request"
    want = {"input_ids": "I32", "doc_ids": "I32", "trainable": "U8", "row_lengths": "I64"}
    meta, a = _arrays(body, want, what)
    _check_format(meta, _ROWS, what)
    k = _meta_number(meta, "topk", int, what)
    temperature = _meta_number(meta, "temperature", float, what)
    if not 1 <= k <= min(limits.max_topk, limits.vocab):
        raise WireError(f"topk {k} outside [1, {min(limits.max_topk, limits.vocab)}]")
    if not (math.isfinite(temperature) and 0 < temperature <= 100):
        raise WireError(f"temperature {temperature!r} outside (0, 100]")
    ids, doc, trainable, lengths = a["input_ids"], a["doc_ids"], a["trainable"], a["row_lengths"]
    t = ids.shape[0]
    if ids.ndim != 1 or doc.shape != (t,) or trainable.shape != (t,) or lengths.ndim != 1:
        raise WireError(f"{what}: input_ids, doc_ids and trainable must be [T] alike")
    if not 0 < t <= limits.max_tokens:
        raise WireError(f"{what} holds {t} tokens; this server takes 1 to {limits.max_tokens}")
    longest = limits.max_positions or t
    if lengths.size == 0 or lengths.min() < 1 or lengths.max() > longest or lengths.sum() != t:
        raise WireError(f"row_lengths must be >= 1, at most {longest} and sum to {t}")
    if ids.min() < 0 or ids.max() >= limits.vocab_rows:
        raise WireError(f"token ids outside [0, {limits.vocab_rows})")
    if trainable.max() > 1 or doc.min() < 0:
        raise WireError("trainable must be 0/1 and doc_ids >= 0")
    rows, start = [], 0
    for n in lengths.tolist():
        d = doc[start : start + n]
        if n > 1 and (np.diff(d) < 0).any():
            raise WireError("doc_ids must not decrease within a row")
        rows.append(TokenRow(torch.from_numpy(ids[start : start + n].astype(np.int64)),
                             torch.from_numpy(trainable[start : start + n].astype(bool)),
                             torch.from_numpy(d.astype(np.int64))))  # fmt: skip
        start += n
    return RowsRequest(rows, k, temperature, meta.get("mass") == "1")


# -- responses --------------------------------------------------------------------------------
def encode_topk(top: TopK, *, fingerprint: str, topk: int, temperature: float) -> bytes:
    from safetensors.numpy import save

    arrays = {
        "ids": top.ids.to(torch.int32).cpu().numpy(),
        "logp": top.logp.float().cpu().numpy(),
        "tail": top.tail.float().cpu().numpy(),
    }
    if top.mass is not None:
        arrays["mass"] = top.mass.double().cpu().numpy()
    meta = {"format": _TOPK, "version": str(VERSION), "fingerprint": fingerprint,
            "topk": str(topk), "temperature": repr(float(temperature))}  # fmt: skip
    return save(arrays, metadata=meta)


def decode_topk(
    body: bytes,
    *,
    entries: int,
    topk: int,
    vocab: int,
    temperature: float,
    fingerprint: str,
    mass: bool = False,
) -> TopK:
    """A response body as a :class:`TopK`, refused (:class:`KDError`, never trained on) unless
    it is the answer asked for: the teacher's fingerprint, ``entries`` rows of ``topk`` distinct
    ids below ``vocab`` by decreasing finite log-probability, and a tail that completes them to
    one distribution."""
    what = "the served teacher's answer"
    want = {"ids": "I32", "logp": "F32", "tail": "F32", **({"mass": "F64"} if mass else {})}
    meta, a = _arrays(body, want, what)
    _check_format(meta, _TOPK, what)
    if meta.get("fingerprint") != fingerprint:
        raise KDError(
            f"the served teacher changed mid-run (fingerprint {str(meta.get('fingerprint'))[:12]} "
            f"now, {fingerprint[:12]} when the run started): refused; serve the run's teacher "
            "again (kdkit lm serve) and resume"
        )
    got = (_meta_number(meta, "topk", int, what), _meta_number(meta, "temperature", float, what))
    if got != (topk, float(temperature)):
        raise KDError(f"{what} is for topk/temperature {got}, asked {(topk, temperature)}")
    ids, logp, tail = a["ids"], a["logp"], a["tail"]
    if ids.shape != (entries, topk) or logp.shape != (entries, topk) or tail.shape != (entries,):
        raise KDError(
            f"{what} has shapes ids {ids.shape}, logp {logp.shape}, tail {tail.shape}; asked for "
            f"{entries} positions x {topk}: refused"
        )
    check_topk_arrays(ids.astype(np.int64), logp, tail, vocab, what)
    if mass and (a["mass"].shape != (vocab,) or not np.isfinite(a["mass"]).all()):
        raise KDError(f"{what}: its mass is not {vocab} finite numbers: refused")
    return TopK(
        torch.from_numpy(ids.astype(np.int64)),
        torch.from_numpy(logp.copy()),
        torch.from_numpy(tail.copy()),
        torch.from_numpy(a["mass"].copy()) if mass else None,
    )


def check_topk_arrays(
    ids: np.ndarray, logp: np.ndarray, tail: np.ndarray, vocab: int, what: str
) -> None:
    """Refuse top-k arrays that are not a teacher's top k: ids outside ``[0, vocab)`` or repeated
    within a position, log-probs not finite, above 0 or not decreasing, a tail that is NaN or
    +inf, or a total mass off 1 (all one-line :class:`KDError` s naming the first offence)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise KDError(f"{what} holds token ids outside [0, {vocab}): refused")
    if ids.shape[1] > 1 and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
        raise KDError(f"{what} repeats a token id within a position: refused")
    if not np.isfinite(logp).all() or np.isnan(tail).any() or (tail == np.inf).any():
        raise KDError(f"{what} holds a non-finite log-probability: refused")
    if logp.size and (logp.max() > MASS_TOLERANCE or (np.diff(logp, axis=1) > 0).any()):
        raise KDError(f"{what}: log-probabilities above 0 or not in decreasing order: refused")
    total = np.logaddexp(np.logaddexp.reduce(logp.astype(np.float64), axis=1), tail)
    if total.size and np.abs(total).max() > MASS_TOLERANCE:
        worst = float(np.exp(total[np.abs(total).argmax()]))
        raise KDError(f"{what}: a position's top k and tail sum to {worst:.6g}, not 1: refused")
