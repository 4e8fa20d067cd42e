"""Rows and verdicts: a :class:`Case` per bad input, judged by :func:`judge_row`."""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from kdkit.errors import KDError

#: every row's verdict in this session (written to $KDKIT_HOSTILE_TALLY)
VERDICTS: dict[str, str] = {}


@dataclass
class Case:
    id: str
    run: Callable[[Any], Any]  # library: a callable; CLI: returns argv
    match: str = ""  # regex the one-line message must contain (clear cases)
    expect: str = "clear"  # or "correct": run returns True when the result is right
    cli: bool = False
    post: Callable[[Any], str | None] | None = None  # "loss" / "ran code" / None
    marks: list = field(default_factory=list)
    guard: Callable[[Any], Any] | None = None  # fx -> a context manager around the row


class WorkStarted(Exception):
    """Raised where the demo would start its real work: a check that comes after it is late
    (it would fail only after minutes of training)."""


def cli_rows(cases: list[Case]) -> list[Case]:
    """Mark ``cases`` as CLI rows (``run`` returns argv)."""
    for case in cases:
        case.cli = True
    return cases


def no_cuda(case: Case) -> Case:
    case.marks.append(
        pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    )
    return case


def params(cases: list[Case]) -> list:
    assert len({c.id for c in cases}) == len(cases), "row ids must be unique"
    return [pytest.param(c, id=c.id, marks=c.marks) for c in cases]


def _lib_verdict(case: Case, fx: Any) -> tuple[str, str]:
    try:
        result = case.run(fx)
    except KDError as err:
        if case.expect == "correct":
            return "confusing", f"KDError: {err}"
        return "clear", str(err)
    except Exception as err:  # noqa: BLE001 - classifying is the point
        return "confusing", f"{type(err).__name__}: {err}"
    if case.expect == "correct":
        return ("correct" if result is not False else "silent"), ""
    return "silent", f"no error (returned {result!r})"


def _cli_verdict(case: Case, fx: Any, capsys) -> tuple[str, str]:
    from kdkit.cli import main as cli_main

    argv = [str(a) for a in case.run(fx)]
    capsys.readouterr()
    try:
        rc = cli_main(argv)
    except SystemExit as exc:  # argparse in an older main
        rc = exc.code if isinstance(exc.code, int) else 2
    except WorkStarted:
        capsys.readouterr()
        return "late", "the work started before the input was checked"
    except Exception as err:  # noqa: BLE001 - an uncaught exception is a CLI traceback
        capsys.readouterr()
        return "crash", f"{type(err).__name__}: {err}"
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if rc == 0:
        return ("correct", "") if case.expect == "correct" else ("silent", "exit code 0")
    if rc == 2 and len(lines) == 1 and "Traceback" not in err:
        return "clear", lines[0]
    return "confusing", f"exit {rc}: {err[-400:]}"


def judge(case: Case, fx: Any, capsys) -> tuple[str, str]:
    """Run one row: its verdict and message (``post`` may make it worse)."""
    import contextlib

    with case.guard(fx) if case.guard is not None else contextlib.nullcontext():
        verdict, message = _cli_verdict(case, fx, capsys) if case.cli else _lib_verdict(case, fx)
    if case.post is not None:
        worse = case.post(fx)
        if worse:
            return worse, message
    return verdict, message


def judge_row(case: Case, fx: Any, capsys) -> None:
    """Judge one row, record its verdict, and assert it is the wanted one."""
    verdict, message = judge(case, fx, capsys)
    matched = verdict != "clear" or re.search(case.match, message)
    VERDICTS[case.id] = verdict if matched else "clear (unmatched)"
    want = "correct" if case.expect == "correct" else "clear"
    assert verdict == want, f"{case.id}: {verdict}: {message}"
    if want == "clear":
        assert re.search(case.match, message), f"{case.id}: message does not say: {message}"


def table() -> dict[str, list[Case]]:
    """Every room's rows: ``{module name: its CASES}`` (the modules are importable by name,
    as pytest imports them: ``tests/`` is on ``sys.path``)."""
    rooms = sorted(Path(__file__).parents[1].glob("test_hostile_*.py"))
    return {p.stem: importlib.import_module(p.stem).CASES for p in rooms}


def write_tally(verdicts: dict[str, str]) -> None:
    """Merge ``verdicts`` into ``$KDKIT_HOSTILE_TALLY`` (when set)."""
    path = os.environ.get("KDKIT_HOSTILE_TALLY")
    if not path or not verdicts:
        return
    old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    old.update(verdicts)
    Path(path).write_text(json.dumps(old, indent=1, sort_keys=True))


# -- posts: what a row must not have done ------------------------------------------------------
def pwned(fx: Any) -> str | None:
    """``ran code`` when a file made kdkit run ``PWN`` (it writes PWNED in the cwd)."""
    marker = fx.root / "PWNED"
    if marker.exists():
        marker.unlink()
        return "ran code"
    return None


def hang_post(row: str):
    """``post`` for an :func:`in_thread` row."""
    return lambda fx: "hang" if row in fx.hung else None


def in_thread(hung: set, row: str, fn, timeout: float = 15) -> object:
    """``fn()`` in a daemon thread: its exception is re-raised here, a timeout is recorded in
    ``hung`` (``hang_post`` then gives the verdict ``hang``; the thread is left behind)."""
    import threading

    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        hung.add(row)
        return None
    if "error" in box:
        raise box["error"]
    return box.get("result")


class memory_cap:  # noqa: N801 - used as a context manager, like a function
    """Lower this process's address-space limit to its current size + ``extra`` bytes for the
    ``with`` block (restored after): a row whose fix failed gets a MemoryError instead of
    thrashing a shared machine."""

    def __init__(self, extra: int = 2 << 30) -> None:
        self.extra = extra

    def __enter__(self) -> None:
        import resource

        self.old = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        hard = self.old[1]
        soft = size + self.extra
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

    def __exit__(self, *exc: object) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, self.old)


class file_size_cap:  # noqa: N801 - used as a context manager
    """Files this process writes cannot grow past ``limit`` bytes in the ``with`` block
    (``RLIMIT_FSIZE``, SIGXFSZ ignored): a write past it fails with EFBIG, as on a full disk."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        import resource
        import signal

        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old[1]))

    def __exit__(self, *exc: object) -> None:
        import resource
        import signal

        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        signal.signal(signal.SIGXFSZ, self.handler)
