"""The loop's options, and the one translation of a ``train:`` section into them.

:class:`LoopOptions` is what the :class:`~kdkit.Trainer` loop itself needs (epochs, precision,
accumulation, clipping, when to step the scheduler, checkpoint and NaN-check cadence,
progress, device), with the same range checks as the config schema. Only builders read config
(STYLE.md): :func:`loop_options` and :func:`trainer_from_config` (with the ground floor's
:func:`~kdkit._optim.optimizer_factory` and :func:`~kdkit._optim.scheduler_factory`, re-exported
here) turn a :class:`~kdkit.config.TrainConfig` into typed objects, for ``kdkit train``,
:meth:`kdkit.Trainer.from_config` and a user's script alike.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit._compile import compile_static
from kdkit._device import check_device
from kdkit._optim import PLATEAU, optimizer_factory, scheduler_factory
from kdkit.config import RunConfig, TrainConfig
from kdkit.data.pipeline import InputPipeline
from kdkit.errors import KDError
from kdkit.train import distributed
from kdkit.train.early_stopping import EarlyStopping
from kdkit.train.resume import RUN_INFO_KEYS

__all__ = [
    "LoopOptions",
    "loop_options",
    "global_batch_line",
    "optimizer_factory",
    "scheduler_factory",
    "trainer_from_config",
    "RUN_INFO_KEYS",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs, whatever the task.

    Args:
        epochs: passes over the training loader (>= 1).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 adds a grad scaler).
        grad_accum: micro-batches per optimizer step (>= 1).
        max_grad_norm: clip the gradient norm to this (None: no clipping).
        scheduler_interval: ``epoch`` or ``step``: when the scheduler steps.
        checkpoint_every: also write ``last.pt`` every N steps (None: at epoch ends only).
        nan_check_every: read the non-finite flag every N steps (None: 50 on CUDA, where
            reading it is a host sync, 1 elsewhere).
        progress: show a progress bar (rank 0).
        device: where the task runs (None: CUDA when available, else CPU).
        early_stopping: an :class:`~kdkit.train.early_stopping.EarlyStopping` (None: off).
        ema_decay: keep an EMA of the student's weights with this decay; evaluation and
            ``best.pt`` are then the average's (:mod:`kdkit.train.ema`). None: off.
        overlap: run the teacher beside the student (:mod:`kdkit.train.overlap`): ``"auto"``
            measures the thread splits on the first batch and keeps the fastest (sequential
            unless an overlapped one is 5% faster), True keeps the fastest overlapped one,
            False never overlaps; or a split by name (``"off"``, ``"1+1"``, ``"stream"``).
    """

    epochs: int = 1
    precision: str = "fp32"
    grad_accum: int = 1
    max_grad_norm: float | None = None
    scheduler_interval: str = "epoch"
    checkpoint_every: int | None = None
    nan_check_every: int | None = None
    progress: bool = True
    device: str | torch.device | None = None
    early_stopping: EarlyStopping | None = None
    ema_decay: float | None = None
    overlap: bool | str = "auto"

    def __post_init__(self) -> None:
        from kdkit.train.precision import PRECISION_DTYPES

        checks = (
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("grad_accum", self.grad_accum >= 1, "an integer >= 1"),
            ("precision", self.precision in PRECISION_DTYPES, f"one of {list(PRECISION_DTYPES)}"),
            (
                "scheduler_interval",
                self.scheduler_interval in ("epoch", "step"),
                "'epoch' or 'step'",
            ),
            (
                "checkpoint_every",
                self.checkpoint_every is None or self.checkpoint_every >= 1,
                "None or >= 1",
            ),
            (
                "nan_check_every",
                self.nan_check_every is None or self.nan_check_every >= 1,
                "None or >= 1",
            ),
            (
                "max_grad_norm",
                self.max_grad_norm is None or self.max_grad_norm > 0,
                "None or > 0",
            ),
            ("ema_decay", self.ema_decay is None or 0 < self.ema_decay < 1, "None or in (0, 1)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise KDError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if isinstance(self.overlap, str) and self.overlap != "auto":
            from kdkit.train.overlap import Split

            Split.parse(self.overlap)  # "off", "stream" or "T+S": one line otherwise
        if isinstance(self.device, str):  # torch.device("foo") is a RuntimeError traceback
            check_device(self.device, "device")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def merged(
        cls, options: LoopOptions | None, keywords: Mapping[str, Any]
    ) -> tuple[LoopOptions, dict[str, Any]]:
        """``options`` (default: all defaults) with the keywords that are its fields applied
        (``Trainer(d, loader, epochs=10)``), and the other keywords, left for the caller."""
        fields = cls.fields()
        options = options or cls()
        given = {k: v for k, v in keywords.items() if k in fields}
        other = {k: v for k, v in keywords.items() if k not in fields}
        return (dataclasses.replace(options, **given) if given else options), other


def loop_options(train: TrainConfig, **overrides: Any) -> LoopOptions:
    """The :class:`LoopOptions` of a ``train:`` section. ``ReduceLROnPlateau`` steps once per
    epoch on the validation loss whatever ``interval`` says (a per-step plateau has nothing to
    measure)."""
    interval = "epoch" if train.scheduler.name == PLATEAU else train.scheduler.interval
    options = LoopOptions(
        epochs=train.epochs,
        precision=train.precision,
        grad_accum=train.grad_accum,
        max_grad_norm=train.max_grad_norm,
        scheduler_interval=interval,
        checkpoint_every=train.checkpoint_every,
        progress=train.progress,
        device=train.device,
        early_stopping=_early_stopping(train),
        ema_decay=None if train.ema is None else train.ema.decay,
        overlap=train.overlap,
    )
    return dataclasses.replace(options, **overrides)


def _early_stopping(train: TrainConfig) -> EarlyStopping | None:
    es = train.early_stopping
    if es is None:
        return None
    return EarlyStopping(
        metric=es.metric, patience=es.patience, min_delta=es.min_delta, mode=es.mode
    )


def global_batch_line(per_process: int | None, grad_accum: int) -> str:
    """What one optimizer step sees: ``data.batch_size`` is per process, so torchrun with N
    processes multiplies it by N (and ``grad_accum`` by its own factor): said, not silent."""
    world = distributed.world_size()
    if per_process is None:
        return f"global batch: the loader's batches x {world} process(es) x grad_accum {grad_accum}"
    return (
        f"global batch: {per_process * world * grad_accum} rows per optimizer step "
        f"({per_process} per process x {world} process{'es' if world != 1 else ''} x "
        f"grad_accum {grad_accum})"
    )


def trainer_from_config(
    trainer_cls: type,
    config: TrainConfig | RunConfig,
    task: Any,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    **kwargs: Any,
) -> Any:
    """:meth:`kdkit.Trainer.from_config`: the builder that reads the ``train:`` section."""
    train = config.train if isinstance(config, RunConfig) else config
    if not isinstance(train, TrainConfig):
        raise KDError(f"from_config needs a TrainConfig or RunConfig, got {type(config)}")
    set_by_section = set(LoopOptions.fields()) | {"optimizer", "scheduler", "seed"}
    set_by_section |= {"compile", "channels_last", "options"}
    clash = sorted(set(kwargs) & set_by_section - {"device"})
    if clash:
        raise KDError(
            f"Trainer.from_config: {clash} come from the config's train section; change "
            "them there (kdkit train: --set train.KEY=VALUE)"
        )
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    device = kwargs.pop("device", None)
    options = loop_options(train, **({"device": device} if device is not None else {}))
    log.info("%s", global_batch_line(getattr(train_loader, "batch_size", None), train.grad_accum))
    scheduler = scheduler_factory(
        train.scheduler, train.epochs, train.optimizer.lr, steps_per_epoch
    )
    torch.manual_seed(train.seed)
    student = getattr(task, "student", None)
    if isinstance(train.channels_last, bool):  # "auto": measured on the first batch (Trainer)
        if kwargs.get("inputs") is None:
            dataset = getattr(train_loader, "dataset", None)
            kwargs["inputs"] = InputPipeline(None, None, None, dataset=dataset)
        kwargs["inputs"].channels_last = train.channels_last
        if train.channels_last and isinstance(student, nn.Module):
            student.to(memory_format=torch.channels_last)
    if train.loggers or train.log_every:  # trackers: refused at once when a package is missing
        from kdkit.train.trackers import Trackers

        where = kwargs.get("checkpoint_dir")
        if where is None and train.loggers:
            raise KDError("train.loggers write under the run directory: give checkpoint_dir=")
        trackers = Trackers(train.loggers, where or ".", train.log_every)
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), trackers]
    trainer = trainer_cls(
        task,
        train_loader,
        val_loader,
        optimizer_factory(train.optimizer),
        scheduler,
        options=options,
        **kwargs,
    )
    if train.compile and isinstance(student, nn.Module):
        task.student = compile_static(student)
    return trainer
