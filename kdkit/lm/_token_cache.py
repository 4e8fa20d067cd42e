"""The tokenized corpus on disk: a second run over the same data skips reading and tokenizing.

One safetensors file per corpus under ``~/.cache/kdkit/lm-tokens`` (``data.token_cache``),
named by a sha256 over the format version, the data files' sha256, the tokenizer's
fingerprint (vocabulary, merges, chat template) and every setting the rows depend on; so an
edited file, another tokenizer or another ``max_length`` is another file, never a stale hit.
Written atomically (:func:`kdkit._io.atomic_path`); a file that does not read back whole is
ignored and rebuilt. The rows are three flat tensors and their offsets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdkit._io import atomic_path

__all__ = ["FORMAT", "cache_key", "default_token_cache", "read_rows", "write_rows"]

log = logging.getLogger(__name__)

FORMAT = "kdkit-lm-tokens/1"


def default_token_cache() -> Path:
    return Path.home() / ".cache" / "kdkit" / "lm-tokens"


def cache_key(sources: list[Mapping[str, Any]], tokenizer: str, settings: Mapping[str, Any]) -> str:
    """The file name's sha256: format, sources (their sha256), tokenizer and settings."""
    blob = json.dumps([FORMAT, list(sources), tokenizer, dict(settings)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_rows(folder: Path, key: str, rows: list[Any], meta: Mapping[str, Any]) -> None:
    """Store ``rows`` (:class:`~kdkit.lm.data.TokenRow`) and ``meta`` (plain JSON) as ``key``."""
    from safetensors.torch import save_file

    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    tensors = {
        "lengths": lengths,
        "input_ids": torch.cat([r.input_ids for r in rows]),
        "trainable": torch.cat([r.trainable for r in rows]).to(torch.uint8),
        "doc_ids": torch.cat([r.doc_ids for r in rows]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "key": key, "meta": json.dumps(meta)}
    try:
        with atomic_path(folder / f"{key}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except OSError as e:  # a cache is a convenience: a full disk never stops the run
        log.warning("lm data: token cache not written (%s)", e)


def read_rows(folder: Path, key: str) -> tuple[list[tuple[Any, ...]], dict[str, Any]] | None:
    """``([(ids, trainable, doc_ids), ...], meta)`` stored as ``key``, or None (absent or not
    whole: the caller tokenizes again)."""
    from safetensors import safe_open

    path = folder / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("key") != key:
                return None
            t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        meta = json.loads(metadata["meta"])
        bounds = t["lengths"].cumsum(0).tolist()
        if (bounds[-1] if bounds else 0) != t["input_ids"].numel():
            return None
    except Exception as e:  # noqa: BLE001 - a damaged file: tokenize again
        log.warning("lm data: token cache %s unreadable (%s); tokenizing again", path.name, e)
        return None
    starts = [0, *bounds[:-1]]
    trainable = t["trainable"].bool()
    rows = [
        (t["input_ids"][a:b], trainable[a:b], t["doc_ids"][a:b])
        for a, b in zip(starts, bounds, strict=True)
    ]
    return rows, meta
