"""Hostile inputs to the teacher cache (issue 10): ``kdkit precompute``, ``kdkit cache
verify/info/check`` and ``CachedTeacher``: bad options, edited or damaged caches, and a cache
of another dataset. Rows and verdicts: tests/_hostile/.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _hostile import (
    MEAN,
    STD,
    Case,
    cli_rows,
    dataset,
    judge_row,
    params,
    pwned,
    student,
    trainer,
    work_copy,
)

from kdkit.cache import CachedTeacher
from kdkit.data import FastLoader

pytestmark = pytest.mark.usefixtures("one_thread")


# -- caches edited by hand --------------------------------------------------------------------
def _edited_cache(fx, name: str, edit: Callable[[dict], None], src: Path | None = None) -> Path:
    out = work_copy(fx, src or fx.cache, name)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out


def _shift(meta: dict) -> None:
    """The boundary between shards 0 and 1 moved by 5 rows: the ranges stay contiguous and
    cover the dataset, but rows 8..12 would be read from the wrong shard and position."""
    meta["shards"][0]["stop"] += 5
    meta["shards"][1]["start"] += 5


def _swap(meta: dict) -> None:
    s = meta["shards"]
    s[0]["files"], s[1]["files"] = s[1]["files"], s[0]["files"]


def _resealed(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    """An edit whose author also recomputed the meta checksum (so only the layout checks
    can catch it)."""

    def run(meta: dict) -> None:
        edit(meta)
        try:
            from kdkit.cache.store import seal_meta
        except ImportError:  # a kdkit without meta checksums
            return
        sealed = seal_meta({k: v for k, v in meta.items() if k != "meta_sha256"})
        meta.clear()
        meta.update(sealed)

    return run


def _edited_cache_text(fx, name: str, text: str) -> Path:
    out = work_copy(fx, fx.cache, name)
    (out / "meta.json").write_text(text)
    return out


def _meta_dir(fx) -> Path:
    out = work_copy(fx, fx.cache, "metadir")
    (out / "meta.json").unlink()
    (out / "meta.json").mkdir()
    return out


def _damaged_shard(fx, name: str, truncate: bool) -> Path:
    out = work_copy(fx, fx.cache, name)
    shard = out / "shard-00001.values.npy"
    data = bytearray(shard.read_bytes())
    if truncate:
        shard.write_bytes(bytes(data[: len(data) - 40]))
    else:
        data[-9] ^= 0x40
        shard.write_bytes(bytes(data))
    return out


# -- the CLI ----------------------------------------------------------------------------------
def _precompute(fx, *extra, teacher=None):
    out = fx.root / "work" / "pc"
    return ["precompute", "--teacher", str(teacher or fx.onnx), "--out", str(out),
            "--no-progress", "--device", "cpu", *extra]  # fmt: skip


def _check(fx, *extra, teacher=None, cache=None):
    return ["cache", "check", str(cache or fx.cache), "--teacher", str(teacher or fx.onnx),
            "--data", "fashion-mnist:train", "--device", "cpu", *extra]  # fmt: skip


def _verify(path: Path) -> list:
    return ["cache", "verify", path]


CLI: list[Case] = cli_rows([
    # precompute
    Case("precompute-views-negative", lambda fx: _precompute(fx, "--views", "-2"), "--views"),
    Case("precompute-topk-zero", lambda fx: _precompute(fx, "--topk", "0"), "--topk"),
    Case("precompute-topk-above-classes", lambda fx: _precompute(fx, "--topk", "999"), "topk"),
    Case("precompute-batch-size-zero", lambda fx: _precompute(fx, "--batch-size", "0"), "--batch-size|batch_size"),
    Case("precompute-shard-size-zero", lambda fx: _precompute(fx, "--shard-size", "0"), "--shard-size|shard_size"),
    Case("precompute-flip-p-2", lambda fx: _precompute(fx, "--views", "2", "--flip-p", "2"), "flip"),
    Case("precompute-scale-zero", lambda fx: _precompute(fx, "--views", "2", "--scale", "0", "1"), "scale"),
    Case("precompute-out-under-a-file", lambda fx: ["precompute", "--teacher", fx.onnx, "--out", fx.a_file / "c"], "is a file"),
    Case("precompute-teacher-missing", lambda fx: _precompute(fx, teacher=fx.root / "nope.onnx"), "no .*ONNX file|no teacher file"),
    Case("precompute-teacher-truncated-onnx", lambda fx: _precompute(fx, teacher=fx.truncated_onnx), "ONNX"),
    Case("precompute-markdown-teacher", lambda fx: _precompute(fx, teacher=fx.markdown), "not a readable checkpoint"),
    Case("precompute-pwned-teacher", lambda fx: _precompute(fx, teacher=fx.pwned), "would import 'subprocess'", post=pwned),
    Case("precompute-arch-python-untrusted", lambda fx: _precompute(fx, "--arch", "python:os:getcwd", teacher=fx.weights_only), "would import 'os'"),
    Case("precompute-arch-unknown", lambda fx: _precompute(fx, "--arch", "kdkit:nope", teacher=fx.weights_only), "no model 'nope'"),
    Case("precompute-device-foo", lambda fx: _precompute(fx, "--device", "foo"), "not a device"),
    Case("precompute-unknown-dataset", lambda fx: _precompute(fx, "--data", "mnist"), "unknown dataset"),
    Case("precompute-dtype-fp8", lambda fx: _precompute(fx, "--dtype", "fp8"), "invalid choice"),
    # cache
    Case("cache-verify-missing-dir", lambda fx: _verify(fx.root / "nope"), "not a teacher cache"),
    Case("cache-verify-not-a-cache", lambda fx: _verify(fx.root), "not a teacher cache"),
    Case("cache-verify-meta-not-json", lambda fx: _verify(_edited_cache_text(fx, "nojson", "{oops")), "not valid JSON"),
    Case("cache-verify-meta-is-a-directory", lambda fx: _verify(_meta_dir(fx)), "not a teacher cache|cannot read"),
    Case("cache-verify-ranges-shifted", lambda fx: _verify(_edited_cache(fx, "shift", _shift)), "checksum|covers"),
    Case("cache-verify-ranges-shifted-resealed", lambda fx: _verify(_edited_cache(fx, "shift2", _resealed(_shift))), "covers"),
    Case("cache-verify-shards-swapped", lambda fx: _verify(_edited_cache(fx, "swap", _swap)), "checksum|swapped"),
    Case("cache-verify-shards-swapped-resealed", lambda fx: _verify(_edited_cache(fx, "swap2", _resealed(_swap))), "swapped"),
    Case("cache-verify-meta-field-edited", lambda fx: _verify(_edited_cache(fx, "fp", lambda m: m.update(teacher_fingerprint="0" * 64))), "checksum"),
    Case("cache-verify-format-version-99", lambda fx: _verify(_edited_cache(fx, "v99", lambda m: m.update(format_version=99))), "format_version"),
    Case("cache-verify-truncated-shard", lambda fx: _verify(_damaged_shard(fx, "trunc", truncate=True)), "truncated"),
    Case("cache-verify-flipped-shard-bytes", lambda fx: _verify(_damaged_shard(fx, "flip", truncate=False)), "checksum"),
    Case("cache-info-not-a-cache", lambda fx: ["cache", "info", fx.root], "not a teacher cache"),
    Case("cache-check-n-probe-zero", lambda fx: _check(fx, "--n-probe", "0"), "--n-probe"),
    Case("cache-check-n-probe-negative", lambda fx: _check(fx, "--n-probe", "-3"), "--n-probe"),
    Case("cache-check-max-disagreement-2", lambda fx: _check(fx, "--max-disagreement", "2"), "--max-disagreement"),
    Case("cache-check-pwned-teacher", lambda fx: _check(fx, teacher=fx.pwned), "would import 'subprocess'", post=pwned),
    Case("cache-check-markdown-teacher", lambda fx: _check(fx, teacher=fx.markdown), "not a readable checkpoint"),
    Case("cache-check-device-foo", lambda fx: _check(fx, "--device", "foo"), "not a device"),
    Case("cache-check-edited-cache", lambda fx: _check(fx, cache=_edited_cache(fx, "chk", _shift)), "checksum|covers"),
])  # fmt: skip


# -- the library: a CachedTeacher in a run ------------------------------------------------------
def _cache_from_other_split(fx):
    """A cache of one dataset used with another dataset of the same length."""
    other = dataset(seed=1)  # same size, other images: another split
    cached = CachedTeacher(fx.cache)
    trainer(student=student().train(), teacher=cached, loader=FastLoader(other, 10),
            mean=MEAN, std=STD)  # fmt: skip


def _cache_length_mismatch(fx):
    cached = CachedTeacher(fx.cache)
    loader = FastLoader(dataset(n=12), 6)
    trainer(student=student().train(), teacher=cached, loader=loader, mean=MEAN, std=STD)


def _cache_same_dataset_trains(fx):
    run = trainer(student=student().train(), teacher=CachedTeacher(fx.cache),
                  loader=FastLoader(fx.dataset, 10), mean=MEAN, std=STD)  # fmt: skip
    return len(run.fit()) == 1


def _cached(fx, name, edit):
    CachedTeacher(_edited_cache(fx, name, edit))


def _file_traversal(meta: dict) -> None:
    meta["shards"][0]["files"]["values"].update(file="../../best.pt")


def _shape_edited(meta: dict) -> None:
    meta["shards"][0]["files"]["values"].update(shape=[8, 1, 5])


LIB: list[Case] = [
    Case("cache-from-other-split", _cache_from_other_split, "dataset_fingerprint"),
    Case("cache-length-mismatch", _cache_length_mismatch, "num_samples"),
    Case("cache-same-dataset-trains", _cache_same_dataset_trains, expect="correct"),
    Case("cache-ranges-shifted", lambda fx: _cached(fx, "l_shift", _shift), "checksum|covers"),
    Case("cache-ranges-shifted-resealed", lambda fx: _cached(fx, "l_shift2", _resealed(_shift)), "covers"),
    Case("cache-shards-swapped", lambda fx: _cached(fx, "l_swap", _swap), "checksum|swapped"),
    Case("cache-shards-swapped-resealed", lambda fx: _cached(fx, "l_swap2", _resealed(_swap)), "swapped"),
    Case("cache-num-samples-edited-resealed", lambda fx: _cached(fx, "l_n", _resealed(lambda m: m.update(num_samples=24))), "shards|covers"),
    Case("cache-shard-file-path-traversal", lambda fx: _cached(fx, "l_trav", _resealed(_file_traversal)), "swapped or renamed|expected"),
    Case("cache-shape-edited-resealed", lambda fx: _cached(fx, "l_shape", _resealed(_shape_edited)), "shape"),
    Case("cache-num-classes-not-int", lambda fx: _cached(fx, "l_nc", _resealed(lambda m: m.update(num_classes="10"))), "num_classes"),
    Case("cache-index-out-of-range", lambda fx: CachedTeacher(fx.cache)(torch.zeros(1), index=torch.tensor([99])), "out of range"),
]  # fmt: skip

CASES = CLI + LIB


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_cache(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
