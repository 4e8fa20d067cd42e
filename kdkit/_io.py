"""Files kdkit writes: one atomic writer and one checksum for the whole package.

Every artifact (checkpoint, cache shard, meta.json, ONNX file, engine, report) is written to a
temporary name in its final directory, flushed, fsynced and ``os.replace``d into place, so a
kill at any moment leaves the previous good file or the new verified one, never a torn file.
A writer that must verify its output first (ONNX export, int8 models) writes through
:func:`atomic_path`, checks the temporary file, and only then lets it replace the old one.

Temporary names are ``.<name>.kdkit-tmp-<pid>``; :func:`clean_stale_temps` removes those left
by killed processes the next time a directory is written. Files get the user's umask
(``mkstemp`` alone would make them 0600).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_MARKER",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_torch_save",
    "check_output_path",
    "check_not_special",
    "clean_stale_temps",
    "sha256_bytes",
    "sha256_file",
    "read_json",
    "state_checksum",
    "writing",
]

TMP_MARKER = ".kdkit-tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _feed(h: Any, value: Any) -> None:
    """Hash ``value`` in a fixed walk order (dict keys sorted by repr)."""
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"V{type(value).__name__}:{value!r}".encode())


def state_checksum(state: Mapping[str, Any], *, exclude: tuple[str, ...] = ()) -> str:
    """sha256 over a checkpoint-like mapping: every tensor's dtype, shape and bytes and every
    plain value, except the top-level keys in ``exclude`` (the header that holds the sum)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k not in exclude})
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove temporary files of killed writes in ``directory``; return what was removed.

    A temp file whose writer process is still alive is left alone (another writer at work).
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        name = path.name
        if TMP_MARKER not in name or not path.is_file():
            continue
        pid_text = name.rsplit(TMP_MARKER, 1)[1]
        pid = int(pid_text) if pid_text.isdigit() else -1
        if pid == os.getpid() or (pid > 0 and _pid_alive(pid)):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_not_special(path: str | os.PathLike, *, what: str = "the output") -> None:
    """Refuse an existing ``path`` that is not a regular file (a FIFO, socket, device node):
    ``os.replace`` would turn ``/dev/null`` into a file (as root) and opening a FIFO blocks.
    A symlink is fine (replacing it leaves its target alone); a directory is refused by the
    callers that want a file."""
    from kdkit.errors import KDError

    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode):
        return
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device node"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    raise KDError(f"{what} {path} exists and is {kind}, not a regular file; choose a file path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def read_json(path: str | os.PathLike, what: str = "", *, max_bytes: int = 256 << 20) -> Any:
    """A JSON file kdkit wrote (a manifest, ``choices.json``, ``classes.json``...) read back as
    the input it is: too large, not UTF-8, not JSON or nested too deeply is one
    :class:`~kdkit.errors.KDError` naming the file (``what``: the fix to add)."""
    from kdkit.errors import KDError

    path = Path(path)
    fix = f"; {what}" if what else ""
    try:
        if path.stat().st_size > max_bytes:
            raise KDError(f"{path} is over {max_bytes:,} bytes: not a file kdkit wrote{fix}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KDError(f"{path} is not valid JSON ({err}){fix}".splitlines()[0]) from None
    except RecursionError:
        raise KDError(f"{path} is JSON nested too deeply to be a file kdkit wrote{fix}") from None
    except OSError as err:
        raise KDError(f"cannot read {path} ({err.strerror or err}){fix}") from None


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn a failed write inside the block (a full disk, a file-size limit, a read-only
    folder: ``OSError``, or what a writer library such as safetensors or tokenizers raises in
    its place) into one :class:`~kdkit.errors.KDError` naming ``path``; a KDError passes."""
    from kdkit.errors import KDError

    try:
        yield
    except KDError:
        raise
    except Exception as err:  # noqa: BLE001 - writer libraries raise their own types for OSErrors
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0] if str(err) else ""
        raise KDError(
            f"cannot write {what + ' ' if what else ''}{path}: {reason or type(err).__name__} "
            "(is the disk full, or the file size limited?); free space or choose another place"
        ) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, clean: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    Write (and verify) the file at the yielded path inside the ``with`` block. If the block
    raises, the temporary file is removed and ``path`` is untouched. The parent directory is
    created if needed; stale temporaries of killed writers there are cleaned first.
    """
    path = Path(path)
    check_not_special(path)
    if path.is_dir():
        from kdkit.errors import KDError

        raise KDError(f"the output {path} is a directory; give a file name inside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean:
        clean_stale_temps(path.parent)
    tmp = path.parent / f".{path.name}{TMP_MARKER}{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        check_not_special(path)  # appeared while the file was written
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_path` (torch is imported only here)."""
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer: "unexpected pos", not an OSError
            raise _write_error(tmp, err) from None
    return Path(path)


def _write_error(tmp: Path, err: BaseException) -> OSError:
    """An ``OSError`` for a failed write that raised something else: ENOSPC when the disk
    has (next to) no space left, else EIO with the first line of the original message."""
    import errno

    try:
        st = os.statvfs(tmp.parent)
        full = st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp.parent))
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return OSError(errno.EIO, f"write failed ({first[:200]})", str(tmp.parent))


def check_output_path(
    path: str | os.PathLike,
    *,
    what: str = "the output",
    directory: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    makes: str | None = None,
) -> Path:
    """Check, before any work, that ``path`` (a file, or with ``directory`` a folder) can be
    written: its folder is created and a probe file written and removed there. Raises
    :class:`~kdkit.errors.KDError` naming the path and the fix; returns ``Path(path)``.

    An output that is one of the command's ``inputs`` (the same file, or for a folder output
    an input folder itself) is refused, and so is an existing output that is not a regular
    file (a FIFO, socket or device node: never replaced, never opened). A file a run
    directory or a cache keeps (:func:`kdkit._kept.kept_file`: ``choices.json``, a manifest,
    a shard...) is never an output, whatever the command was given; a folder output that is
    a run or a cache is refused unless it is the kind the command ``makes`` (``"run
    directory"``, ``"teacher cache"``, ``"LM teacher cache"``, or any other name, e.g.
    ``"demo folder"``, that no kdkit folder is).
    """
    from kdkit._kept import folder_kind, kept_file
    from kdkit.errors import KDError

    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise KDError(
                f"{what} {path} is one of this command's inputs ({source}); writing it would "
                "destroy the input: choose another output path"
            )
    if not directory and (kept := kept_file(path)) is not None:
        kind, folder = kept
        raise KDError(
            f"{what} {path} is a file kdkit keeps in the {kind} {folder} ({path.name}); "
            f"writing it would destroy that {kind}'s record: choose another path"
        )
    if directory and makes is not None:
        kind = folder_kind(path)
        if kind is not None and kind != makes:
            raise KDError(
                f"{what} {path} is a {kind}; writing a {makes} into it would mix the two and "
                "replace files it keeps: choose another folder"
            )
    if not directory:
        check_not_special(path, what=what)
    if directory and path.exists() and not path.is_dir():
        raise KDError(f"{what} {path} is an existing file, not a directory; choose a directory")
    if not directory and path.is_dir():
        raise KDError(f"{what} {path} is a directory; give a file name inside it")
    folder = path if directory else path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise KDError(f"cannot write {what} {path}: {existing} is a file, not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe{TMP_MARKER}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise KDError(
            f"cannot write {what} {path}: {err.strerror or err} ({folder}); choose a writable "
            "location"
        ) from None
    return path
