"""``kdkit train --resume --set train.epochs=N``: extending a finished (or running) run.

A resumed run must be the run it continues, so ``--resume`` refuses any other config; the one
change that keeps it the same run is a longer schedule: more epochs of the same loop, from
the checkpoint's exact state. Schedules fitted to the epoch count (``OneCycleLR`` and
``CosineAnnealingLR`` with ``total_steps`` / ``T_max`` filled in by kdkit) would end in the
middle of a new curve, so those are refused with the alternative (``--init-from RUN``).
``extended.json`` in the run directory keeps every extension for the report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kdkit.config import RunConfig
from kdkit.errors import KDError

__all__ = ["extension", "extension_note"]

log = logging.getLogger(__name__)

#: schedulers whose schedule is fitted to train.epochs (total_steps / T_max filled in)
_FITTED = ("OneCycleLR", "CosineAnnealingLR")


def extension(cfg: RunConfig, changed: dict) -> dict[str, tuple]:
    """The keys of ``changed`` that only lengthen a run (more ``train.epochs``), checked."""
    old, new = changed.get("train.epochs", (None, None))
    if old is None or new is None:
        return {}
    if new < old:
        raise KDError(
            f"--resume: train.epochs can only grow ({old} -> {new}); start a new run from "
            "this one's best student with --init-from RUN instead"
        )
    name = cfg.train.scheduler.name
    if name in _FITTED and not dict(cfg.train.scheduler.args):
        raise KDError(
            f"--resume --set train.epochs={new}: the {name} schedule was fitted to {old} "
            "epochs and cannot be extended; start a new run from this one's best student "
            "with --init-from RUN"
        )
    return {"train.epochs": (old, new)}


def extension_note(run_dir: Path, extended) -> str:
    """The report's record of ``--resume --set train.epochs=N`` (kept across later resumes
    in ``extended.json``)."""
    from kdkit._io import atomic_write_text, read_json

    path = Path(run_dir) / "extended.json"
    try:
        steps = read_json(path) if path.is_file() else []
    except KDError as err:  # a report note: never the end of a finished run
        log.warning("%s; its earlier extensions are left out of the report", err)
        steps = []
    ok = isinstance(steps, list) and all(
        isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in steps
    )
    if not ok:
        log.warning("%s is not a list of [from, to] epochs; left out of the report", path)
        steps = []
    if extended:
        steps.append(list(extended["train.epochs"]))
        atomic_write_text(path, json.dumps(steps) + "\n")
    chain = ", then ".join(f"from {a} to {b} epochs" for a, b in steps)
    return f"The schedule was extended with --resume ({chain})."
