"""One kdkit command per folder: ``fcntl.flock`` on ``DIR/.kdkit.lock``.

A run directory is locked for a whole ``kdkit train`` (:func:`kdkit.train.rundir.run_lock`),
a cache folder while ``kdkit precompute`` / ``kdkit lm capture`` writes it: a second command
on the same folder is refused with one line naming the holder's pid, so two writers never
both claim success. The OS drops the lock when the process dies (``kill -9`` leaves no stale
lock). The lock is re-entrant inside one process (``kdkit train`` holds it and its
``Trainer.fit`` takes it again): two ``flock`` s on two descriptors of one process would
exclude each other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from kdkit._io import check_output_path
from kdkit.errors import KDError

__all__ = ["LOCK_NAME", "folder_lock"]

LOCK_NAME = ".kdkit.lock"

_held: dict[str, list[int]] = {}  # resolved dir -> [fd, depth] (re-entrant in one process)


def _holder(lock_path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(lock_path.read_text().strip() or "0")
        if pid > 0:
            return f"process {pid}"
    return "another process"


@contextlib.contextmanager
def folder_lock(directory: str | os.PathLike, *, makes: str, what: str) -> Iterator[None]:
    """Hold ``directory``'s lock for the ``with`` block (the folder is created if needed and,
    when the command wrote nothing else, removed again). ``makes``: the kind of folder the
    command fills (a run or a cache of another kind is refused,
    :func:`kdkit._io.check_output_path`); ``what`` names it in messages."""
    import fcntl

    directory = Path(directory)
    created = not directory.exists()
    check_output_path(directory, what=what, directory=True, makes=makes)
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
        raise KDError(f"cannot lock {what} {directory}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise KDError(
            f"{directory} is in use by {_holder(lock_path)} (a kdkit command writing there holds "
            "its lock); wait for it to finish, or use another folder"
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
