"""The teacher cache's ``meta.json``: parsed and checked with the standard library only.

Kept apart from :mod:`kdkit.cache.store` (numpy, torch) on the ground floor, so that
``kdkit cache info`` reads a cache's description without importing torch: it starts in a
fraction of a second. The format itself is described in :mod:`kdkit.cache.store`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdkit._io import sha256_bytes
from kdkit.errors import KDError

__all__ = [
    "FEATURES_VERSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "feature_key",
    "info_lines",
    "INDEX_NAME",
    "META_NAME",
    "MIX_ARRAYS",
    "VALUE_DTYPES",
    "read_meta",
    "seal_meta",
    "shard_file_name",
    "views_mix",
    "written_lines",
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


#: value dtypes a cache may hold: config name -> numpy dtype name
VALUE_DTYPES = {"fp16": "float16", "fp32": "float32"}


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


def read_meta(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and sanity-check ``meta.json``; :class:`KDError` on anything unexpected."""
    path = Path(cache_dir) / META_NAME
    if not path.is_file():
        raise KDError(
            f"{cache_dir} is not a teacher cache: no {META_NAME} (an unfinished precompute "
            "writes it last; rerun precompute to finish it)"
        )
    from kdkit._io import read_json

    meta = read_json(path)
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
    if meta["dtype"] not in VALUE_DTYPES:
        raise KDError(f"{path}: dtype must be one of {list(VALUE_DTYPES)}, got {meta['dtype']!r}")
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
                if entry["dtype"] != VALUE_DTYPES[meta["dtype"]]:
                    raise KDError(
                        f"{path}: shard {i}'s {key} dtype {entry['dtype']!r} is not allowed"
                    )
                want_shape = [stop - start, views, *feature_shapes[key]]
            else:
                want_dtype = VALUE_DTYPES[meta["dtype"]] if key == "values" else None
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


def info_lines(cache_dir: str | os.PathLike) -> list[str]:
    """``kdkit cache info DIR``: what a cache holds, from its meta alone (no torch)."""
    meta = read_meta(cache_dir)
    size = sum(p.stat().st_size for p in Path(cache_dir).iterdir() if p.is_file())
    rows = meta["num_samples"] * meta["num_views"]
    kind = f"top-{meta['topk']} ({meta['index_dtype']} indices)" if meta["topk"] else "full"
    return [
        f"cache           {cache_dir} (format version {meta['format_version']})",
        f"samples         {meta['num_samples']} x {meta['num_views']} views",
        f"logits          {kind}, {meta['dtype']} values, {meta['num_classes']} classes",
        f"views           {meta['views']}",
        f"normalization   {meta.get('normalization')}",
        f"features        {meta.get('features') or 'none (logits only)'}",
        f"teacher         {meta['teacher_fingerprint'][:16]}...",
        f"dataset         {meta['dataset_fingerprint'][:16]}...",
        f"shards          {len(meta['shards'])} of <= {meta['shard_size']} samples",
        f"size on disk    {size / 2**20:.1f} MiB ({size / rows:.1f} bytes per sample-view)",
        f"source          {meta.get('source')}",
    ]


def written_lines(out: str | os.PathLike, unreadable: Any = None) -> list[str]:
    """What ``kdkit precompute`` says of the cache it wrote to ``out``."""
    meta = read_meta(out)
    logits = f"{'top-' + str(meta['topk']) if meta['topk'] else 'full'} {meta['dtype']} logits"
    lines = [
        f"wrote {out}: {meta['num_samples']} samples x {meta['num_views']} views, {logits}, "
        f"{len(meta['shards'])} shards"
    ]
    if meta.get("features"):
        shapes = ", ".join(f"{n} {tuple(f['shape'])}" for n, f in meta["features"].items())
        lines.append(f"teacher features: {shapes} (for the config's feature pairs)")
    if unreadable is not None and unreadable.count:
        lines.append(f"{unreadable.summary()} (placeholder rows, never read in training)")
    return lines
