"""On-disk format of the teacher cache (see docs/cache-format.md).

A cache is a directory: ``meta.json`` (format version, fingerprints, layout, shard list with
sha256) and per-shard ``.npy`` arrays read through ``np.load(mmap_mode="r")``, never pickle.
Shard ``i`` holds samples ``[i * shard_size, min((i + 1) * shard_size, N))`` in files named
``shard-0000i.values.npy`` (and ``.indices.npy``): ``values`` (n, K, C) full logits or
(n, K, k) top-k logits, and for top-k ``indices`` (n, K, k) int16/int32, K views per sample.

The meta file protects itself: ``meta_sha256`` is the sha256 of the rest of it, and every
shard's range, file name and rows are checked against that layout, so an edited meta (ranges
shifted by a few rows, two shards swapped) is refused instead of serving other samples'
logits. Format version 1 caches (no ``meta_sha256``) still load with the layout checks.

Format version 3 adds, for caches precomputed with mixing views (mixup/CutMix), two more
arrays per shard: ``partner`` (n, K) int64, the dataset index of the image mixed into each
stored view, and ``lam`` (n, K) float32, the sample's share of the mixture; a run compares
them with its own sampler's to prove it replays the same mixed images. Versions 1 and 2
(never mixed) still load.

Format version 4 caches also hold named teacher features (the CLIP image embedding, a
module's output): ``features`` in the meta maps each name to its per-sample ``shape``, and
every shard has a ``feature-NAME`` array (n, K, *shape) in the cache's dtype, so feature pairs
(``("fc", "embedding")``) replay from the cache too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdkit._fingerprint import module_fingerprint
from kdkit._io import atomic_write_json, sha256_bytes, sha256_file
from kdkit.errors import KDError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "META_NAME",
    "INDEX_NAME",
    "DTYPES",
    "read_meta",
    "open_shards",
    "open_index",
    "verify",
    "sha256_file",
    "atomic_write_json",
    "index_dtype_for",
    "teacher_fingerprint",
    "dataset_fingerprint",
    "first_difference",
    "stat_json",
    "seal_meta",
    "shard_file_name",
    "views_mix",
    "MIX_ARRAYS",
    "FEATURES_VERSION",
    "feature_key",
]

FORMAT_NAME = "kdkit-teacher-cache"
FORMAT_VERSION = 3
#: caches that also store named teacher features (``features`` in the meta) are version 4
FEATURES_VERSION = 4
_READABLE_VERSIONS = (1, 2, 3, 4)
#: per-shard arrays of a mixing cache, shape (n, K): name -> dtype
MIX_ARRAYS = {"partner": "int64", "lam": "float32"}
META_NAME = "meta.json"
INDEX_NAME = "index.npy"
DTYPES = {"fp16": np.float16, "fp32": np.float32}
_REQUIRED = (
    "format_version",
    "teacher_fingerprint",
    "dataset_fingerprint",
    "num_samples",
    "views",
    "num_views",
    "dtype",
    "topk",
    "num_classes",
    "shard_size",
    "shards",
)


def index_dtype_for(num_classes: int) -> str:
    """Smallest signed integer type that holds every class index."""
    return "int16" if num_classes <= np.iinfo(np.int16).max + 1 else "int32"


def views_mix(views: Any) -> bool:
    """Whether a cache's ``views`` config (meta) mixes images (then shards hold partners)."""
    if not isinstance(views, Mapping):
        return False
    return any(float(views.get(k) or 0.0) > 0.0 for k in ("mixup", "cutmix"))


def feature_key(name: str) -> str:
    """The shard array key of teacher feature ``name`` (``feature-embedding``)."""
    return f"feature-{name}"


def shard_file_name(i: int, key: str) -> str:
    """``shard-00007.values.npy``: the only name shard ``i``'s ``key`` array may have."""
    return f"shard-{i:05d}.{key}.npy"


