"""Run a teacher once over a dataset (K views per sample) and store its outputs on disk.

Resumable: every shard is written under a temporary name, ``os.replace``d into place, and
then recorded in a small sidecar (``shard-00007.json``: range, files, sha256 and the run key,
a hash of everything that defines the cache's contents). A rerun keeps each shard whose
sidecar matches this run and whose bytes still hash to the recorded sha256, and redoes the
rest. ``meta.json`` is written last, so a directory with a meta file is a finished cache.

Under ``torchrun`` each rank computes shards ``i`` with ``i % world == rank``; rank 0 writes
the meta file after a barrier.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Subset
from tqdm.auto import tqdm

from kdkit._io import sha256_bytes
from kdkit._launch import join, launch_env
from kdkit._lock import folder_lock
from kdkit.cache._shards import ShardWriter, check_existing, finish, shard_is_done
from kdkit.cache.store import (
    DTYPES,
    FEATURES_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    dataset_fingerprint,
    feature_key,
    index_dtype_for,
    stat_json,
    teacher_fingerprint,
)
from kdkit.data.views import MixPool, ViewSampler, prepare_input
from kdkit.errors import KDError
from kdkit.teachers.base import Teacher
from kdkit.teachers.factory import make_teacher

__all__ = ["KIND", "precompute", "dataset_keys"]

#: the kind of folder precompute makes (kdkit._kept: a run or an LM cache is refused as out_dir)
KIND = "teacher cache"

log = logging.getLogger(__name__)
Stat = float | Sequence[float] | torch.Tensor | None


def _rank_world() -> tuple[int, int, bool]:
    """(rank, world size, whether we initialised the process group ourselves)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    launch = launch_env()  # checked; None alone (or WORLD_SIZE=1)
    if launch is not None and dist.is_available():
        join(launch, "gloo")  # only a barrier is needed: gloo works anywhere
        return dist.get_rank(), launch.world, True
    return 0, 1, False


