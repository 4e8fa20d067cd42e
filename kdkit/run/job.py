"""One ``kdkit train`` job, whatever the task: config -> the task's recipe builds -> run directory.

Order matters: the config is validated before anything is built, data and models are built
before anything is written, and the run directory gets ``config.yaml`` only once training is
about to start, so a bad config or a missing folder leaves no trace. The directory then holds
``config.yaml`` (resolved, absolute paths, kdkit/torch versions), ``metrics.csv``,
``last.pt`` / ``best.pt`` (student, teacher section and config: ``kdkit eval/export/bench``
rebuild both models from them alone) and ``report.md``. What is built and reported is the
task's business: its :class:`~kdkit.run.recipes.Recipe` (``recipe_for(cfg)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch

import kdkit
from kdkit._io import atomic_write_text
from kdkit.config import RunConfig, diff, parse, read_yaml, to_yaml
from kdkit.errors import KDError
from kdkit.run.autotune import keep_older_values, write_choices
from kdkit.run.classify_job import build_run, build_trainer
from kdkit.run.device import run_device
from kdkit.run.extend import extension
from kdkit.run.recipes import RunResult, recipe_for
from kdkit.train import distributed
from kdkit.train.rundir import refuse_existing_run, refuse_inputs_in_run, run_lock

__all__ = [
    "RunResult",
    "build_run",
    "build_trainer",
    "train_run",
    "check_run_dir",
    "saved_config",
]

_IGNORED = ("versions", "run_dir", "train.progress")  # do not change the result


def saved_config(run_dir: Path) -> RunConfig:
    """The resolved config a run directory was started with."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise KDError(f"nothing to resume in {run_dir}: it has no config.yaml")
    return parse(read_yaml(path))


def _input_files(cfg: RunConfig) -> list[str | None]:
    """The files a run reads (model paths, weights), to keep them out of its outputs."""
    files: list[str | None] = []
    for section in (cfg.teacher, cfg.student):
        model = getattr(section, "model", "") or ""
        files += [model.partition(":")[2] if model.startswith(("onnx:", "cache:")) else model]
        files += [getattr(section, "weights", None)]
    return files


def check_run_dir(cfg: RunConfig, resume: bool) -> dict[str, tuple]:
    """Refuse to overwrite a run, or to resume one with a different config (keys listed).
    Returns the keys that extend a resumed run (``{"train.epochs": (3, 5)}``), the only
    change ``--resume`` accepts."""
    run_dir = Path(cfg.run_dir)
    refuse_inputs_in_run(run_dir, _input_files(cfg))
    if resume:
        saved = saved_config(run_dir)
        changed = diff(saved, cfg, ignore=_IGNORED)
        extended = extension(cfg, changed)
        changed = {k: v for k, v in changed.items() if k not in extended}
        if changed:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:8])
            raise KDError(
                f"--resume: this config differs from the one {run_dir} was started with "
                f"({len(changed)} key(s): {listed}); resume with the same config, or start a "
                "new run with another --run-dir"
            )
        return extended
    refuse_existing_run(
        run_dir,
        fix="pass --resume to continue it, or --run-dir NEW (or --set name=NEW) for a new one",
    )
    return {}


def train_run(cfg: RunConfig, *, resume: bool = False, trust_code: bool = False) -> RunResult:
    """Run ``cfg`` into ``cfg.run_dir``, holding the directory's run lock throughout
    (:mod:`kdkit.train.rundir`). ``cfg`` is validated with its paths resolved
    (:func:`kdkit.config.load_resolved`, or :func:`~kdkit.config.validate` of a config built in
    Python): the builders trust it and check nothing twice."""
    # under torchrun the process group is not up yet: rank 0 is the launcher's RANK 0
    lock = run_lock(cfg.run_dir) if distributed.launch_rank() == 0 else contextlib.nullcontext()
    with lock:  # one run per run directory, from the check to the report
        return _train_run(cfg, resume=resume, trust_code=trust_code)


def _train_run(cfg: RunConfig, *, resume: bool, trust_code: bool) -> RunResult:
    if resume and (Path(cfg.run_dir) / "config.yaml").is_file():
        cfg = keep_older_values(cfg, saved_config(cfg.run_dir))
    extended = check_run_dir(cfg, resume)
    start = time.perf_counter()
    recipe = recipe_for(cfg)
    built = recipe.build(cfg, run_device(cfg.train), resume=resume, trust_code=trust_code)
    run_dir = Path(cfg.run_dir)
    if distributed.is_main():
        versions = {"kdkit": str(kdkit.__version__), "torch": str(torch.__version__)}
        run_dir.mkdir(parents=True, exist_ok=True)
        if built.choices:  # before config.yaml: a run with a config.yaml has its choices
            write_choices(run_dir, built.choices)
        text = to_yaml(dataclasses.replace(cfg, versions=versions))
        atomic_write_text(run_dir / "config.yaml", text)
        for name, content in built.files.items():  # kdkit predict / export read them
            atomic_write_text(run_dir / name, content)
    distributed.barrier()
    # config.yaml exists (checked): no last.pt yet means killed before the first checkpoint
    trainer = built.trainer
    history = trainer.fit(resume="auto" if resume else False)
    best = trainer.best_score if math.isfinite(trainer.best_score) else None
    result = RunResult(run_dir, history, best, None, trainer.best_metric)
    wall_s = time.perf_counter() - start
    recipe.report(cfg, built, result, wall_s=wall_s, extended=extended)  # every rank
    distributed.barrier()
    return result