def _meta_digest(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def seal_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` plus ``meta_sha256``, the checksum :func:`read_meta` verifies."""
    return {**meta, "meta_sha256": _meta_digest(meta)}


def first_difference(have: Mapping[str, Any], want: Mapping[str, Any]) -> str | None:
    """The first key (in ``want``'s order) whose values differ, as ``key: have vs want``."""
    for key, value in want.items():
        if have.get(key) != value:
            return f"{key}: cache has {have.get(key)!r}, this run has {value!r}"
    return None


def teacher_fingerprint(teacher: Any) -> str:
    """Fingerprint of a Teacher backend, an ``nn.Module``, or a fingerprint string."""
    if isinstance(teacher, str):
        return teacher
    if isinstance(teacher, nn.Module):
        return module_fingerprint(teacher)
    fingerprint = getattr(teacher, "fingerprint", None)
    if not callable(fingerprint):
        raise KDError(f"cannot fingerprint a teacher of type {type(teacher).__name__}")
    return str(fingerprint())


def dataset_fingerprint(dataset: Any) -> str:
    """``dataset.fingerprint()`` when it has one, else sha256 over every item (a full pass).

    A string is taken as an already computed fingerprint.
    """
    if isinstance(dataset, str):
        return dataset
    fingerprint = getattr(dataset, "fingerprint", None)
    if callable(fingerprint):
        return str(fingerprint())
    h = hashlib.sha256(f"{type(dataset).__qualname__}:{len(dataset)}".encode())
    for i in range(len(dataset)):
        item = dataset[i]
        image = torch.as_tensor(item[0]).contiguous()
        h.update(f"{tuple(image.shape)}:{image.dtype}:{int(item[1])}".encode())
        h.update(image.numpy().tobytes())
    return h.hexdigest()


def stat_json(v: Any) -> float | list[float] | None:
    """Per-channel mean/std as JSON (float, list of floats or None) for the meta file."""
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float64)
    return float(t) if t.dim() == 0 else [float(e) for e in t.reshape(-1)]


def read_meta(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and sanity-check ``meta.json``; :class:`KDError` on anything unexpected."""
    path = Path(cache_dir) / META_NAME
    if not path.is_file():
        raise KDError(
            f"{cache_dir} is not a teacher cache: no {META_NAME} (an unfinished precompute "
            "writes it last; rerun precompute to finish it)"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KDError(f"{path} is not valid JSON ({err})") from None
    except OSError as err:
        raise KDError(f"cannot read {path} ({err.strerror or err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise KDError(f"{path} is not a kdkit teacher cache (format != {FORMAT_NAME!r})")
    if meta.get("format_version") not in _READABLE_VERSIONS:
        raise KDError(
            f"format_version: cache has {meta.get('format_version')!r}, this kdkit reads "
            f"{list(_READABLE_VERSIONS)}; precompute the cache again"
        )
    if meta["format_version"] >= 2 and meta.get("meta_sha256") != _meta_digest(meta):
        raise KDError(
            f"{path} fails its checksum (meta_sha256): the file was edited or corrupted after "
            "precompute wrote it; precompute the cache again"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise KDError(f"{path} lacks fields {missing}")
    if meta["dtype"] not in DTYPES:
        raise KDError(f"{path}: dtype must be one of {list(DTYPES)}, got {meta['dtype']!r}")
    meta.setdefault("index_file", None)
    try:
        _check_layout(meta, path)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise KDError(f"{path} is malformed ({type(err).__name__}: {err})") from None
    return meta


def _positive_int(meta: Mapping[str, Any], key: str, path: Path) -> int:
    value = meta[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise KDError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _check_layout(meta: dict[str, Any], path: Path) -> None:
    """Shards are contiguous, cover [0, num_samples) in ``shard_size`` steps, are named by
    their position, and each array's rows and columns match its range and the cache."""
    n = _positive_int(meta, "num_samples", path)
    size = _positive_int(meta, "shard_size", path)
    views = _positive_int(meta, "num_views", path)
    classes = _positive_int(meta, "num_classes", path)
    topk = meta["topk"]
    if topk is not None and (not isinstance(topk, int) or not 1 <= topk <= classes):
        raise KDError(f"{path}: topk must be None or in [1, {classes}], got {topk!r}")
    shards = meta["shards"]
    if not isinstance(shards, list) or len(shards) != -(-n // size):
        count = len(shards) if isinstance(shards, list) else shards
        raise KDError(
            f"{path}: {count} shards for {n} samples of <= {size}; expected {-(-n // size)}"
        )
    keys = {"values", "indices"} if topk else {"values"}
    mix = views_mix(meta["views"])
    if mix and meta["format_version"] < 3:
        raise KDError(f"{path}: mixing views need format_version >= 3")
    if mix:
        keys |= set(MIX_ARRAYS)
    features = meta.get("features") or {}
    if features and meta["format_version"] < FEATURES_VERSION:
        raise KDError(f"{path}: teacher features need format_version >= {FEATURES_VERSION}")
    feature_shapes = {feature_key(n): list(f["shape"]) for n, f in features.items()}
    keys |= set(feature_shapes)
    width = topk or classes
    for i, shard in enumerate(shards):
        start, stop = i * size, min((i + 1) * size, n)
        if (shard.get("start"), shard.get("stop")) != (start, stop):
            raise KDError(
                f"{path}: shard {i} covers {shard.get('start')}..{shard.get('stop')}, expected "
                f"{start}..{stop}: shard ranges must be contiguous and cover the {n} samples"
            )
        files = shard["files"]
        if set(files) != keys:
            raise KDError(f"{path}: shard {i} has arrays {sorted(files)}, expected {sorted(keys)}")
        for key, entry in files.items():
            if entry["file"] != shard_file_name(i, key):
                raise KDError(
                    f"{path}: shard {i}'s {key} file is {entry['file']!r}, expected "
                    f"{shard_file_name(i, key)!r} (shards swapped or renamed)"
                )
            if key in MIX_ARRAYS:
                if entry["dtype"] != MIX_ARRAYS[key]:
                    raise KDError(
                        f"{path}: shard {i}'s {key} dtype {entry['dtype']!r} is not allowed"
                    )
                want_shape = [stop - start, views]
            elif key in feature_shapes:
                if entry["dtype"] != np.dtype(DTYPES[meta["dtype"]]).name:
                    raise KDError(
                        f"{path}: shard {i}'s {key} dtype {entry['dtype']!r} is not allowed"
                    )
                want_shape = [stop - start, views, *feature_shapes[key]]
            else:
                want_dtype = np.dtype(DTYPES[meta["dtype"]]).name if key == "values" else None
                if (want_dtype or entry["dtype"]) != entry["dtype"] or entry["dtype"] not in (
                    "float16",
                    "float32",
                    "int16",
                    "int32",
                ):
                    raise KDError(
                        f"{path}: shard {i}'s {key} dtype {entry['dtype']!r} is not allowed"
                    )
                want_shape = [stop - start, views, width]
            if list(entry["shape"]) != want_shape:
                raise KDError(
                    f"{path}: shard {i}'s {key} array has shape {entry['shape']}, expected "
                    f"{want_shape} for samples {start}..{stop}"
                )
    index = meta["index_file"]
    if index is not None and (index["file"] != INDEX_NAME or list(index["shape"]) != [n]):
        raise KDError(f"{path}: index_file must be {INDEX_NAME} of shape [{n}], got {index}")


def _open_array(cache_dir: Path, entry: Mapping[str, Any], check_sha: bool) -> np.ndarray:
    path = cache_dir / entry["file"]
    if not path.is_file():
        raise KDError(f"shard file {path} is missing; rerun precompute to rebuild it")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise KDError(f"shard file {path} is truncated or unreadable ({err})") from None
    if list(array.shape) != list(entry["shape"]) or str(array.dtype) != entry["dtype"]:
        raise KDError(
            f"shard file {path} holds {array.dtype} {list(array.shape)}, meta says "
            f"{entry['dtype']} {entry['shape']}"
        )
    if path.stat().st_size != entry["bytes"]:
        raise KDError(
            f"shard file {path} is truncated or extended: {path.stat().st_size} bytes, "
            f"meta says {entry['bytes']}"
        )
    if check_sha:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise KDError(
                f"shard file {path} fails its checksum (sha256 {digest[:12]}..., meta says "
                f"{entry['sha256'][:12]}...): the file was modified or corrupted; rerun "
                "precompute to rebuild it"
            )
    return array


def open_shards(
    cache_dir: str | os.PathLike, meta: Mapping[str, Any], check_sha: bool = True
) -> list[dict[str, np.ndarray]]:
    """Memory-map every shard's arrays (``{"values": ..., "indices": ...}`` per shard).

    Sizes, shapes and dtypes are always checked; ``check_sha`` also hashes every byte (one
    sequential read of the whole cache).
    """
    cache_dir = Path(cache_dir)
    return [
        {name: _open_array(cache_dir, entry, check_sha) for name, entry in s["files"].items()}
        for s in meta["shards"]
    ]


def open_index(
    cache_dir: str | os.PathLike, meta: Mapping[str, Any], check_sha: bool = True
) -> np.ndarray | None:
    """The sample index of every row (int64 (N,)), or ``None`` when row ``i`` is index ``i``."""
    if meta.get("index_file") is None:
        return None
    keys = np.array(_open_array(Path(cache_dir), meta["index_file"], check_sha))
    if keys.shape != (meta["num_samples"],):
        raise KDError(f"{INDEX_NAME} holds {keys.shape[0]} indices for {meta['num_samples']} rows")
    want = meta.get("index_sha256")
    if want is not None and sha256_bytes(keys.astype(np.int64).tobytes()) != want:
        raise KDError(
            f"{INDEX_NAME} in {cache_dir} does not hold the sample indices precompute recorded "
            "(index_sha256 differs); precompute the cache again"
        )
    if len(np.unique(keys)) != keys.size:
        raise KDError(f"{INDEX_NAME} in {cache_dir} repeats sample indices; precompute again")
    return keys


def verify(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Check meta, coverage, every shard's size, shape and sha256; return the meta.

    Raises :class:`KDError` naming the first problem found.
    """
    meta = read_meta(cache_dir)
    open_shards(cache_dir, meta, check_sha=True)
    open_index(cache_dir, meta, check_sha=True)
    return meta
