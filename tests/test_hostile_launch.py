"""A launcher's environment (issue 40): what a scheduler or a hand-written launch script sets
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``) that torchrun
would have set consistently. ``kdkit train`` either runs (one process: ``WORLD_SIZE=1``) or
stops with one line, and a rank whose rank 0 never comes gives up after a timeout instead of
waiting for ever. Rows and verdicts: tests/_hostile/.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket

import pytest
from _hostile import Case, Fx, hang_post, in_thread, judge_row, params

from kdkit.errors import KDError

pytestmark = pytest.mark.usefixtures("one_thread")
_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "TORCHELASTIC_USE_AGENT_STORE", "KDKIT_RENDEZVOUS_TIMEOUT")  # fmt: skip


@contextlib.contextmanager
def _env(**values: str):
    """Exactly ``values`` among the launcher's variables for the block."""
    old = {k: os.environ.pop(k, None) for k in _VARS}
    os.environ.update(values)
    try:
        yield
    finally:
        for k in _VARS:
            os.environ.pop(k, None)
            if old[k] is not None:
                os.environ[k] = old[k]


_CRASHED: set[str] = set()


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _train(fx: Fx, name: str) -> list:
    return ["train", fx.cfg, "--run-dir", fx.root / "work" / name]


def _launched(row: str, **env: str):
    """``kdkit train`` under ``env``, in a thread (a rank that waits for ever is a hang):
    exit 2 with one line is that line as a KDError, exit 0 is True."""

    def run(fx: Fx) -> bool:
        from kdkit.cli import main

        values = {k: (_free_port() if v == "FREE" else v) for k, v in env.items()}
        err = io.StringIO()
        try:
            with _env(**values), contextlib.redirect_stderr(err):
                argv = [str(a) for a in _train(fx, row)]
                rc = in_thread(fx.hung, row, lambda: main(argv), timeout=40)
        except Exception:
            _CRASHED.add(row)  # out of kdkit.cli.main: a traceback
            raise
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        if rc == 2 and len(lines) == 1 and "Traceback" not in err.getvalue():
            raise KDError(lines[0])
        if rc == 0:
            return True
        raise RuntimeError(f"exit {rc}: {err.getvalue()[-300:]}")

    return run


def _post(row: str):
    hang = hang_post(row)
    return lambda fx: hang(fx) or ("crash" if row in _CRASHED else None)


def _row(row: str, match: str = "", expect: str = "clear", **env: str) -> Case:
    return Case(row, _launched(row, **env), match, expect=expect, post=_post(row))


CASES: list[Case] = [
    _row("env-rank-without-world-size", "WORLD_SIZE", RANK="1"),
    _row("env-rank0-without-world-size", "WORLD_SIZE", RANK="0"),
    _row("env-rank-not-a-number", "RANK", RANK="zero", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="FREE"),
    _row("env-world-size-not-a-number", "WORLD_SIZE", RANK="0", WORLD_SIZE="two", MASTER_ADDR="127.0.0.1", MASTER_PORT="FREE"),
    _row("env-rank-beyond-world-size", "RANK", RANK="2", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="FREE"),
    _row("env-world-size-zero", "WORLD_SIZE", RANK="0", WORLD_SIZE="0"),
    _row("env-rank-without-master-addr", "MASTER_ADDR", RANK="1", WORLD_SIZE="2"),
    _row("env-master-port-not-a-number", "MASTER_PORT", RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="http"),
    _row("env-local-rank-not-a-number", "LOCAL_RANK", RANK="1", WORLD_SIZE="2", LOCAL_RANK="x", MASTER_ADDR="127.0.0.1",
         MASTER_PORT="FREE"),
    _row("env-rank0-world-size-1-runs", expect="correct", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"),
    _row("env-rank1-world-size-2-no-rank0", "rank 0|timed out|MASTER", RANK="1", WORLD_SIZE="2", LOCAL_RANK="0",
         MASTER_ADDR="127.0.0.1", MASTER_PORT="FREE"),
]  # fmt: skip


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_launch(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)
