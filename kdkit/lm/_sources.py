"""Reading LM data files: globs, UTF-8 text and JSONL records, with errors that name the place.

Every problem is a one-line KDError naming the file and, where there is one, the line or byte
offset, because a corpus is usually many files and a traceback into ``json`` does not say which.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit._io import sha256_file
from kdkit.errors import KDError

__all__ = ["FORMAT_KEYS", "Record", "expand_paths", "file_info", "read_records"]

# The JSONL keys each format needs.
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
}
_JSONL = (".jsonl", ".ndjson")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One document before tokenization; ``where`` is ``file`` or ``file:line``."""

    where: str
    fields: dict[str, Any]


def expand_paths(patterns: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files matched by each pattern (globs, ``**`` recursive), sorted within a pattern, each
    file once: two paths to one file (a symlink, ``./a.txt``, a ``**`` glob walking a symlink
    loop dozens of levels deep) are one file, read once (a warning counts the extra paths)."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    seen: dict[Path, None] = {}
    real: set[str] = set()
    extra = 0
    for pattern in patterns:
        p = os.fspath(pattern)
        if glob.has_magic(p):
            matches = sorted(Path(m) for m in glob.glob(p, recursive=True) if Path(m).is_file())
        elif Path(p).is_dir():
            raise KDError(f"{p!r} is a folder; give a glob such as '{p}/*.txt'")
        else:
            matches = [Path(p)] if Path(p).is_file() else []
        if not matches:
            raise KDError(f"no file matches {p!r} (relative to {os.getcwd()!r})")
        for match in matches:
            key = os.path.realpath(match)
            extra += key in real
            if key not in real:
                real.add(key)
                seen[match] = None
    if extra:
        log.warning(
            "lm data: %d matched paths name files already matched (symlinks or overlapping "
            "globs); each file is read once",
            extra,
        )
    return list(seen)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise KDError(f"{path}: the file is empty")
    nul = data.find(b"\0")
    if nul >= 0:  # valid UTF-8, but no text holds NUL bytes: a binary or zero-filled file
        raise _nul(path, nul, data[:nul].count(b"\n") + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e.start, data[: e.start].count(b"\n") + 1, data[e.start]) from None


def _nul(path: Path, offset: int, line: int) -> KDError:
    return KDError(
        f"{path}: a NUL byte at offset {offset} (line {line}): a binary, zero-filled or "
        "UTF-16 file, not UTF-8 text; remove it from data.text_files (or re-encode it)"
    )


def _not_utf8(path: Path, offset: int, line: int, byte: int) -> KDError:
    return KDError(
        f"{path}: not UTF-8 at byte offset {offset} (line {line}, byte 0x{byte:02x}); "
        "re-encode the file as UTF-8 (e.g. iconv -t utf-8)"
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(number, text)`` of each line (ended by a newline), read one at a time with
    :func:`_decode`'s checks: a JSONL file is never held whole, whatever its size."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            nul = raw.find(b"\0")
            if nul >= 0:
                raise _nul(path, offset + nul, n)
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, offset + e.start, n, raw[e.start]) from None
            offset += len(raw)


def _check_fields(where: str, obj: Any, fmt: str) -> dict[str, Any]:
    need = FORMAT_KEYS[fmt]
    if not isinstance(obj, dict):
        raise KDError(f"{where}: a JSON object is needed, got {type(obj).__name__}")
    missing = [k for k in need if k not in obj]
    if missing:
        raise KDError(
            f"{where}: format {fmt!r} needs keys {list(need)}; missing {missing}, "
            f"the line has {sorted(obj)}"
        )
    if fmt == "chat":
        msgs = obj["messages"]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in msgs
            )
        )
        if not ok:
            raise KDError(
                f"{where}: 'messages' must be a non-empty list of {{role, content}} strings"
            )
    else:
        bad = [k for k in need if not isinstance(obj[k], str)]
        if bad:
            raise KDError(f"{where}: keys {bad} must be strings")
    return obj


def _jsonl(path: Path, fmt: str) -> Iterator[Record]:
    any_line = False
    for n, line in _lines(path):
        if not line.strip():
            continue
        any_line = True
        where = f"{path}:{n}"
        yield Record(where, _check_fields(where, _loads(line, where), fmt))
    if not any_line:
        raise KDError(f"{path}: the file is empty")


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise KDError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise KDError(f"{where}: JSON nested too deeply to be a record") from None


