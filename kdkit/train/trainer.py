"""One loop for every task: precision, accumulation, DDP, the NaN guard, checkpoints, resume.

The loop knows nothing about images or tokens. A *task* (:mod:`kdkit.task`) owns the step and
the evaluation; an input pipeline turns a raw batch into the task's input. One step, one room
per line::

    batch = self.inputs(raw, epoch)                          # data/pipeline.py (or lm/)
    with self.precision.autocast():                          # train/precision.py
        out = StepOutput(**self._ddp_step(batch))            # the task, via DDP (#124666)
    self.nan_guard.record(out.loss, out.components, ...)     # train/nan_guard.py
    self.precision.backward_step(out.loss, self.optimizer, ...)  # train/precision.py

Checkpoints are atomic and complete (:mod:`kdkit.train.resume`), so a killed run resumed with
``fit(resume=True)`` ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import kdkit._sharding as fsdp
from kdkit._io import check_output_path
from kdkit._kept import RUN
from kdkit.data.pipeline import InputPipeline
from kdkit.data.unreadable import skip_counts
from kdkit.errors import KDError
from kdkit.load import save_checkpoint
from kdkit.metrics import check_best_metric
from kdkit.task import StepOutput, Task
from kdkit.train import distributed
from kdkit.train.ema import StudentEMA
from kdkit.train.metrics import MetricLog, epoch_line, report_epoch
from kdkit.train.nan_guard import NanGuard
from kdkit.train.optim import OptimizerArg, build_optimizer, build_scheduler
from kdkit.train.options import LoopOptions, trainer_from_config
from kdkit.train.overlap import Overlap, plan_first_batch
from kdkit.train.precision import Precision
from kdkit.train.resume import (
    check_run_info,
    restore_best,
    resume_trainer,
    save_epoch,
    trainer_state,
)
from kdkit.train.rundir import refuse_existing_run, run_lock

__all__ = ["Trainer", "StepOutput", "LoopOptions"]

log = logging.getLogger(__name__)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Train a task; evaluate, checkpoint and resume.

    Args:
        task: what to train: a :class:`~kdkit.Distiller` (image classification KD) or any
            :class:`~kdkit.task.Task` (e.g. :class:`kdkit.lm.LMTask`).
        train_loader: yields raw batches (``inputs`` turns each into the task's input).
        val_loader: optional held-out batches for ``task.evaluate`` each epoch.
        optimizer: an optimizer, a function ``params -> optimizer``, or None (AdamW, lr 1e-3).
        scheduler: a scheduler, a function ``optimizer -> scheduler``, or None.
        options: :class:`LoopOptions` (epochs, precision, accumulation, ...); its fields may
            also be given as keywords (``Trainer(d, loader, epochs=10)``).
        inputs: the input pipeline (default: an image :class:`~kdkit.data.pipeline.InputPipeline`
            with no augmentation, on the run's device).
        checkpoint_dir: where ``last.pt`` / ``best.pt`` / ``metrics.csv`` go (None: nowhere).
        run_info: plain data stored with the weights (``student_spec``, ``teacher_spec``,
            ``config``, ``input_shape``, ``mean``, ``std``: what ``kdkit eval/export`` read).
        callbacks: called as ``cb(trainer, step_output)`` after every step, or objects with
            ``on_step(trainer, out)`` and / or ``on_epoch(trainer, row)`` (and ``close()``,
            called when ``fit`` ends, e.g. :class:`kdkit.train.trackers.Trackers`).
        **option_keywords: :class:`LoopOptions` fields (``epochs=10``, ``precision="bf16"``);
            the first release's flat keywords (``views=``, ``student_spec=``...) still work for
            one release, translated outside the loop (:mod:`kdkit.train.legacy`) with a
            :class:`~kdkit.errors.KDDeprecationWarning`.
    """

    def __init__(
        self,
        task: Task,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        optimizer: OptimizerArg | None = None,
        scheduler: Any = None,
        *,
        options: LoopOptions | None = None,
        inputs: Callable[..., Any] | None = None,
        checkpoint_dir: str | Path | None = None,
        run_info: Mapping[str, Any] | None = None,
        callbacks: Iterable[Any] = (),
        **option_keywords: Any,
    ) -> None:
        if not isinstance(task, Task):
            raise KDError(
                f"Trainer needs a task (a kdkit.Distiller, kdkit.lm.LMTask or a subclass of "
                f"kdkit.task.Task), got {type(task).__name__}"
            )
        options, older = LoopOptions.merged(options, option_keywords)
        self.options = options
        self.device = torch.device(options.device) if options.device else _default_device()
        callbacks = list(callbacks)
        if older:  # the first release's flat keywords: translated outside the loop, warned
            from kdkit.train.legacy import translate_older_keywords

            done = translate_older_keywords(
                task, older, inputs=inputs, run_info=run_info, callbacks=callbacks,
                train_loader=train_loader, device=self.device,
            )  # fmt: skip
            inputs, run_info, callbacks = done.inputs, done.run_info, done.callbacks
        self.task = task.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        dataset = getattr(train_loader, "dataset", None)
        if inputs is None:  # images, no augmentation: uint8 to the device, scaled to [0, 1]
            inputs = InputPipeline(None, None, None, dataset=dataset)
        if hasattr(inputs, "to"):
            inputs.to(self.device)
        self.inputs = inputs
        self.run_info = check_run_info(run_info)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        if self.checkpoint_dir is not None and distributed.is_main():  # before the first step
            check_output_path(self.checkpoint_dir, what="checkpoint_dir", directory=True, makes=RUN)
        self.callbacks = callbacks
        task.check_inputs(dataset, self.inputs)  # e.g. a teacher cache of other data: refused
        self.precision = Precision(options.precision, self.device, options.grad_accum)
        every = options.nan_check_every or (50 if self.device.type == "cuda" else 1)
        last = self.checkpoint_dir / "last.pt" if self.checkpoint_dir else None
        self.nan_guard = NanGuard(every, last)
        if task.has_lazy_parameters:
            self._materialize_lazy_parameters()
        params = [p for p in task.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(optimizer, params)
        self.ema = StudentEMA(task, options.ema_decay) if options.ema_decay else None
        self.scheduler = build_scheduler(scheduler, self.optimizer)
        self._plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self._plateau and options.scheduler_interval == "step":
            raise KDError(
                "ReduceLROnPlateau steps once per epoch on the val loss: use "
                "scheduler_interval='epoch'"
            )
        # DDP wraps the step of the trainable part; a teacher is not in the task's module tree
        self._ddp_step = distributed.wrap(
            distributed.StepModule(task),
            self.device,
            find_unused_parameters=task.has_idle_parameters,
        )
        self.is_main = distributed.is_main()
        self._sharded = fsdp.is_sharded(task)
        self.overlap = Overlap(options.overlap, self.device)  # the teacher beside the student
        self.choices: list[Any] = []  # made on the first batch (plan); a resume's are recorded
        self.recorded_choices: dict[str, Any] = {}
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.best_metric, self.higher_is_better = task.best_metric
        check_best_metric(self.best_metric, self.higher_is_better)  # best.pt's direction
        if options.early_stopping is not None:  # a metric without a direction fails now
            options.early_stopping.resolve(self.best_metric, self.higher_is_better)
        self.best_score = -math.inf if self.higher_is_better else math.inf
        self._partial: dict[str, Any] | None = None  # loss sums of a resumed, unfinished epoch
        self._epoch_sums: dict[str, Any] = {}
        self._keep_best_in_memory = False
        self._best_weights: dict[str, dict[str, torch.Tensor]] | None = None

    # -- construction helpers ----------------------------------------------------------------
    def _materialize_lazy_parameters(self) -> None:
        """One dry run on the first batch, so lazily created loss adapters exist before the
        optimizer is built (they would never train otherwise). Under the run's autocast, with
        a training batch: a compiled model is warmed in the state it trains and evaluates in
        (Dynamo guards on the autocast state and the shapes)."""
        batch = next(iter(self.train_loader), None)
        if batch is None:
            raise KDError("the training loader yielded no batch")
        example = self.inputs(batch, 0)
        self.task.settle(example, inputs=self.inputs, autocast=self.precision.autocast)
        with self.precision.autocast():
            self.task.prepare(example)

    @property
    def distiller(self) -> Task:
        """The task (the name from when the loop trained Distillers only)."""
        return self.task

    @property
    def best_top1(self) -> float:
        """The best val score (the name from when it was always top-1): :attr:`best_score`."""
        return self.best_score

    @property
    def epochs(self) -> int:
        return self.options.epochs

    @epochs.setter
    def epochs(self, value: int) -> None:
        """``trainer.epochs = N`` (a first-release habit): the loop's options, range-checked."""
        self.options = dataclasses.replace(self.options, epochs=value)

    @classmethod
    def from_config(
        cls,
        config: Any,
        task: Task,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        **kwargs: Any,
    ) -> Trainer:
        """A Trainer whose options, optimizer and scheduler come from a config's ``train:``
        section (a :class:`~kdkit.config.TrainConfig` or a whole ``RunConfig``).

        OneCycleLR and CosineAnnealingLR get the run's length filled in. ``kwargs`` are the
        other keywords (``inputs``, ``checkpoint_dir``, ``run_info``, ``callbacks``, or the
        older flat ones); one the section sets is refused, except ``device`` (e.g. this rank's
        GPU under torchrun), which overrides ``train.device``. ``train.seed`` seeds torch's
        RNG and ``train.compile`` / ``train.channels_last`` are applied to the student here,
        in the builder, not in the loop.
        """
        return trainer_from_config(cls, config, task, train_loader, val_loader, **kwargs)

    def plan(self, recorded: Mapping[str, Any] | None = None) -> list[Any]:
        """The choices made on the first batch, once (:attr:`choices`): an ``auto`` teacher's
        backend, the ``overlap`` split (:mod:`kdkit.train.overlap`); ``recorded``: a resumed
        run's, kept. ``fit`` calls it; ``kdkit train``'s builder calls it first."""
        return plan_first_batch(self, recorded)

    # -- one step -------------------------------------------------------------------------
    def train_step(self, batch: Any, inputs: Any = None) -> StepOutput:
        """One optimisation step on a raw ``batch`` (``inputs``: its model input, made ahead
        by the overlapped loop): the task's step (through DDP when distributed), the NaN
        guard, then backward and (at accumulation boundaries) step."""
        inputs = self.inputs(batch, self.epoch) if inputs is None else inputs
        # DDP all-reduces gradients only on the micro-step that ends an accumulation
        sync = self.precision.steps_next or not hasattr(self._ddp_step, "no_sync")
        with (
            self.precision.autocast(),
            contextlib.nullcontext() if sync else self._ddp_step.no_sync(),
        ):
            out = StepOutput(**self._ddp_step(inputs))
        self.nan_guard.record(out.loss, out.components, self.step, self.epoch)
        stepped = self.precision.backward_step(
            out.loss,
            self.optimizer,
            self.task.parameters(),
            self.options.max_grad_norm,
            normalizer=out.normalizer,
        )
        if stepped and self.ema is not None:
            self.ema.update()
        return out.detached()

    # -- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool | str = False, restore_best: bool = False) -> list[dict[str, Any]]:
        """Train for ``options.epochs``; with ``resume=True`` continue from
        ``checkpoint_dir/last.pt`` (a missing file is an error: a typo'd directory must not
        silently start from scratch); ``resume="auto"`` continues when ``last.pt`` exists.

        Returns the per-epoch history. Afterwards the task holds the **last** epoch's
        weights, or with ``restore_best=True`` those of the best epoch by the task's
        ``best_metric`` (from ``best.pt`` when there is a ``checkpoint_dir``, else from a copy
        kept in memory). The optimizer state stays the last one either way.
        """
        if restore_best and self.val_loader is None:
            raise KDError("restore_best=True needs a val_loader: 'best' is chosen on it")
        if resume not in (False, True, "auto"):
            raise KDError(f"resume must be False, True or 'auto', got {resume!r}")
        locked = self.checkpoint_dir is not None and self.is_main  # one run per directory
        with run_lock(self.checkpoint_dir) if locked else contextlib.nullcontext():
            return self._fit(resume, restore_best)

    def _fit(self, resume: bool | str, restore_best: bool) -> list[dict[str, Any]]:
        if resume:
            resume = self._resume(required=resume is True)
        self.plan(self.recorded_choices if resume else None)
        if not resume and self.checkpoint_dir is not None:  # never train over a run
            refuse_existing_run(
                self.checkpoint_dir,
                ("last.pt", "best.pt", "metrics.csv"),
                fix="pass fit(resume=True) to continue it, or another checkpoint_dir",
            )
        self._keep_best_in_memory = restore_best and self.checkpoint_dir is None
        log_dir = self.checkpoint_dir if self.is_main else None
        metrics = MetricLog(log_dir, resume_epoch=self.epoch if resume else None)
        try:
            while self.epoch < self.epochs and not self._stop_early():
                row = self._train_epoch()
                if self.val_loader is not None:
                    row.update({f"val_{k}": v for k, v in self.evaluate().items()})
                row.update(skip_counts(self.train_loader, self.val_loader))  # unreadable files
                if self._plateau:  # once per epoch, on the val loss (else the train loss)
                    self.scheduler.step(row.get("val_loss", row.get("loss_total")))
                self.history.append(row)
                metrics.append(row)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._save_epoch(row)
                for cb in self.callbacks:
                    if callable(getattr(cb, "on_epoch", None)):
                        cb.on_epoch(self, row)
                show = self.options.progress and self.is_main
                report_epoch(epoch_line(row, self.epochs), show)  # printed without logging set up
        finally:
            self.overlap.close()
            metrics.close()
            for cb in self.callbacks:  # trackers flush and close their files
                close = getattr(cb, "close", None)
                if callable(close):
                    close()
        if restore_best:
            self._restore_best()
        return self.history

    def _stop_early(self) -> bool:
        """``options.early_stopping`` decided on the history (a resumed run included)."""
        es = self.options.early_stopping
        if es is None:
            return False
        column, higher = es.resolve(self.best_metric, self.higher_is_better)
        reason = es.reason_to_stop(self.history, column, higher)
        if reason is not None:
            report_epoch(reason, self.options.progress and self.is_main)
        return reason is not None

    def _batches(self) -> Iterable:
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler reshuffles per epoch
            sampler.set_epoch(self.epoch)
        if self.batch_in_epoch and hasattr(loader, "iter_from"):
            return loader.iter_from(self.batch_in_epoch)
        return itertools.islice(iter(loader), self.batch_in_epoch, None)

    def _train_epoch(self) -> dict[str, Any]:
        self.task.train()
        try:
            n_batches = len(self.train_loader)
        except TypeError:
            n_batches = None
        # a resumed mid-epoch run starts from the sums of the steps before the checkpoint
        partial = self._partial if self.batch_in_epoch else None
        self._partial = None
        sums: dict[str, Any] = dict(partial["sums"]) if partial else {}
        self._epoch_sums = sums
        done = partial["steps"] if partial else 0
        steps, items, start = 0, 0, time.perf_counter()
        unit = self.task.unit
        bar = tqdm(
            self._batches(),
            total=None if n_batches is None else n_batches - self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}/{self.epochs}",
            disable=not (self.options.progress and self.is_main),
            leave=False,
        )
        prepare = lambda b: self.inputs(b, self.epoch)  # noqa: E731
        for batch, inputs in self.overlap.batches(bar, prepare, self.task, self.precision.autocast):
            if n_batches:
                self.task.set_epoch(self.epoch + self.batch_in_epoch / n_batches)
            out = self.train_step(batch, inputs)
            self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
            steps, items = steps + 1, items + out.size
            for k, v in out.components.items():
                sums[k] = sums.get(k, 0) + v.float()
            if self.scheduler is not None and self.options.scheduler_interval == "step":
                self.scheduler.step()
            if steps % 20 == 0:
                rate = items / (time.perf_counter() - start)
                # a host sync, on purpose once every 20 steps; per token, as the epoch line says
                loss = float(out.loss) / (out.normalizer or 1)
                bar.set_postfix({"loss": f"{loss:.4f}", f"{unit}_s": f"{rate:.0f}"})
            for cb in self.callbacks:
                on_step = getattr(cb, "on_step", None)
                if callable(on_step):
                    on_step(self, out)
                elif callable(cb) and not hasattr(cb, "on_epoch"):
                    cb(self, out)
            every = self.options.checkpoint_every
            at_boundary = self.precision.at_step_boundary  # never save half-accumulated grads
            if every and self.step % every == 0 and at_boundary:
                self.save("last.pt")
        interval = self.options.scheduler_interval
        if self.scheduler is not None and interval == "epoch" and not self._plateau:
            self.scheduler.step()
        elapsed = time.perf_counter() - start
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        row.update({f"loss_{k}": float(v) / max(done + steps, 1) for k, v in sums.items()})
        row.update(self.task.epoch_stats())  # e.g. an on-policy run's sample statistics
        row["epoch_time_s"] = elapsed
        row[f"{unit}_per_s"] = items / elapsed if elapsed > 0 else 0.0
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        return row

    def evaluate(self, loader: Iterable | None = None) -> dict[str, float]:
        """The task's metrics on ``loader`` (default: the val loader), un-augmented."""
        loader = loader if loader is not None else self.val_loader
        if loader is None:
            raise KDError("no validation loader: pass val_loader= or evaluate(loader)")
        if distributed.is_distributed() and loader is self.val_loader and not self._sharded:
            # one evaluation of rank 0's model (its buffers on every rank), one answer for all;
            # a sharded (FSDP) model's forward is collective: every rank evaluates, all alike
            distributed.broadcast_buffers(self.task)
            return distributed.on_main(lambda: self._evaluate(loader))
        return self._evaluate(loader)

    def _evaluate(self, loader: Iterable) -> dict[str, float]:
        batches = (self.inputs(b, self.epoch, augment=False) for b in loader)
        with self._averaged():  # with train.ema: the average is what is evaluated
            return self.task.evaluate(batches, self.precision.autocast)

    def _averaged(self) -> contextlib.AbstractContextManager:
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    # -- checkpoints (kdkit/train/resume.py) ----------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly where training is now."""
        state = trainer_state(self)
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save(self, name: str = "last.pt") -> Path | None:
        """Atomically write the current state to ``checkpoint_dir/name`` (rank 0 only)."""
        self.nan_guard.check()  # never overwrite a good checkpoint with a NaN state
        if self.checkpoint_dir is None or not (self.is_main or self._sharded):
            return None
        state = self.state()  # sharded, every rank takes part in gathering it
        return save_checkpoint(self.checkpoint_dir / name, state) if self.is_main else None

    def _save_epoch(self, row: dict[str, Any]) -> None:
        save_epoch(self, row)

    def _restore_best(self) -> None:
        restore_best(self)

    def _resume(self, required: bool = True) -> bool:
        return resume_trainer(self, required)
