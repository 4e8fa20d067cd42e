"""A run directory's two rules: one run at a time, and nothing trained over without resume.

**The lock** (:mod:`kdkit._lock`, which caches take too): ``fcntl.flock`` on
``DIR/.kdkit.lock`` for the whole run, so a second ``kdkit train`` (or ``Trainer.fit``) on the
same directory is refused with one line naming the holder's pid; ``kill -9`` leaves no stale
lock, and the lock is re-entrant inside one process.

**The outputs.** A directory that already holds kdkit outputs (:data:`RUN_OUTPUTS`) is a run:
training into it without ``resume`` would replace its ``best.pt`` and ``metrics.csv``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from kdkit._kept import RUN, RUN_FILES, RUN_MARKS
from kdkit._lock import LOCK_NAME, folder_lock
from kdkit.errors import KDError

__all__ = [
    "RUN_OUTPUTS",
    "LOCK_NAME",
    "existing_outputs",
    "refuse_existing_run",
    "run_lock",
    "protected_files",
    "refuse_inputs_in_run",
]

#: what kdkit writes into a run directory (``kdkit train`` and ``Trainer(checkpoint_dir=)``)
RUN_OUTPUTS = ("config.yaml", "last.pt", "best.pt", "metrics.csv", "report.md", "curves.png")


def existing_outputs(directory: str | os.PathLike, names: Iterable[str] = RUN_OUTPUTS) -> list[str]:
    directory = Path(directory)
    return [n for n in names if (directory / n).exists()]


def refuse_existing_run(
    directory: str | os.PathLike, names: Iterable[str] = RUN_OUTPUTS, *, fix: str
) -> None:
    """KDError when ``directory`` already holds any of ``names`` (``fix`` says what to do)."""
    taken = existing_outputs(directory, names)
    if taken:
        raise KDError(f"{directory} already holds a run ({', '.join(taken)}); {fix}")


def protected_files(path: str | os.PathLike) -> list[Path]:
    """``path`` and, when it is (or lies in) a run directory, every file that run keeps
    (:data:`kdkit._kept.RUN_FILES`): what a command reading ``path`` must never write over."""
    path = Path(path)
    run = path if path.is_dir() else path.parent
    files = [path]
    if existing_outputs(run, RUN_MARKS):
        files += [run / n for n in RUN_FILES if (run / n).exists()]
    return files


@contextlib.contextmanager
def run_lock(
    directory: str | os.PathLike, *, makes: str = RUN, what: str = "the run directory"
) -> Iterator[None]:
    """Hold ``directory``'s lock for the ``with`` block (created if needed):
    :func:`kdkit._lock.folder_lock` with a run directory's defaults (caches take the same
    lock while a capture or precompute writes them)."""
    with folder_lock(directory, makes=makes, what=what):
        yield


def refuse_inputs_in_run(directory: str | os.PathLike, inputs: Iterable[str | None]) -> None:
    """A run must not write over a file it reads: refuse an input (a teacher's checkpoint,
    weights file) that is the run directory or one of its outputs."""
    import os.path

    directory = Path(directory)
    outputs = [directory / n for n in RUN_OUTPUTS]
    for source in inputs:
        if not source or not Path(source).exists():
            continue
        src = Path(source)
        if src.is_dir() and src.resolve() == directory.resolve():
            hit = directory
        else:
            hit = next((o for o in outputs if o.exists() and os.path.samefile(o, src)), None)
        if hit is not None:
            raise KDError(
                f"{source} is an input of this run and {hit} is where the run writes; copy it "
                "out of the run directory first, or use another run directory"
            )
