"""The writer of a top-k cache: a teacher over token rows, once, resumable (``kdkit precompute``
of a ``task: lm`` config, alias ``kdkit lm capture``; the builder is
:func:`kdkit.run.lm_job.capture_run`).

Resumable and safe under kill -9, as ``kdkit precompute`` is: every shard is written to a temp
file and renamed, then the manifest (sealed with its own sha256) is rewritten atomically with
that shard's checksum. A killed capture leaves finished shards and a manifest that lists
exactly them; run the same command again and it computes only the rest. The computation is a
function of the rows and the teacher alone, so a resumed cache is byte-identical to one made in
a single go (tested).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kdkit._io import atomic_path, atomic_write_json, check_output_path, sha256_file, writing
from kdkit._lock import LOCK_NAME, folder_lock
from kdkit.errors import KDError
from kdkit.lm.align import Aligner
from kdkit.lm.cache.codec import ENCODINGS, encode_logp, id_bits, pack_ids
from kdkit.lm.cache.format import (
    ALIGNMENT,
    FORMAT,
    MANIFEST,
    VERSION,
    differences,
    read_manifest,
    row_hash,
    seal,
    shard_name,
    tokenizer_fingerprint,
)
from kdkit.lm.topk import ModuleTopK, TopKScorer, topk_entries

__all__ = [
    "KIND",
    "Provenance",
    "cache_settings",
    "capture",
    "check_capture_options",
    "rows_arrays",
    "rows_fingerprint",
    "topk_entries",
    "write_shard",
]

log = logging.getLogger(__name__)

#: the kind of folder a capture makes (kdkit._kept: a run or an image cache is refused as --out)
KIND = "LM teacher cache"


def _shard_arrays(
    rows: list[Any], scorer: TopKScorer, aligner: Aligner, settings: dict[str, Any], batch_size: int
) -> dict[str, np.ndarray]:
    vocab, k = settings["teacher"]["vocab"], settings["capture"]["k"]
    temperature = settings["capture"]["temperature"]
    ids, logp, tail, entries = [], [], [], []
    mass = torch.zeros(vocab, dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        batch = aligner(rows[start : start + batch_size])
        top = scorer.topk(batch, vocab=vocab, k=k, temperature=temperature, mass=True)
        mass += top.mass
        ids.append(top.ids.cpu())
        logp.append(top.logp.cpu())
        tail.append(top.tail.cpu())
        entries.extend(batch.mask.sum(1).tolist())
    return rows_arrays(rows, entries, ids, logp, tail, mass, settings)


def rows_arrays(
    rows: Sequence[Any],
    entries: Sequence[int],
    ids: Sequence[torch.Tensor],
    logp: Sequence[torch.Tensor],
    tail: Sequence[torch.Tensor],
    mass: torch.Tensor,
    settings: Mapping[str, Any],
) -> dict[str, np.ndarray]:
    """A shard's arrays (``docs/lm-cache-format.md``) for token ``rows`` with ``entries[r]``
    targets each: ``ids`` / ``logp`` / ``tail`` are their top-k entries in row order (CPU
    tensors, concatenated here), ``mass`` the summed distributions."""
    lengths = [len(r) for r in rows]
    arrays = {
        "row_offsets": np.concatenate([[0], np.cumsum(entries)]).astype(np.int64),
        "token_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "token_ids": np.concatenate([r.input_ids.numpy() for r in rows]).astype(np.uint32),
        # with the ids, what rebuilds each row exactly (for `kdkit lm cache check`)
        "token_trainable": np.packbits(
            np.concatenate([r.trainable.numpy() for r in rows]), bitorder="little"
        ),
        "token_doc": np.concatenate([r.doc_ids.numpy() for r in rows]).astype(np.uint16),
        "row_hash": np.asarray([row_hash(r) for r in rows], dtype=np.uint64),
        "topk_ids": pack_ids(torch.cat(list(ids)).numpy(), settings["capture"]["id_bits"]),
        "tail_logmass": torch.cat(list(tail)).numpy().astype(np.float16),
        "teacher_mass": mass.numpy(),  # float64 [V]: summed over the shard's entries
    }
    arrays.update(encode_logp(torch.cat(list(logp)).numpy(), settings["capture"]["encoding"]))
    return arrays


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` as the safetensors file ``path``, atomically (temp file, fsync, rename)."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp))


_write_shard = write_shard  # the capture's writer (a test slows it down to kill it between)


@dataclass(frozen=True)
class Provenance:
    """What a capture records of where its targets come from (the manifest's ``teacher`` and
    ``data`` sections): a resumed capture must match it, and readers check rows against it.

    - ``model``: the teacher as the config names it (``hf:DIR``);
    - ``weights_sha256``: the fingerprint of its weights, whatever engine runs them;
    - ``dtype``: its parameters' dtype; ``vocab_rows``: its head's rows;
    - ``engine``: what computed the log-probs (``"torch fp32"``, ``"onnx int8"``...);
    - ``data``: the ``data:`` keys the rows depend on (:func:`~kdkit.lm.cache.format.data_settings`).
    """

    model: str
    weights_sha256: str
    dtype: str
    vocab_rows: int
    engine: str
    data: Mapping[str, Any]


def capture(
    teacher: Any,
    rows: Sequence[Any],
    aligner: Aligner,
    out: str | Path,
    *,
    tokenizer: Any,
    provenance: Provenance,
    topk: int = 32,
    encoding: str = "q8",
    temperature: float = 1.0,
    shard_rows: int = 256,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``teacher``'s top-k targets for the token ``rows`` (collated by ``aligner``) into
    ``out``, resuming an unfinished capture there. Returns the manifest. ``teacher`` is a model
    run here, or a :class:`~kdkit.lm.topk.TopKScorer` (a served teacher) asked for each batch.

    The file-format half of ``kdkit precompute`` for ``task: lm``: it runs the teacher it is
    given on the rows it is given. Building them from a config (models, tokenizer, corpus,
    engine) is :func:`kdkit.run.lm_job.capture_run`.
    """
    if hasattr(teacher, "teacher") and hasattr(teacher, "data"):  # capture(cfg, out) of 0.1
        raise KDError(
            "kdkit.lm.cache.capture writes rows a teacher was run on; to capture a config's "
            "teacher over its corpus call kdkit.run.lm_job.capture_run(cfg, out, ...)"
        )
    check_capture_options(topk=topk, encoding=encoding, temperature=temperature,
                          shard_rows=shard_rows, batch_size=batch_size)  # fmt: skip
    out = check_output_path(out, what="the cache folder", directory=True, makes=KIND)
    with folder_lock(out, makes=KIND, what="the cache folder"):  # one writer at a time
        return _capture(teacher, rows, aligner, out, tokenizer, provenance, topk, encoding,
                        float(temperature), shard_rows, batch_size, progress)  # fmt: skip


