"""One ``kdkit train`` job: validated config -> data -> models -> Trainer -> run directory.

Order matters: the config is validated before anything is built, data and models are built
before anything is written, and the run directory gets ``config.yaml`` only once training is
about to start, so a bad config or a missing folder leaves no trace. The directory then holds
``config.yaml`` (resolved, absolute paths, kdkit/torch versions), ``metrics.csv``,
``last.pt`` / ``best.pt`` (student, teacher section and config: ``kdkit eval/export/bench``
rebuild both models from them alone) and ``report.md`` + ``curves.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdkit.config import (
    LMRunConfig,
    RunConfig,
    diff,
    parse,
    read_yaml,
    to_dict,
    to_yaml,
    validate,
)
from kdkit.errors import KDError
from kdkit.run.extend import extension
from kdkit.run.fingerprints import run_fingerprints
from kdkit.run.lm_job import build_lm_trainer
from kdkit.run.lm_report import lm_teacher_ppl, write_lm_report
from kdkit.run.run_report import teacher_top1, write_run_report
from kdkit.train.rundir import refuse_existing_run, refuse_inputs_in_run, run_lock

__all__ = [
    "RunResult",
    "build_run",
    "build_trainer",
    "train_run",
    "check_run_dir",
    "run_views",
    "saved_config",
]

log = logging.getLogger(__name__)

_IGNORED = ("versions", "run_dir", "train.progress")  # do not change the result


@dataclass
class RunResult:
    """What a run reached: the best val score (``best_top1`` for image runs, the lowest val
    perplexity for ``task: lm``: ``metric`` says which) and the teacher's on the same data."""

    run_dir: Path
    history: list[dict[str, Any]]
    best_top1: float | None
    teacher_top1: float | None
    metric: str = "top1"


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


def _run_temperature(cfg: RunConfig) -> float:
    """The temperature of the run's first logit pair that has one (the int8 gate's KL)."""
    for pair in cfg.distill.pairs:
        t = dict(pair.args).get("temperature")
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            return float(t)
    return 1.0


def run_teacher(tc: Any, cfg: RunConfig, data: Any, views: Any, trust_code: bool) -> Any:
    """The teacher section ``tc`` built for this run's data: its input shape, normalization,
    calibration images (int8), views and the first logit pair's temperature (the int8 gate)."""
    from kdkit.run.models import build_teacher

    return build_teacher(
        tc,
        trust_code=trust_code,
        input_shape=data.input_shape,
        mean=data.mean,
        std=data.std,
        calibration=data.train_dataset,
        views=views,
        temperature=_run_temperature(cfg),
    )


def _device(cfg: RunConfig) -> torch.device:
    from kdkit.train import distributed

    device = distributed.init()  # torchrun: joins the group; alone: the default device
    if not distributed.is_main():  # rank 0 alone prints (and writes)
        logging.getLogger("kdkit").setLevel(logging.ERROR)
    if cfg.train.device is not None and not distributed.is_distributed():
        device = torch.device(cfg.train.device)
    return device


def run_views(cfg: RunConfig):
    """The run's ``data.views``; with a ``cache:`` teacher and no ``num_views`` set, the
    cache's own number of views (the config need not repeat what the cache says)."""
    v = cfg.data.views
    model = cfg.teacher.model if cfg.teacher is not None else ""
    prefix, _, cache_dir = model.partition(":")
    if v is not None and v.num_views is None and prefix == "cache":
        from kdkit.cache import read_meta

        meta = read_meta(cache_dir)
        if meta.get("views") is not None:
            v = dataclasses.replace(v, num_views=int(meta["num_views"]))
    return v


def build_trainer(cfg: RunConfig, *, resume: bool = False, trust_code: bool = False):
    """Data, models, Distiller, input pipeline and Trainer for ``cfg`` (written nowhere yet).

    The builder, not the loop, seeds torch (the student's initial weights depend on the seed
    alone), checks a teacher cache against the run, and sets the student's memory format.
    """
    trainer, data, _ = build_run(cfg, resume=resume, trust_code=trust_code)
    return trainer, data


