"""The one atomic writer: old file kept on failure, temps of killed writers cleaned, umask kept."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from kdkit._io import (
    TMP_MARKER,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    clean_stale_temps,
    sha256_file,
)


def test_failed_write_keeps_the_good_file(tmp_path):
    target = tmp_path / "model.onnx"
    atomic_write_bytes(target, b"good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half-written")
        raise RuntimeError("verification failed")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "meta.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text().startswith("{")


def test_temps_of_killed_writers_are_removed_on_the_next_write(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f".last.pt{TMP_MARKER}{dead.stdout.strip()}"
    live = tmp_path / f".other.pt{TMP_MARKER}{os.getppid()}"  # a writer still running
    stale.write_bytes(b"x" * 10)
    live.write_bytes(b"y")
    atomic_write_bytes(tmp_path / "last.pt", b"new")
    assert not stale.exists() and live.exists()
    assert clean_stale_temps(tmp_path / "missing") == []


def test_sha256_file(tmp_path):
    path = atomic_write_bytes(tmp_path / "x.bin", b"abc")
    assert sha256_file(path).startswith("ba7816bf")
