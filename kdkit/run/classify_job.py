"""The image-classification run: config -> data, teacher, student, Distiller -> Trainer.

What ``kdkit train`` builds for ``task: classify`` (the recipe's ``build``,
:mod:`kdkit.run.recipes.classify`). The builder, not the loop, seeds torch (the student's
initial weights depend on the seed alone), measures the ``auto`` choices on the first batch
(``teacher.backend``, ``train.channels_last``) and sets the student's memory format; nothing
is written here. A teacher cache is checked against the run's data by the Trainer's
``task.check_inputs`` (the same check a hand-built Trainer gets).
"""

from __future__ import annotations

import dataclasses

import torch

from kdkit.config import RunConfig, to_dict
from kdkit.run.data import run_views
from kdkit.run.device import run_device
from kdkit.run.fingerprints import run_fingerprints
from kdkit.run.models import run_teacher, run_temperature

__all__ = ["build_run", "build_trainer"]


def build_trainer(cfg: RunConfig, *, resume: bool = False, trust_code: bool = False):
    """Data, models, Distiller, input pipeline and Trainer for ``cfg`` (written nowhere yet).

    The builder, not the loop, seeds torch (the student's initial weights depend on the seed
    alone) and sets the student's memory format.
    """
    trainer, data, _ = build_run(cfg, resume=resume, trust_code=trust_code)
    return trainer, data


def build_run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    trust_code: bool = False,
    device: torch.device | None = None,
):
    """:func:`build_trainer` plus the ``auto`` choices it made (a list of
    :class:`~kdkit.teachers.autotune.Choice`, for ``choices.json`` and the report): measured
    on the first batch, or read back from the run directory on ``--resume``. ``device``:
    where it trains (default: :func:`~kdkit.run.device.run_device`, which joins torchrun)."""
    from kdkit.data.pipeline import InputPipeline
    from kdkit.run import autotune
    from kdkit.run.data import build_data, build_views
    from kdkit.run.models import build_distiller, build_student
    from kdkit.train import Trainer, distributed
    from kdkit.train.overlap import resumed_records
    from kdkit.train.precision import Precision

    device = device if device is not None else run_device(cfg.train)
    t = cfg.train
    data = build_data(  # compiled: no partial last batch to compile again for
        cfg.data,
        seed=t.seed,
        rank=distributed.rank(),
        world=distributed.world_size(),
        drop_last=t.compile,
        keep_unlabeled=cfg.teacher is not None,  # teacher: null trains on data.labeled alone
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
            tc, data.train_dataset, views, data.mean, data.std, run_temperature(cfg)
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
            "val_files": data.val_files,  # kdkit eval scores the same split later
        },
    )
    # train.overlap: the split, on the first batch (resumed: the recorded one)
    split = trainer.plan(resumed_records(recorded) if resume else None)[-1]
    choices += [split] if t.overlap == "auto" else []
    return trainer, data, choices