def check_capture_options(
    *, topk: Any, encoding: Any, temperature: Any, shard_rows: Any, batch_size: Any = 1
) -> None:
    """The capture's options, in range (one line naming the flag): ``kdkit precompute``,
    ``kdkit lm capture`` and the Python doors all pass here before anything is loaded."""

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if encoding not in ENCODINGS:
        raise KDError(f"--encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    if not (integer(topk) and 1 <= topk <= 1 << 16):
        raise KDError(f"--topk must be an integer in [1, 65536], got {topk!r}")
    if not (integer(shard_rows) and 1 <= shard_rows <= 1 << 24):
        raise KDError(
            f"--shard-rows (shard_rows) must be an integer in [1, 2**24], got {shard_rows!r}"
        )
    if not (integer(batch_size) and batch_size >= 1):
        raise KDError(f"the capture's batch size must be an integer >= 1, got {batch_size!r}")
    number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (number and math.isfinite(temperature) and temperature > 0):
        raise KDError(f"--temperature must be a finite number > 0 (e.g. 1.0), got {temperature!r}")


def rows_fingerprint(rows: Sequence[Any]) -> str:
    """sha256 over every row's :func:`row_hash`, in order: the corpus as tokenized. A capture
    resumed over other rows (the corpus edited, same row count) differs here."""
    h = hashlib.sha256()
    for row in rows:
        h.update(row_hash(row).to_bytes(8, "little"))
    return h.hexdigest()


def _capture(
    teacher: Any,
    rows: Sequence[Any],
    aligner: Aligner,
    out: Path,
    tokenizer: Any,
    provenance: Provenance,
    topk: int,
    encoding: str,
    temperature: float,
    shard_rows: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    vocab = min(provenance.vocab_rows, len(tokenizer))  # padded head rows are never a target
    if topk > vocab:
        raise KDError(f"--topk {topk} is larger than the vocabulary ({vocab})")
    num_shards = max(1, math.ceil(len(rows) / shard_rows))
    settings = {
        **cache_settings(provenance, tokenizer, topk, encoding, temperature),
        "num_rows": len(rows),
        "rows_sha256": rows_fingerprint(rows),
        "shard_rows": shard_rows,
        "num_shards": num_shards,
    }
    done = _resume(out, settings)
    scorer = teacher if isinstance(teacher, TopKScorer) else ModuleTopK(teacher)
    if not done:  # the tokenizer travels with the cache: a student from hf-config can use it
        with writing(out / "tokenizer"):
            tokenizer.save_pretrained(str(out / "tokenizer"))
    bar = tqdm(
        total=len(rows), unit="row", desc="capture", disable=not progress, dynamic_ncols=True
    )
    bar.update(sum(s["rows"][1] - s["rows"][0] for s in done))
    for i in range(len(done), num_shards):
        lo, hi = i * shard_rows, min((i + 1) * shard_rows, len(rows))
        arrays = _shard_arrays(rows[lo:hi], scorer, aligner, settings, batch_size)
        path = out / shard_name(i)
        with writing(path):
            _write_shard(path, arrays)
        done.append(
            {
                "file": path.name,
                "rows": [lo, hi],
                "entries": int(arrays["row_offsets"][-1]),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
        manifest = {**settings, "shards": done, "complete": i == num_shards - 1}
        if manifest["complete"]:
            entries = sum(s["entries"] for s in done)
            manifest["entries"] = entries
            manifest["bytes_per_token"] = sum(s["bytes"] for s in done) / max(entries, 1)
        with writing(out / MANIFEST):
            atomic_write_json(out / MANIFEST, seal(manifest))
        bar.update(hi - lo)
    bar.close()
    return read_manifest(out)


def cache_settings(
    provenance: Provenance, tokenizer: Any, topk: int, encoding: str, temperature: float
) -> dict[str, Any]:
    """The manifest's settings of a cache of ``provenance``'s teacher (format, teacher,
    tokenizer, capture and data sections): what a resumed writer and every reader compare."""
    vocab = min(provenance.vocab_rows, len(tokenizer))  # padded head rows are never a target
    return {
        "format": FORMAT,
        "version": VERSION,
        "alignment": ALIGNMENT,
        "teacher": {
            "model": provenance.model,
            "weights_sha256": provenance.weights_sha256,
            "dtype": provenance.dtype,
            "vocab_rows": provenance.vocab_rows,
            "vocab": vocab,
        },
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "capture": {
            "k": topk,
            "temperature": float(temperature),
            "precision": f"teacher {provenance.engine}, fp32 log-softmax",
            "encoding": encoding,
            "id_bits": id_bits(vocab),
            "tail": "float16",
        },
        "data": dict(provenance.data),
    }


def _resume(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards already finished in ``out`` (verified), or [] for a fresh capture."""
    if not (out / MANIFEST).exists():
        if any(p.name not in ("tokenizer", LOCK_NAME) for p in out.iterdir()):
            raise KDError(f"{out} is not empty and holds no capture; choose an empty --out")
        return []
    have = read_manifest(out, complete=False)
    changed = differences(have, settings)
    if "rows_sha256" in [c.partition(":")[0] for c in changed]:
        raise KDError(
            f"{out} holds an unfinished capture of another corpus (the rows tokenized from "
            "data.text_files differ: a file was edited, added or removed since); use another "
            "--out, or remove it to capture again"
        )
    if changed:
        raise KDError(
            f"{out} holds a capture made with other settings ({'; '.join(changed)}); use "
            "another --out, or remove it to capture again"
        )
    done = []
    for shard in have.get("shards", []):
        path = out / shard["file"]
        if not path.is_file() or sha256_file(path) != shard["sha256"]:
            break  # recompute from here: the same rows give the same bytes
        done.append(shard)
    if have.get("complete") and len(done) == settings["num_shards"]:
        log.info("the capture in %s is already complete", out)
    return done
