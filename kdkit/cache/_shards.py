"""Shard files of a cache being written: through :func:`kdkit._io.atomic_path`, then a sidecar.

Split from :mod:`kdkit.cache.precompute` so the resumability rules live in one place: a shard
counts as done only when its sidecar carries this run's key and range and its files still hash
to the recorded sha256; ``meta.json`` is assembled from the sidecars, last.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from kdkit._io import atomic_path, atomic_write_json, sha256_file
from kdkit.cache.store import (
    DTYPES,
    INDEX_NAME,
    META_NAME,
    MIX_ARRAYS,
    feature_key,
    first_difference,
    seal_meta,
    shard_file_name,
    views_mix,
)
from kdkit.errors import KDError

__all__ = ["ShardWriter", "shard_is_done", "check_existing", "finish"]

log = logging.getLogger(__name__)


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_is_done(
    out: Path, i: int, start: int, stop: int, run_key: str, check_sha: bool = True
) -> dict | None:
    """Shard ``i``'s sidecar record when the shard is finished for this run, else ``None``."""
    sidecar = out / f"{_shard_name(i)}.json"
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    if (record.get("run_key"), record.get("start"), record.get("stop")) != (run_key, start, stop):
        return None
    for entry in record.get("files", {}).values():
        path = out / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return None
        if check_sha and sha256_file(path) != entry["sha256"]:
            log.warning("shard %s fails its checksum; recomputing it", path.name)
            return None
    return record


class ShardWriter:
    """Writes one shard's arrays through ``open_memmap`` into temporary files.

    Use as a context manager: the files replace the final names only in :meth:`commit`; an
    exception before that removes the temporaries (a killed process leaves them to
    :func:`kdkit._io.clean_stale_temps`).
    """

    def __init__(self, out: Path, i: int, n: int, spec: dict[str, Any]) -> None:
        self.out, self.i, self.name = out, i, _shard_name(i)
        k, width = spec["num_views"], spec["topk"] or spec["num_classes"]
        shapes = {"values": ((n, k, width), DTYPES[spec["dtype"]])}
        if spec["topk"]:
            shapes["indices"] = ((n, k, width), np.dtype(spec["index_dtype"]))
        if views_mix(spec.get("views")):  # the partner and share of every mixed view
            shapes.update({key: ((n, k), np.dtype(dt)) for key, dt in MIX_ARRAYS.items()})
        for name, feature in (spec.get("features") or {}).items():  # format 4
            shapes[feature_key(name)] = ((n, k, *feature["shape"]), DTYPES[spec["dtype"]])
        self.arrays: dict[str, np.memmap] = {}
        self.tmp: dict[str, Path] = {}
        self._files = contextlib.ExitStack()
        for key, (shape, dtype) in shapes.items():
            tmp = self._files.enter_context(atomic_path(out / shard_file_name(i, key)))
            self.tmp[key] = tmp
            self.arrays[key] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.arrays.clear()
        return bool(self._files.__exit__(*exc))

    def commit(self, start: int, stop: int, run_key: str) -> dict[str, Any]:
        files = {}
        for key in list(self.arrays):
            array = self.arrays.pop(key)
            array.flush()
            shape, dtype = list(array.shape), str(array.dtype)
            del array
            tmp = self.tmp[key]
            files[key] = {
                "file": shard_file_name(self.i, key),
                "shape": shape,
                "dtype": dtype,
                "bytes": tmp.stat().st_size,
                "sha256": sha256_file(tmp),
            }
        self._files.close()  # fsync and os.replace every array
        record = {"run_key": run_key, "start": start, "stop": stop, "files": files}
        atomic_write_json(self.out / f"{self.name}.json", record)
        return record


def check_existing(out: Path, spec: dict[str, Any], overwrite: bool, rank: int) -> None:
    meta_path = out / META_NAME
    if not meta_path.is_file():
        return
    try:
        old = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        old = {}
    diff = first_difference(old, spec)
    if diff is None:
        return
    if not overwrite:
        raise KDError(
            f"{out} already holds a different teacher cache ({diff}); pass overwrite=True "
            "(--overwrite) to replace it, or choose another directory"
        )
    if rank == 0:
        log.warning("replacing the cache in %s (%s)", out, diff)
        meta_path.unlink(missing_ok=True)


def _write_index(out: Path, keys: np.ndarray) -> dict[str, Any]:
    with atomic_path(out / INDEX_NAME) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, keys, allow_pickle=False)
        entry = {
            "file": INDEX_NAME,
            "shape": list(keys.shape),
            "dtype": str(keys.dtype),
            "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp),
        }
    return entry


def finish(
    out: Path, spec: dict, num_shards: int, bounds, run_key: str, source, keys: np.ndarray | None
) -> None:
    """Rank 0, after every shard is written: index file, leftovers removed, then meta.json."""
    shards = []
    for i in range(num_shards):
        # hashed when resuming or writing: here only presence, run key and size are checked
        record = shard_is_done(out, i, *bounds(i), run_key, check_sha=False)
        if record is None:
            raise KDError(f"shard {i} of {out} is missing after precompute; rerun to resume")
        shards.append({"start": record["start"], "stop": record["stop"], "files": record["files"]})
    index_file = None if keys is None else _write_index(out, keys)
    keep = {META_NAME} | {f"{_shard_name(i)}.json" for i in range(num_shards)}
    keep |= {e["file"] for s in shards for e in s["files"].values()}
    for path in [*out.glob("shard-*"), *out.glob(f"{INDEX_NAME}*")]:  # leftovers
        if path.name not in keep and path.name != INDEX_NAME:
            path.unlink(missing_ok=True)
    if keys is None:
        (out / INDEX_NAME).unlink(missing_ok=True)
    meta = {**spec, "shards": shards, "index_file": index_file, "source": source or {}}
    atomic_write_json(out / META_NAME, seal_meta(meta))