def dataset_keys(dataset: Any) -> np.ndarray:
    """The index each row's items carry (int64 (N,)): ``dataset.indices`` when the dataset
    has them (:class:`~kdkit.data.ArrayDataset` subsets keep their original indices, and the
    training loop passes those to the teacher), looking through ``torch.utils.data.Subset``;
    otherwise the positions ``0..N-1``."""
    if isinstance(dataset, Subset):
        return dataset_keys(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    indices = getattr(dataset, "indices", None)
    if isinstance(indices, (torch.Tensor, np.ndarray)) and len(indices) == len(dataset):
        return np.asarray(torch.as_tensor(indices, dtype=torch.int64).cpu().numpy())
    return np.arange(len(dataset), dtype=np.int64)


def _batches(dataset: Any, start: int, stop: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Images of rows ``start..stop`` in batches; slices ``dataset.images`` when it has it."""
    images_attr = getattr(dataset, "images", None)
    fast = isinstance(images_attr, (torch.Tensor, np.ndarray)) and len(images_attr) == len(dataset)
    for b0 in range(start, stop, batch_size):
        b1 = min(b0 + batch_size, stop)
        if fast:
            yield torch.as_tensor(images_attr[b0:b1])
        else:
            yield torch.stack([torch.as_tensor(dataset[i][0]) for i in range(b0, b1)])


def _probe(
    t: Teacher,
    dataset: Any,
    keys: np.ndarray,
    views,
    mean,
    std,
    device,
    pool: MixPool | None = None,
) -> tuple[int, dict[str, list[int]]]:
    """The teacher's class count and each requested feature's per-sample shape, from the first
    batch (``keys``: its rows' keys): a whole batch, so a compiled teacher is compiled for the
    shape the pass then runs at."""
    images = next(_batches(dataset, 0, len(keys), len(keys)))
    index = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    view = torch.zeros_like(index)
    x = prepare_input(images, index, view, views, mean, std, device, pool)
    out = t(x, index=index, view=view)
    shapes = {n: list(out.get(n).shape[1:]) for n in t.feature_names}
    logits = out.logits
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise KDError(
            "precompute needs a teacher returning (N, num_classes) logits, got "
            f"{type(logits).__name__} {getattr(logits, 'shape', '')}"
        )
    return int(logits.shape[1]), shapes


def _store(writer: ShardWriter, rows: slice, view: int, logits: torch.Tensor, spec) -> None:
    if spec["topk"]:
        values, indices = torch.topk(logits.float(), spec["topk"], dim=1)
        writer.arrays["indices"][rows, view] = indices.cpu().numpy()
    else:
        values = logits.float()
    values = values.cpu().numpy().astype(DTYPES[spec["dtype"]])
    if not np.isfinite(values).all():
        raise KDError(
            f"teacher outputs are not finite in {spec['dtype']} (rows {rows.start}..{rows.stop}"
            f", view {view}); precompute with dtype='fp32' or check the teacher"
        )
    writer.arrays["values"][rows, view] = values


def _compute_shard(ctx: dict[str, Any], i: int, start: int, stop: int, bar: tqdm) -> dict:
    spec = ctx["spec"]
    with ShardWriter(ctx["out"], i, stop - start, spec) as writer:
        b0 = start
        for images in _batches(ctx["dataset"], start, stop, ctx["batch_size"]):
            rows = slice(b0 - start, b0 - start + len(images))
            index = torch.from_numpy(ctx["keys"][b0 : b0 + len(images)])
            b0 += len(images)
            for v in range(spec["num_views"]):
                view = torch.full_like(index, v)
                x = prepare_input(
                    images,
                    index,
                    view,
                    ctx["views"],
                    ctx["mean"],
                    ctx["std"],
                    ctx["device"],
                    ctx["pool"],
                )
                out = ctx["teacher"](x, index=index, view=view)
                _store(writer, rows, v, out.logits, spec)
                for name in spec.get("features") or {}:  # format 4: named teacher features
                    feature = out.get(name).float().cpu().numpy().astype(DTYPES[spec["dtype"]])
                    writer.arrays[feature_key(name)][rows, v] = feature
                if ctx["pool"] is not None:  # the partner each mixed view used (format 3)
                    mixed = ctx["views"].sample(index, view, ctx["pool"])
                    writer.arrays["partner"][rows, v] = mixed.partner.numpy()
                    writer.arrays["lam"][rows, v] = mixed.lam.numpy()
            bar.update(len(index))
        return writer.commit(start, stop, ctx["run_key"])


def precompute(
    teacher: Any,
    dataset: Any,
    out_dir: str | os.PathLike,
    views: ViewSampler | None = None,
    topk: int | None = None,
    batch_size: int = 256,
    dtype: str = "fp16",
    mean: Stat = None,
    std: Stat = None,
    shard_size: int = 16384,
    device: torch.device | str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
    features: Sequence[str] = (),
) -> Path:
    """Store ``teacher``'s logits for every sample of ``dataset`` (K views each) in ``out_dir``.

    ``teacher``: anything :func:`kdkit.teachers.teacher` accepts. ``dataset``: items
    ``(image, label[, index])`` with uint8 (C, H, W) or float [0, 1] images; row ``i`` of the
    cache is ``dataset[i]``. ``views``: a :class:`ViewSampler` with ``num_views=K`` (each
    sample is stored under views ``0..K-1``) or ``None`` (one plain view). ``topk``: keep the
    k largest logits and their class indices instead of all of them. ``dtype``: ``"fp16"`` or
    ``"fp32"`` values. ``mean``/``std``: the normalisation of :func:`prepare_input`, the same
    the training run uses. ``source``: free-form provenance stored in the meta (the CLI
    records the teacher path and data name). ``features``: named teacher outputs to store
    beside the logits (``"embedding"`` of a CLIP teacher, a module name of a torch teacher),
    so feature pairs replay from the cache (format version 4). Returns ``out_dir``.
    """
    if dtype not in DTYPES:
        raise KDError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if views is not None and views.num_views is None:
        raise KDError("a cache stores a fixed number of views: use ViewSampler(num_views=K)")
    if batch_size < 1 or shard_size < 1:
        raise KDError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    n = len(dataset)
    if n == 0:
        raise KDError("the dataset is empty")
    t = make_teacher(teacher)
    if device is not None:
        t.to(device)
    in_device = torch.device(device) if device is not None else (t.device or torch.device("cpu"))
    keys = dataset_keys(dataset)
    identity = bool(np.array_equal(keys, np.arange(n)))
    if not identity and len(np.unique(keys)) != n:
        raise KDError("the dataset's sample indices are not unique; a cache needs one row each")
    # mixing views draw partners from this dataset's own samples: a cache entry (index, view)
    # is then one fixed mixed image (see kdkit.data.views)
    pool = MixPool.from_dataset(dataset) if views is not None and views.mixes else None
    features = tuple(dict.fromkeys(n for n in features if n))
    t.request_features(features)  # a backend that cannot give them says so here
    first = keys[: min(batch_size, len(keys))]
    num_classes, shapes = _probe(t, dataset, first, views, mean, std, in_device, pool)
    if topk is not None and not 1 <= topk <= num_classes:
        raise KDError(f"topk must be in [1, {num_classes}], got {topk}")
    spec = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": teacher_fingerprint(t),
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "num_samples": n,
        "views": None if views is None else views.config(),
        "num_views": 1 if views is None else views.num_views,
        "dtype": dtype,
        "topk": topk,
        "index_dtype": index_dtype_for(num_classes) if topk else None,
        "num_classes": num_classes,
        "normalization": {"mean": stat_json(mean), "std": stat_json(std)},
        "shard_size": shard_size,
        "index_sha256": None if identity else sha256_bytes(keys.astype(np.int64).tobytes()),
    }
    if features:  # only then: plain caches stay readable by format-3 readers
        spec["format_version"] = FEATURES_VERSION
        spec["features"] = {n: {"shape": shapes[n]} for n in features}
    run_key = sha256_bytes(json.dumps(spec, sort_keys=True).encode())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world, own_group = _rank_world()
    locked = contextlib.ExitStack()
    try:
        if rank == 0:  # one writer per folder (ranks of one job share it)
            locked.enter_context(folder_lock(out, makes=KIND, what="the cache folder"))
        check_existing(out, spec, overwrite, rank)
        num_shards = -(-n // shard_size)

        def bounds(i: int) -> tuple[int, int]:
            return i * shard_size, min((i + 1) * shard_size, n)

        mine = [i for i in range(num_shards) if i % world == rank]
        todo = [i for i in mine if shard_is_done(out, i, *bounds(i), run_key) is None]
        total = sum(b - a for a, b in map(bounds, mine))
        done = total - sum(b - a for a, b in map(bounds, todo))
        if done:
            log.info("resuming: %d of %d shards already done", len(mine) - len(todo), len(mine))
        ctx = {
            "spec": spec,
            "out": out,
            "dataset": dataset,
            "batch_size": batch_size,
            "views": views,
            "mean": mean,
            "std": std,
            "device": in_device,
            "teacher": t,
            "run_key": run_key,
            "keys": keys,
            "pool": pool,
        }
        with tqdm(
            total=total,
            initial=done,
            unit="sample",
            unit_scale=True,
            smoothing=0.1,
            desc="precompute",
            disable=not progress or rank != 0,
        ) as bar:
            for i in todo:
                _compute_shard(ctx, i, *bounds(i), bar)
        if world > 1:
            dist.barrier()
        if rank == 0:
            finish(out, spec, num_shards, bounds, run_key, source, None if identity else keys)
        if world > 1:
            dist.barrier()
    finally:
        locked.close()
        if own_group:
            dist.destroy_process_group()
    return out