def _json(path: Path, fmt: str) -> Iterator[Record]:
    """A ``.json`` file: a JSON array of records, or JSON Lines (one record a line, what HF
    datasets' ``to_json`` writes under a ``.json`` name); never prose with its braces."""
    text = _decode(path)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].lstrip().startswith("{"):
        yield from _jsonl(path, fmt)
        return
    data = _loads(text, str(path))
    records = data if isinstance(data, list) else [data]
    for i, obj in enumerate(records):
        where = f"{path}[{i}]"
        yield Record(where, _check_fields(where, obj, fmt))


def read_records(paths: Iterable[Path], fmt: str) -> Iterator[Record]:
    """Records of ``fmt`` from each file: JSONL lines, a ``.json`` file's records, or a whole
    plain-text file (``text``)."""
    for path in paths:
        if path.suffix.lower() in _JSONL:
            yield from _jsonl(path, fmt)
        elif path.suffix.lower() == ".json":
            yield from _json(path, fmt)
        elif fmt == "text":
            yield Record(str(path), {"text": _decode(path)})
        else:
            raise KDError(f"{path}: format {fmt!r} reads JSONL files (.jsonl); this is plain text")


def file_info(path: Path) -> dict[str, Any]:
    """Path, size and sha256 of a data file, for the dataset's fingerprint (read in blocks)."""
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json",
             ".csv": "csv"}  # fmt: skip


@dataclass(frozen=True)
class DatasetSource:
    """A Hugging Face ``datasets`` dataset on disk (``data.dataset``): a ``save_to_disk``
    folder, a folder of data files or one data file; never a Hub download. ``fields`` maps the
    format's keys (``text``, ``prompt``, ``completion``, ``messages``) to the dataset's columns."""

    path: str
    split: str = "train"
    fields: tuple[tuple[str, str], ...] = ()

    def files(self) -> list[Path]:
        """Every file of the dataset (what its fingerprint hashes)."""
        p = Path(self.path).expanduser()
        if not p.exists():
            raise KDError(
                f"data.dataset.path {self.path} is not a file or folder here; kdkit never "
                "downloads a dataset: save_to_disk it where there is a network, then path: DIR"
            )
        if p.is_file():
            return [p]
        return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))

    def _load(self) -> Any:
        try:
            import datasets
        except ImportError as e:
            msg = f"data.dataset needs the 'datasets' package ({e}); pip install 'kdkit[datasets]'"
            raise KDError(msg) from None
        p = Path(self.path).expanduser()
        files = self.files()
        marks = {"dataset_info.json", "dataset_dict.json", "state.json"}
        try:
            if p.is_dir() and marks & {f.name for f in files}:
                ds = datasets.load_from_disk(str(p))
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise KDError(
                            f"data.dataset: {p} has splits {sorted(ds)}, not {self.split!r}; "
                            "set data.dataset.split"
                        )
                    ds = ds[self.split]
                return ds
            if p.is_file():
                builder = _BUILDERS.get(p.suffix.lower())
                if builder is None:
                    raise KDError(
                        f"data.dataset: {p} is not a {'/'.join(sorted(_BUILDERS))} file or a "
                        "dataset folder"
                    )
                return datasets.load_dataset(builder, data_files=str(p), split="train")
            return datasets.load_dataset(str(p), split=self.split)
        except KDError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets raises many types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise KDError(f"data.dataset {p}: {type(e).__name__}: {first}") from None

    def records(self, fmt: str) -> Iterator[Record]:
        """The format's records, one per dataset row, checked as JSONL records are."""
        ds = self._load()
        mapping = dict(self.fields)
        columns = {k: mapping.get(k, k) for k in FORMAT_KEYS[fmt]}
        missing = [c for c in columns.values() if c not in ds.column_names]
        if missing:
            raise KDError(
                f"data.dataset {self.path}: no column {missing[0]!r} (columns: "
                f"{ds.column_names}); set data.dataset.{_key_of(columns, missing[0])}_field"
            )
        for i, row in enumerate(ds.select_columns(list(columns.values()))):
            where = f"{self.path}[{self.split}][{i}]"
            obj = {k: row[c] for k, c in columns.items()}
            yield Record(where, _check_fields(where, obj, fmt))


def _key_of(columns: dict[str, str], column: str) -> str:
    return next(k for k, c in columns.items() if c == column)
