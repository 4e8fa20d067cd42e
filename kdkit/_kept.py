"""What kdkit keeps in the folders it makes: a run directory and the two teacher caches.

Each kind of folder is recognized by a file kdkit writes first (a run's ``config.yaml`` /
``last.pt`` / ``best.pt``, a cache's ``meta.json`` or ``manifest.json`` with its format name)
and keeps files that later commands read back: ``--resume`` reads ``choices.json`` and
``extended.json``, ``kdkit eval`` / ``predict`` read ``classes.json``, a cache's readers its
manifest, shards and saved tokenizer. A command's output must never replace one of them,
whichever run or cache the command was given (:func:`kdkit._io.check_output_path` asks
:func:`kept_file`), and a folder of one kind is never filled as another (:func:`folder_kind`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["RUN", "RUN_FILES", "RUN_MARKS", "folder_kind", "kept_file"]

RUN = "run directory"
#: files that make a folder a run directory (any one of them)
RUN_MARKS = ("config.yaml", "last.pt", "best.pt")
#: what a run directory keeps: the Trainer's outputs, the records of ``auto`` choices, class
#: names and extensions, and the run lock (``tb/``, TensorBoard's folder, is kept whole)
RUN_FILES = (
    *RUN_MARKS,
    "metrics.csv",
    "report.md",
    "curves.png",
    "choices.json",
    "classes.json",
    "extended.json",
    ".kdkit.lock",
)
_RUN_FOLDERS = ("tb",)
#: a cache's manifest file -> (the kind of cache, the format name it records)
_CACHES = {
    "meta.json": ("teacher cache", "kdkit-teacher-cache"),
    "manifest.json": ("LM teacher cache", "kdkit-lm-topk"),
}
_MAX_MANIFEST = 256 << 20  # a manifest larger than this is not read to recognize a folder


def _format(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_MANIFEST:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def folder_kind(folder: str | os.PathLike) -> str | None:
    """``"run directory"``, ``"teacher cache"``, ``"LM teacher cache"`` or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for name, (kind, fmt) in _CACHES.items():
        if (folder / name).is_file() and _format(folder / name) == fmt:
            return kind
    if any((folder / n).is_file() for n in RUN_MARKS):
        return RUN
    return None


def kept_file(path: str | os.PathLike) -> tuple[str, Path] | None:
    """``(kind, folder)`` when ``path`` is a file the run or cache ``folder`` keeps: a run's
    own names (present or not: the run writes them later), or any existing file of a cache
    (its manifest, shards, saved tokenizer); None otherwise."""
    path = Path(path)
    parent = path.parent
    kind = folder_kind(parent)
    if kind == RUN and path.name in RUN_FILES:
        return kind, parent
    if kind is not None and kind != RUN and (path.exists() or path.name in _CACHES):
        return kind, parent
    grand = folder_kind(parent.parent)
    if grand == RUN and parent.name in _RUN_FOLDERS:
        return grand, parent.parent
    if grand is not None and grand != RUN and path.exists():  # a cache's tokenizer/ folder
        return grand, parent.parent
    return None