def build_run(cfg: RunConfig, *, resume: bool = False, trust_code: bool = False):
    """:func:`build_trainer` plus the ``auto`` choices it made (a list of
    :class:`~kdkit.teachers.autotune.Choice`, for ``choices.json`` and the report): measured
    on the first batch, or read back from the run directory on ``--resume``."""
    from kdkit.cache.run_check import check_cache_for_run
    from kdkit.data.pipeline import InputPipeline
    from kdkit.run import autotune
    from kdkit.run.data import build_data, build_views
    from kdkit.run.models import build_distiller, build_student
    from kdkit.train import Trainer, distributed
    from kdkit.train.precision import Precision

    device = _device(cfg)
    t = cfg.train
    data = build_data(  # compiled: no partial last batch to compile again for
        cfg.data,
        seed=t.seed,
        rank=distributed.rank(),
        world=distributed.world_size(),
        drop_last=t.compile,
    )
    views = build_views(run_views(cfg), t.seed, data.input_shape[-1])
    dataset = getattr(data.train_loader, "dataset", None)
    recorded = autotune.read_choices(cfg.run_dir) if resume else {}
    choices, example = [], None

    def first_x() -> torch.Tensor:  # the first batch as the step sees it, drawn once
        nonlocal example
        if example is None:
            pipeline = InputPipeline(views, data.mean, data.std, device=device, dataset=dataset)
            example = autotune.first_input(data.train_loader, pipeline).x
        return example

    autocast = Precision(t.precision, device).autocast
    teacher = None
    if autotune.auto_teacher_applies(cfg):
        from kdkit.run.models import int8_options, teacher_module

        tc = cfg.teacher
        int8 = int8_options(
            tc, data.train_dataset, views, data.mean, data.std, _run_temperature(cfg)
        )
        teacher, choice = autotune.shared_choice(
            lambda record: autotune.choose_teacher(
                teacher_module(tc, trust_code=trust_code),
                first_x(),
                recorded=record,
                precision=tc.precision,
                features=any(p.teacher for p in cfg.distill.pairs),
                int8=int8,
                autocast=autocast,
            ),
            recorded.get("teacher.backend"),
        )
        choices.append(choice)
    elif cfg.teacher is not None:  # teacher: null trains on the labels alone
        teacher = run_teacher(cfg.teacher, cfg, data, views, trust_code)
    if teacher is not None:
        check_cache_for_run(teacher, dataset, sampler=views, device=device)
    torch.manual_seed(t.seed)
    student, student_spec = build_student(cfg.student, trust_code=trust_code)
    channels_last = t.channels_last
    if channels_last == "auto":
        _, choice = autotune.shared_choice(
            lambda record: (
                None,
                autotune.choose_channels_last(
                    student, first_x(), recorded=record, autocast=autocast
                ),
            ),
            recorded.get("train.channels_last"),
        )
        choices.append(choice)
        channels_last = bool(choice.value)
    if t.sync_batchnorm:  # before DDP wraps it; the checkpoint keys stay BatchNorm's
        student = distributed.sync_batchnorm(student, device)
    distiller = build_distiller(cfg, student, teacher, trust_code=trust_code)
    inputs = InputPipeline(
        views, data.mean, data.std, device=device, channels_last=channels_last, dataset=dataset
    )
    # the train: section -> loop options, optimizer, schedule (Trainer.from_config)
    trainer = Trainer.from_config(
        dataclasses.replace(cfg, train=dataclasses.replace(t, channels_last=channels_last)),
        distiller,
        data.train_loader,
        data.val_loader,
        device=device,
        inputs=inputs,
        checkpoint_dir=cfg.run_dir,
        run_info={
            "student_spec": student_spec,
            "input_shape": data.input_shape,
            "classes": data.classes,
            "teacher_spec": None if cfg.teacher is None else to_dict(cfg.teacher),
            "config": to_dict(cfg),
            "fingerprints": run_fingerprints(teacher, dataset),
        },
    )
    return trainer, data, choices


def train_run(cfg: RunConfig, *, resume: bool = False, trust_code: bool = False) -> RunResult:
    """Run ``cfg`` (already validated, paths resolved) into ``cfg.run_dir``, holding the
    directory's run lock throughout (:mod:`kdkit.train.rundir`)."""
    from kdkit.train import distributed

    validate(cfg)
    # under torchrun the process group is not up yet: rank 0 is the launcher's RANK 0
    lock = run_lock(cfg.run_dir) if distributed.launch_rank() == 0 else contextlib.nullcontext()
    with lock:  # one run per run directory, from the check to the report
        return _train_run(cfg, resume=resume, trust_code=trust_code)


def _train_run(cfg: RunConfig, *, resume: bool, trust_code: bool) -> RunResult:
    import kdkit
    from kdkit._io import atomic_write_text
    from kdkit.train import distributed

    if resume and (Path(cfg.run_dir) / "config.yaml").is_file():
        from kdkit.run.autotune import keep_older_values

        cfg = keep_older_values(cfg, saved_config(cfg.run_dir))
    extended = check_run_dir(cfg, resume)
    start = time.perf_counter()
    lm = isinstance(cfg, LMRunConfig)
    choices = []
    if lm:
        trainer, data = build_lm_trainer(cfg, _device(cfg), trust_code=trust_code)
    else:
        trainer, data, choices = build_run(cfg, resume=resume, trust_code=trust_code)
    run_dir = Path(cfg.run_dir)
    if distributed.is_main():
        from kdkit.run.autotune import write_choices

        versions = {"kdkit": str(kdkit.__version__), "torch": str(torch.__version__)}
        run_dir.mkdir(parents=True, exist_ok=True)
        if choices:  # before config.yaml: a run with a config.yaml has its choices
            write_choices(run_dir, choices)
        text = to_yaml(dataclasses.replace(cfg, versions=versions))
        atomic_write_text(run_dir / "config.yaml", text)
        if not lm and data.classes:  # kdkit predict / export read them (also in every .pt)
            atomic_write_text(run_dir / "classes.json", json.dumps(list(data.classes)) + "\n")
    distributed.barrier()
    # config.yaml exists (checked): no last.pt yet means killed before the first checkpoint
    history = trainer.fit(resume="auto" if resume else False)
    result = RunResult(run_dir, history, None, None, trainer.best_metric)
    if math.isfinite(trainer.best_score):
        result.best_top1 = trainer.best_score
    if lm:
        result.teacher_top1 = lm_teacher_ppl(trainer, data)  # every rank (a sharded teacher)
        if distributed.is_main():
            write_lm_report(cfg, trainer, result, time.perf_counter() - start)
        distributed.barrier()
        return result
    if distributed.is_main():
        result.teacher_top1 = teacher_top1(trainer, data)
        write_run_report(cfg, trainer, data, result, time.perf_counter() - start, extended, choices)
    distributed.barrier()
    return result
