"""The tokenized corpus on disk: a second run over the same data skips reading and tokenizing,
and a corpus larger than memory is read from it row by row.

One safetensors file per corpus under ``~/.cache/kdkit/lm-tokens`` (``data.token_cache``),
named by a sha256 over the format version, the data files' sha256, the tokenizer's
fingerprint (vocabulary, merges, chat template) and every setting the rows depend on; so an
edited file, another tokenizer or another ``max_length`` is another file, never a stale hit.

The rows are three flat arrays and the rows' lengths. :class:`RowWriter` appends each row to
one part file per array as the rows are made (nothing of the corpus is kept in Python), then
lays the parts out as one safetensors file, atomically (:func:`kdkit._io.atomic_path`).
:func:`open_rows` maps that file (:class:`~kdkit.lm._rows.MappedRows`) rather than reading
it; a file whose header, sizes or lengths do not add up is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from kdkit._io import TMP_MARKER, atomic_path
from kdkit.lm._rows import MappedRows

__all__ = ["FORMAT", "RowWriter", "cache_key", "default_token_cache", "open_rows"]

log = logging.getLogger(__name__)

FORMAT = "kdkit-lm-tokens/1"
#: the arrays in file order (8-byte ones first, so every array is aligned) and their dtypes
_ARRAYS = (("lengths", "I64"), ("input_ids", "I64"), ("doc_ids", "I64"), ("trainable", "U8"))
_ITEMSIZE = {"I64": 8, "U8": 1}
_BUFFER = 1 << 16  # per part file: the writer's whole heap, whatever the corpus


def default_token_cache() -> Path:
    return Path.home() / ".cache" / "kdkit" / "lm-tokens"


def cache_key(sources: list[Mapping[str, Any]], tokenizer: str, settings: Mapping[str, Any]) -> str:
    """The file name's sha256: format, sources (their sha256), tokenizer and settings."""
    blob = json.dumps([FORMAT, list(sources), tokenizer, dict(settings)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class RowWriter:
    """Rows written to ``folder/KEY.safetensors`` as they come (``add``), made visible by
    ``commit``; leaving the ``with`` block without a commit (an error) leaves no file."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = Path(folder), key
        self.rows = self.tokens = 0
        folder.mkdir(parents=True, exist_ok=True)
        # named as atomic writes' temporaries are, so a killed writer's parts are cleaned up
        self._parts = {
            name: self.folder / f".{key}.{name}{TMP_MARKER}{os.getpid()}" for name, _ in _ARRAYS
        }
        self._files = {name: open(p, "wb", buffering=_BUFFER) for name, p in self._parts.items()}  # noqa: SIM115

    def add(self, ids: Sequence[int], trainable: Sequence[bool], doc_ids: Sequence[int]) -> None:
        """Append one row (plain lists, as the packer makes them)."""
        f = self._files
        array("q", (len(ids),)).tofile(f["lengths"])
        array("q", ids).tofile(f["input_ids"])
        array("q", doc_ids).tofile(f["doc_ids"])
        f["trainable"].write(bytes(trainable))
        self.rows += 1
        self.tokens += len(ids)

    def commit(self, meta: Mapping[str, Any]) -> Path:
        """The parts laid out as one safetensors file with ``meta`` (plain JSON)."""
        for f in self._files.values():
            f.close()
        header: dict[str, Any] = {}
        offset = 0
        for name, dtype in _ARRAYS:
            count = self.rows if name == "lengths" else self.tokens
            size = count * _ITEMSIZE[dtype]
            header[name] = {
                "dtype": dtype,
                "shape": [count],
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header["__metadata__"] = {"format": FORMAT, "key": self.key, "meta": json.dumps(meta)}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)  # the data starts 8-byte aligned
        path = self.folder / f"{self.key}.safetensors"
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            out.write(len(blob).to_bytes(8, "little") + blob)
            for name, _ in _ARRAYS:
                with open(self._parts[name], "rb") as part:
                    shutil.copyfileobj(part, out, _BUFFER)
        return path

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for f in self._files.values():
            f.close()
        for p in self._parts.values():
            p.unlink(missing_ok=True)


def _layout(path: Path, key: str) -> tuple[dict[str, tuple[str, int, int]], dict[str, Any]] | None:
    """The arrays' ``(dtype, count, offset)`` and the metadata; None for another format/key;
    ValueError where the file does not add up."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(size - 8, 1 << 24):
            raise ValueError(f"a header of {n} bytes in a file of {size}")
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("format") != FORMAT or metadata.get("key") != key:
        return None
    layout, end = {}, 8 + n
    for name, dtype in _ARRAYS:
        t = header[name]
        count = int(np.prod(t["shape"]))
        lo, hi = t["data_offsets"]
        if t["dtype"] != dtype or len(t["shape"]) != 1 or hi - lo != count * _ITEMSIZE[dtype]:
            raise ValueError(f"{name}: {t}")
        layout[name] = (dtype, count, 8 + n + lo)
        end = max(end, 8 + n + hi)
    if end != size:
        raise ValueError(f"{size} bytes where the header describes {end}")
    if not layout["input_ids"][1] == layout["trainable"][1] == layout["doc_ids"][1]:
        raise ValueError("arrays of different lengths")
    return layout, metadata


def open_rows(folder: Path, key: str) -> tuple[MappedRows, dict[str, Any]] | None:
    """``(rows, meta)`` stored as ``key``, mapped rather than read; None when absent or not
    whole (the caller tokenizes again, and the new file replaces it)."""
    path = Path(folder) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        found = _layout(path, key)
        if found is None:
            return None
        layout, metadata = found
        meta = json.loads(metadata["meta"])
        rows = MappedRows(path, layout)
        lengths = rows.lengths()
        if (lengths < 0).any() or int(lengths.sum()) != rows.total_tokens():
            raise ValueError("the rows' lengths do not add up to the tokens")
    except Exception as e:  # noqa: BLE001 - a damaged file: tokenize again
        log.warning("lm data: token cache %s unreadable (%s); tokenizing again", path.name, e)
        return None
    return rows, meta
