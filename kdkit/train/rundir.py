"""A run directory's two rules: one run at a time, and nothing trained over without resume.

**The lock.** ``fcntl.flock`` on ``DIR/.kdkit.lock`` for the whole run: the OS drops it when
the process dies, so ``kill -9`` leaves no stale lock, and a second ``kdkit train`` (or
``Trainer.fit``) on the same directory is refused with one line naming the holder's pid. The
lock is re-entrant inside one process (``kdkit train`` holds it and its ``Trainer.fit`` takes it
again) because two ``flock`` s on two descriptors of one process would exclude each other.

**The outputs.** A directory that already holds kdkit outputs (:data:`RUN_OUTPUTS`) is a run:
training into it without ``resume`` would replace its ``best.pt`` and ``metrics.csv``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from kdkit._io import check_output_path
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
LOCK_NAME = ".kdkit.lock"

_held: dict[str, list[int]] = {}  # resolved dir -> [fd, depth] (re-entrant in one process)


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
    """``path`` and, when it is (or lies in) a run directory, that run's outputs: what a
    command reading ``path`` must never write over."""
    path = Path(path)
    run = path if path.is_dir() else path.parent
    files = [path]
    if existing_outputs(run, ("config.yaml", "last.pt", "best.pt")):
        files += [run / n for n in RUN_OUTPUTS if (run / n).exists()]
    return files


def _holder(lock_path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(lock_path.read_text().strip() or "0")
        if pid > 0:
            return f"process {pid}"
    return "another process"


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold ``directory``'s run lock for the ``with`` block (created if needed)."""
    import fcntl

    directory = Path(directory)
    created = not directory.exists()
    check_output_path(directory, what="the run directory", directory=True)
    key = str(directory.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    lock_path = directory / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise KDError(f"cannot lock the run directory {directory}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise KDError(
            f"{directory} is in use by {_holder(lock_path)} (a kdkit run holds its lock); wait "
            "for it to finish, or use another run directory"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock
            if created and [p.name for p in directory.iterdir()] == [LOCK_NAME]:
                with contextlib.suppress(OSError):  # a run that wrote nothing leaves no trace
                    lock_path.unlink()
                    directory.rmdir()


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
