"""The hostile-input table's machinery for the per-room files (``tests/test_hostile_*.py``).

The verdicts and the judge are those of ``tests/test_hostile.py`` (imported, not copied); each
room keeps its own rows and, with ``KDKIT_HOSTILE_TALLY=path.json``, merges its verdicts into
that file (``tests/test_hostile.py`` writes it first when run in the same session), so one
command counts the whole table::

    KDKIT_HOSTILE_TALLY=/tmp/tally.json pytest tests/test_hostile.py tests/test_hostile_*.py
    python tests/_hostile_rows.py /tmp/tally.json
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
from pathlib import Path

import pytest
from test_hostile import Case, _judge  # noqa: F401 - re-exported for the rooms

__all__ = ["Case", "judge_row", "write_tally", "params"]


def params(cases: list[Case]) -> list:
    assert len({c.id for c in cases}) == len(cases), "row ids must be unique"
    return [pytest.param(c, id=c.id, marks=c.marks) for c in cases]


def judge_row(case: Case, fx, capsys, verdicts: dict[str, str]) -> None:
    """Judge one row, record its verdict, and assert it is the wanted one."""
    verdict, message = _judge(case, fx, capsys)
    matched = verdict != "clear" or re.search(case.match, message)
    verdicts[case.id] = verdict if matched else "clear (unmatched)"
    want = "correct" if case.expect == "correct" else "clear"
    assert verdict == want, f"{case.id}: {verdict}: {message}"
    if want == "clear":
        assert re.search(case.match, message), f"{case.id}: message does not say: {message}"


def write_tally(verdicts: dict[str, str]) -> None:
    """Merge ``verdicts`` into ``$KDKIT_HOSTILE_TALLY`` (when set)."""
    path = os.environ.get("KDKIT_HOSTILE_TALLY")
    if not path or not verdicts:
        return
    old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    old.update(verdicts)
    Path(path).write_text(json.dumps(old, indent=1, sort_keys=True))


def _count(path: str) -> None:
    verdicts = json.loads(Path(path).read_text())
    counts = collections.Counter(verdicts.values())
    print(f"{len(verdicts)} rows: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))


if __name__ == "__main__":
    _count(sys.argv[1])


# -- a tiny image run the rooms train with the CLI ------------------------------------------
CLASSES = ("cat", "dog")


def image_tree(root: Path, n_train: int = 3, n_val: int = 2, size: int = 16) -> Path:
    """root/{train,val}/{cat,dog}/i.png: noise tinted by class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (size, size, 3))
                pixels[..., label] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def teacher_weights(path: Path, seed: int = 0) -> Path:
    import torch

    from kdkit.models import fmnist_student

    torch.manual_seed(seed)
    torch.save(fmnist_student(num_classes=2, in_channels=3).state_dict(), path)
    return path


def run_config(tree: Path, weights: Path, **train) -> dict:
    """A config that trains in about a second on one CPU core."""
    model = {"model": "kdkit:fmnist_student", "kwargs": {"num_classes": 2, "in_channels": 3}}
    return {
        "name": "tiny",
        "teacher": {**model, "weights": str(weights)},
        "student": dict(model),
        "data": {
            "train": {"image_folder": str(tree / "train")},
            "val": {"image_folder": str(tree / "val")},
            "image_size": 16,
            "batch_size": 4,
            "workers": 0,
            "views": None,
        },
        "train": {"epochs": 1, "device": "cpu", "progress": False, **train},
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_in_child(hung: set, row: str, argv: list, timeout: float = 30) -> None:
    """Run ``kdkit ARGV`` in a child process, so a hang cannot hang the table: exit 2 with
    one line is raised here as that KDError, a timeout is recorded in ``hung`` (the row's
    ``post`` then gives the verdict ``hang``), any other failure is a RuntimeError."""
    import subprocess

    from kdkit.errors import KDError

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("PYTHONPATH", str(root))  # the kdkit under test (the tally runs others)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "kdkit", *map(str, argv)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        hung.add(row)
        return
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode == 2 and len(lines) == 1:
        raise KDError(lines[0])
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-300:]}")


def hang_post(row: str):
    """``post`` for a :func:`cli_in_child` row."""
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
