"""One readable training loop for a :class:`~kdkit.Distiller`.

Per step: the batch (uint8 images, labels with -1 for unlabeled rows, dataset indices) goes
to the device once; :func:`kdkit.data.views.prepare_input` applies the same augmentation view
for teacher and student and normalises; the distiller runs both models; labeled rows add the
task loss; :class:`~kdkit.train.precision.Precision` does autocast, scaling and the step.
Checkpoints are atomic and complete, so a killed run resumed with ``fit(resume=True)`` ends
with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kdkit._io import check_output_path
from kdkit.capture import unwrap
from kdkit.config import RunConfig, TrainConfig
from kdkit.distiller import Distiller, StepOutput
from kdkit.errors import KDError
from kdkit.registry import ModelSpec
from kdkit.train import distributed
from kdkit.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kdkit.train.metrics import MetricLog, topk_correct
from kdkit.train.optim import build_optimizer, build_scheduler
from kdkit.train.options import CONFIG_KEYWORDS, trainer_options
from kdkit.train.precision import Precision

__all__ = ["Trainer", "StepOutput"]

log = logging.getLogger(__name__)


class _StepModule(nn.Module):
    """:meth:`Distiller.step` as a module's ``forward``, so DDP wraps the whole step.

    The adapters are then used inside DDP's forward like the student: with
    ``find_unused_parameters`` (needed while ``start_epoch`` keeps them idle) DDP finds the
    parameters a step used by walking the graph from this forward's outputs, so the loss
    must be one of them. It returns a dict because DDP looks for tensors in dicts.
    """

    def __init__(self, distiller: Distiller) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, x, labels, index, view) -> dict[str, Any]:
        out = self.distiller.step(x, labels, index=index, view=view)
        return {"loss": out.loss, "components": out.components, "logits": out.logits}


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _restore(path: Path, part: str, target: Any, state: Any) -> None:
    """``target.load_state_dict(state)``; a checkpoint of another architecture or optimizer
    is a KDError naming the part, not a raw size-mismatch traceback."""
    if state is None:
        raise KDError(f"{path} has no {part!r} state; it is not a Trainer checkpoint")
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines() or [type(err).__name__]
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise KDError(
            f"cannot resume from {path}: its {part} does not fit this run's ({detail}); resume "
            "with the same model, losses and optimizer, or use another checkpoint_dir"
        ) from None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Train the distiller's student; evaluate, checkpoint and resume.

    ``optimizer`` is an optimizer, darklight's ``opt_params`` dict (``optimizer``, ``okwargs``,
    ``scheduler``, ``skwargs``) or None (AdamW). ``scheduler`` is stepped once per epoch
    (``scheduler_interval="step"`` for per-step schedules). ``views`` is a
    :class:`~kdkit.data.views.ViewSampler` (function matching: the teacher sees exactly the
    student's augmented view). ``mean``/``std`` normalise the uint8 batch on the device.
    ``student_spec`` (``{"factory": "pkg.mod:fn", "kwargs": {...}}``) and ``input_shape`` are
    stored in checkpoints so ``kdkit export`` can rebuild the student (``teacher_spec`` and
    ``run_config``, plain data, are stored too: ``kdkit train`` puts its teacher section and
    resolved config there). With a
    :class:`~kdkit.cache.CachedTeacher`, ``cache_check_teacher=`` (the live teacher) runs the
    fidelity gate on ``cache_check_probe`` samples before training starts.
    ``nan_check_every``: a non-finite loss stops training within this many steps (default 50
    on CUDA, where reading the flag is a host sync, and 1 on CPU).
    """

    def __init__(
        self,
        distiller: Distiller,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        epochs: int = 1,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        grad_accum: int = 1,
        checkpoint_dir: str | Path | None = None,
        seed: int = 0,
        *,
        views: Any = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        device: str | torch.device | None = None,
        scheduler_interval: str = "epoch",
        checkpoint_every: int | None = None,
        max_grad_norm: float | None = None,
        progress: bool = True,
        student_spec: dict | None = None,
        input_shape: tuple[int, ...] | None = None,
        teacher_spec: dict | None = None,
        run_config: dict | None = None,
        callbacks: Iterable[Callable[[Trainer, StepOutput], None]] = (),
        epoch_callbacks: Iterable[Callable[[Trainer, dict], None]] = (),
        cache_check_teacher: Any = None,
        cache_check_probe: int = 64,
        cache_dataset_check: bool = True,
        nan_check_every: int | None = None,
    ) -> None:
        if not isinstance(distiller, Distiller):
            raise KDError(f"Trainer needs a kdkit.Distiller, got {type(distiller).__name__}")
        if epochs < 1:
            raise KDError(f"epochs must be >= 1, got {epochs}")
        if scheduler_interval not in ("epoch", "step"):
            raise KDError(
                f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
            )
        self.device = torch.device(device) if device is not None else _default_device()
        self.distiller = distiller.to(self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.seed = epochs, seed
        self.views, self.mean, self.std = views, mean, std
        self.channels_last = channels_last
        self.precision = Precision(precision, self.device, grad_accum)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        if self.checkpoint_dir is not None and distributed.is_main():  # before the first step
            check_output_path(self.checkpoint_dir, what="checkpoint_dir", directory=True)
        self._partial: dict[str, Any] | None = None  # loss sums of a resumed, unfinished epoch
        self.checkpoint_every = checkpoint_every
        self.scheduler_interval = scheduler_interval
        self.max_grad_norm = max_grad_norm
        # reading a GPU flag waits for all queued work: check for NaN every N steps there
        self.nan_check_every = nan_check_every or (50 if self.device.type == "cuda" else 1)
        if self.nan_check_every < 1:
            raise KDError(f"nan_check_every must be >= 1, got {nan_check_every}")
        self._nan_step: torch.Tensor | None = None  # first non-finite step (-1: none), device
        self._nan_epoch: torch.Tensor | None = None
        self._nan_values: dict[str, torch.Tensor] = {}
        self._nan_pending = 0
        self.progress = progress
        if student_spec is not None:  # plain data naming a model, checked before the work
            ModelSpec.parse(student_spec, where="student_spec")
        self.student_spec, self.input_shape = student_spec, input_shape
        # plain data stored in checkpoints so `kdkit eval/export/bench RUN` rebuild both models
        self.teacher_spec, self.run_config = teacher_spec, run_config
        self.callbacks = list(callbacks)
        self.epoch_callbacks = list(epoch_callbacks)
        if cache_dataset_check:
            self._check_cache_dataset()
        if cache_check_teacher is not None:
            self._check_cache(cache_check_teacher, cache_check_probe)
        torch.manual_seed(seed)
        if channels_last:
            distiller.student.to(memory_format=torch.channels_last)
        self._prepare_adapters()
        opt_params = optimizer if isinstance(optimizer, dict) else None
        self.optimizer = build_optimizer(optimizer, distiller.parameters())
        self.scheduler = build_scheduler(scheduler, self.optimizer, opt_params)
        self._plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self._plateau and scheduler_interval == "step":
            raise KDError(
                "ReduceLROnPlateau steps once per epoch on the val loss: use "
                "scheduler_interval='epoch'"
            )
        if compile:
            distiller.student = torch.compile(distiller.student)
        # DDP wraps the step of the trainable part (student + adapters); the teacher is not in
        # the distiller's module tree. Before start_epoch the adapters get no gradient.
        idle_adapters = distiller.balancer.start_epoch > 0 and any(
            p.requires_grad for p in distiller.criterion.parameters()
        )
        self._model = distributed.wrap(
            _StepModule(distiller), self.device, find_unused_parameters=idle_adapters
        )
        self.is_main = distributed.is_main()
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.best_top1 = -math.inf
        self._keep_best_in_memory = False
        self._best_weights: dict[str, dict[str, torch.Tensor]] | None = None

    @classmethod
    def from_config(
        cls,
        config: TrainConfig | RunConfig,
        distiller: Distiller,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        **kwargs: Any,
    ) -> Trainer:
        """A Trainer whose options come from a config's ``train:`` section.

        ``config`` is a :class:`~kdkit.config.TrainConfig` or a whole
        :class:`~kdkit.config.RunConfig` (its ``train``). The section sets ``epochs``, the
        optimizer and scheduler (see :func:`~kdkit.train.options.trainer_options`: OneCycleLR
        and CosineAnnealingLR get the run's length filled in), ``precision``, ``seed``,
        ``device``, ``channels_last``, ``compile``, ``grad_accum``, ``max_grad_norm``,
        ``checkpoint_every`` and ``progress``. ``kwargs`` are the other keywords
        (``checkpoint_dir``, ``views``, ``mean``, ``std``, ``student_spec``, callbacks...);
        one the section sets is refused, except ``device`` (e.g. this rank's GPU under
        torchrun), which overrides ``train.device``.
        """
        train = config.train if isinstance(config, RunConfig) else config
        if not isinstance(train, TrainConfig):
            raise KDError(f"from_config needs a TrainConfig or RunConfig, got {type(config)}")
        clash = sorted(set(kwargs) & set(CONFIG_KEYWORDS) - {"device"})
        if clash:
            raise KDError(
                f"Trainer.from_config: {clash} come from the config's train section; change "
                "them there (kdkit train: --set train.KEY=VALUE)"
            )
        try:
            steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            steps_per_epoch = None
        options = trainer_options(train, steps_per_epoch)
        device = kwargs.pop("device", None)
        if device is not None:
            options["device"] = device
        return cls(distiller, train_loader, val_loader, **options, **kwargs)

    # -- data ---------------------------------------------------------------------------
    def _prepare_adapters(self) -> None:
        """One dry run so lazily created loss adapters exist before the optimizer is built."""
        batch = next(iter(self.train_loader), None)
        if batch is None:
            raise KDError("the training loader yielded no batch")
        x, _, index = self._unpack(batch)
        x, view_ids = self._input(x, index, epoch=0)
        self.distiller.prepare(
            x,
            index=None if index is None else index.to(self.device),
            view=None if view_ids is None else view_ids.to(self.device),
        )

    def _check_cache_dataset(self) -> None:
        """A cached teacher must have been precomputed on this loader's dataset (length, and
        fingerprint when the dataset has one): a cache of the test split never trains a run
        on the train split. ``cache_dataset_check=False`` skips it."""
        from kdkit.cache.cached_teacher import CachedTeacher, check_partners, check_run_dataset

        dataset = getattr(self.train_loader, "dataset", None)
        if isinstance(self.distiller.teacher, CachedTeacher) and dataset is not None:
            check_run_dataset(self.distiller.teacher.meta, dataset)
            # mixed views: the run must draw the partners the cache stored
            check_partners(self.distiller.teacher, self.views, dataset)

    def _check_cache(self, live_teacher: Any, n_probe: int) -> None:
        """The fidelity gate: a cached teacher must agree with the live one on this run's
        views and normalisation, or training stops before it learns from stale targets."""
        from kdkit.cache import CachedTeacher, check

        cached = self.distiller.teacher
        if not isinstance(cached, CachedTeacher):
            raise KDError("cache_check_teacher= is for runs whose teacher is a CachedTeacher")
        dataset = getattr(self.train_loader, "dataset", None)
        if dataset is None:
            raise KDError("the cache check needs a loader with a .dataset")
        # the cache was precomputed on this dataset (any order: check() looks rows up by
        # sample index) or on the dataset it is a subset of
        if len(dataset) != cached.num_samples:
            dataset = getattr(dataset, "base", dataset)
        report = check(
            cached.cache_dir,
            live_teacher,
            dataset,
            n_probe=n_probe,
            views=self.views,
            mean=self.mean,
            std=self.std,
            device=self.device,
        )
        log.info("cache check passed: %s", report)

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            return batch, None, None
        if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
            x, y, idx = (*batch, None, None)[:3]
            return x, y, idx
        raise KDError("batches must be images, (images, labels) or (images, labels, indices)")

    def _input(
        self, x, index, epoch: int, augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw batch -> model input; ``augment=False`` (evaluation) skips the views."""
        from kdkit.data.views import prepare_input

        views = self.views if augment else None
        view_ids = None
        if views is not None:
            if index is None:
                raise KDError("augmentation views need dataset indices: yield (x, y, index)")
            view_ids = views.view_ids(index, epoch)
        pool = self._mix_pool() if views is not None and views.mixes else None
        x = prepare_input(x, index, view_ids, views, self.mean, self.std, self.device, pool)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, view_ids

    def _mix_pool(self) -> Any:
        """The partner images of mixing views: the training loader's dataset, built once."""
        pool = getattr(self, "_pool", None)
        if pool is None:
            from kdkit.data.views import MixPool

            dataset = getattr(self.train_loader, "dataset", None)
            if dataset is None:
                raise KDError("mixup/cutmix views need a training loader with a .dataset")
            pool = self._pool = MixPool.from_dataset(dataset)
        return pool

    # -- one step -------------------------------------------------------------------------
    def train_step(self, batch: Any) -> StepOutput:
        """One optimisation step on ``batch``: :meth:`Distiller.step` (through DDP when
        distributed), the finiteness check, then backward and step."""
        x, y, index = self._unpack(batch)
        x, view_ids = self._input(x, index, self.epoch)
        idx_dev = index.to(self.device, non_blocking=True) if index is not None else None
        view_dev = view_ids.to(self.device) if view_ids is not None else None
        with self.precision.autocast():
            # y stays on the CPU: the step decides "any labeled row?" without a device sync
            out = StepOutput(**self._model(x, y, idx_dev, view_dev))
        self._check_finite(out)
        self.precision.backward_step(
            out.loss, self.optimizer, self.distiller.parameters(), self.max_grad_norm
        )
        return StepOutput(out.loss.detach(), out.components, out.logits.detach())

    def _check_finite(self, out: StepOutput) -> None:
        """Record on the device whether this step's loss is finite; read it every
        ``nan_check_every`` steps (and before any checkpoint is written), so training stops
        within N steps of a NaN, naming the component, and ``last.pt`` is never a NaN state.

        The first bad step's number and loss components are kept on the device with
        ``torch.where``: no host sync until :meth:`_read_nan_flag`."""
        bad = ~torch.isfinite(out.loss.detach())
        if self._nan_step is None or self._nan_epoch is None:
            self._nan_step = torch.full((), -1, dtype=torch.int64, device=bad.device)
            self._nan_epoch = torch.full((), -1, dtype=torch.int64, device=bad.device)
        first = bad & (self._nan_step < 0)
        self._nan_step = torch.where(first, self.step, self._nan_step)
        self._nan_epoch = torch.where(first, self.epoch, self._nan_epoch)
        for k, v in out.components.items():
            v = v.detach().float()
            kept = self._nan_values.get(k)
            self._nan_values[k] = torch.where(first, v, kept if kept is not None else 0.0)
        self._nan_pending += 1
        if self._nan_pending >= self.nan_check_every:
            self._read_nan_flag()

    def _read_nan_flag(self) -> None:
        """The deferred NaN check's one host sync; raises if a recorded step was not finite."""
        if self._nan_step is None or self._nan_pending == 0:
            return
        self._nan_pending = 0
        step = int(self._nan_step)
        if step < 0:
            return
        values = {k: float(v) for k, v in self._nan_values.items()}
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        culprit = next((k for k in bad if k != "total"), "total")
        last = self.checkpoint_dir / "last.pt" if self.checkpoint_dir else None
        where = f"; the last good checkpoint is {last}" if last and last.exists() else ""
        late = self.step - step
        seen = f" (seen {late} steps later, nan_check_every={self.nan_check_every})" if late else ""
        raise KDError(
            f"non-finite loss at epoch {int(self._nan_epoch)} step {step}: {culprit} = "
            f"{bad.get(culprit)} (components {bad}){seen}; lower the learning rate or check "
            f"the inputs{where}"
        )

    # -- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool | str = False, restore_best: bool = False) -> list[dict[str, Any]]:
        """Train for ``epochs``; with ``resume=True`` continue from ``checkpoint_dir/last.pt``
        (a missing file is an error: a typo'd directory must not silently start from
        scratch); ``resume="auto"`` continues when ``last.pt`` exists, else starts fresh.

        Returns the per-epoch history (one dict per epoch). Afterwards the distiller holds
        the **last** epoch's weights, or with ``restore_best=True`` those of the epoch with
        the highest ``val_top1`` (student and adapters, from ``best.pt`` when there is a
        ``checkpoint_dir``, else from a copy kept in memory). The optimizer state stays the
        last one either way, and ``last.pt`` keeps the last weights.
        """
        if restore_best and self.val_loader is None:
            raise KDError("restore_best=True needs a val_loader: 'best' is the highest val top-1")
        if resume not in (False, True, "auto"):
            raise KDError(f"resume must be False, True or 'auto', got {resume!r}")
        if resume:
            resume = self._resume(required=resume is True)
        self._keep_best_in_memory = restore_best and self.checkpoint_dir is None
        log_dir = self.checkpoint_dir if self.is_main else None
        metrics = MetricLog(log_dir, resume_epoch=self.epoch if resume else None)
        try:
            while self.epoch < self.epochs:
                row = self._train_epoch()
                if self.val_loader is not None:
                    row.update({f"val_{k}": v for k, v in self.evaluate().items()})
                if self._plateau:  # once per epoch, on the val loss (else the train loss)
                    self.scheduler.step(row.get("val_loss", row.get("loss_total")))
                self.history.append(row)
                metrics.append(row)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._save_epoch(row)
                for cb in self.epoch_callbacks:
                    cb(self, row)
                log.info(
                    " ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()
                    )
                )
        finally:
            metrics.close()
        if restore_best:
            self._restore_best()
        return self.history

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
        self.distiller.train()
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
        steps, images, start = 0, 0, time.perf_counter()
        bar = tqdm(
            self._batches(),
            total=None if n_batches is None else n_batches - self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}/{self.epochs}",
            disable=not (self.progress and self.is_main),
            leave=False,
        )
        for batch in bar:
            if n_batches:
                self.distiller.set_epoch(self.epoch + self.batch_in_epoch / n_batches)
            out = self.train_step(batch)
            self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
            steps, images = steps + 1, images + out.logits.shape[0]
            for k, v in out.components.items():
                sums[k] = sums.get(k, 0) + v.float()
            if self.scheduler is not None and self.scheduler_interval == "step":
                self.scheduler.step()
            if steps % 20 == 0:
                rate = images / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{float(out.loss):.4f}", img_s=f"{rate:.0f}")
            for cb in self.callbacks:
                cb(self, out)
            at_boundary = self.precision.at_step_boundary  # never save half-accumulated grads
            if self.checkpoint_every and self.step % self.checkpoint_every == 0 and at_boundary:
                self.save("last.pt")
        if self.scheduler is not None and self.scheduler_interval == "epoch" and not self._plateau:
            self.scheduler.step()
        elapsed = time.perf_counter() - start
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        row.update({f"loss_{k}": float(v) / max(done + steps, 1) for k, v in sums.items()})
        row["epoch_time_s"] = elapsed
        row["img_per_s"] = images / elapsed if elapsed > 0 else 0.0
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        return row

    @torch.no_grad()
    def evaluate(self, loader: Iterable | None = None) -> dict[str, float]:
        """Top-1 / top-5 accuracy (%) and cross-entropy of the student on labeled data."""
        loader = loader if loader is not None else self.val_loader
        if loader is None:
            raise KDError("no validation loader: pass val_loader= or evaluate(loader)")
        student = self.distiller.student
        was_training = student.training
        student.eval()
        correct1 = correct5 = n = 0
        loss_sum = 0.0
        try:
            for batch in loader:
                x, y, _ = self._unpack(batch)
                if y is None:
                    raise KDError("evaluation needs labels: yield (images, labels[, indices])")
                x, _ = self._input(x, None, self.epoch, augment=False)
                y = y.to(self.device)
                with self.precision.autocast():
                    logits = student(x).float()
                keep = y >= 0
                logits, y = logits[keep], y[keep]
                c1, c5 = topk_correct(logits, y)
                correct1, correct5, n = correct1 + c1, correct5 + c5, n + y.numel()
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        finally:
            student.train(was_training)
        if n == 0:
            raise KDError("the evaluation loader holds no labeled samples")
        return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}

    # -- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly where training is now."""
        scheduler = self.scheduler.state_dict() if self.scheduler is not None else None
        return {
            "student": unwrap(self.distiller.student).state_dict(),
            "adapters": self.distiller.criterion.state_dict(),
            "student_spec": self.student_spec,
            "teacher_spec": self.teacher_spec,
            "config": self.run_config,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "optimizer": self.optimizer.state_dict(),
            "optimizer_class": type(self.optimizer).__name__,
            "scheduler": scheduler,
            "precision": self.precision.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "epoch_partial": self._epoch_partial(),
            "best_top1": self.best_top1,
            "history": self.history,
        }

    def _epoch_partial(self) -> dict[str, Any] | None:
        """Loss sums of the unfinished epoch (floats), so a resumed epoch's metrics row
        averages every step of the epoch, not only those after the resume."""
        if not self.batch_in_epoch:
            return None
        sums = getattr(self, "_epoch_sums", {})
        return {"sums": {k: float(v) for k, v in sums.items()}, "steps": self.batch_in_epoch}

    def save(self, name: str = "last.pt") -> Path | None:
        """Atomically write the current state to ``checkpoint_dir/name`` (rank 0 only)."""
        self._read_nan_flag()  # never overwrite a good checkpoint with a NaN state
        if self.checkpoint_dir is None or not self.is_main:
            return None
        return save_checkpoint(self.checkpoint_dir / name, self.state())

    def _save_epoch(self, row: dict[str, Any]) -> None:
        self._read_nan_flag()  # an epoch never ends with a NaN unreported
        top1 = row.get("val_top1")
        is_best = top1 is not None and top1 > self.best_top1
        if is_best:
            self.best_top1 = top1
        if self.checkpoint_dir is not None:
            self.save("last.pt")
            if is_best:
                self.save("best.pt")
        elif is_best and self._keep_best_in_memory:
            self._best_weights = {
                "student": _cpu_copy(unwrap(self.distiller.student).state_dict()),
                "adapters": _cpu_copy(self.distiller.criterion.state_dict()),
            }

    def _restore_best(self) -> None:
        """Load the best epoch's student and adapters (see :meth:`fit`). Rank 0 reads them
        and broadcasts, so every rank ends identical even without a shared file system."""
        best = self._best_weights
        if self.checkpoint_dir is not None:
            distributed.barrier()  # rank 0 has finished writing best.pt
            path = self.checkpoint_dir / "best.pt"
            exists = self.is_main and path.exists()
            best = load_checkpoint(path, map_location=self.device) if exists else None
        if self.is_main:
            if best is None:
                log.warning("restore_best: no best weights were recorded; keeping the last")
            else:
                unwrap(self.distiller.student).load_state_dict(best["student"])
                self.distiller.criterion.load_state_dict(best["adapters"])
                log.info("restored the best weights (val top-1 %.2f%%)", self.best_top1)
        distributed.broadcast_state(self.distiller)

    def _resume(self, required: bool = True) -> bool:
        """Load ``last.pt``; ``False`` when there is none and ``required`` is off."""
        if self.checkpoint_dir is None:
            raise KDError("resume needs checkpoint_dir")
        path = self.checkpoint_dir / "last.pt"
        if not path.exists():
            if required:
                raise KDError(
                    f"resume=True but there is no checkpoint at {path}; check checkpoint_dir, "
                    "or pass resume='auto' to start from scratch when there is none"
                )
            log.info("no checkpoint at %s: starting from scratch", path)
            return False
        state = load_checkpoint(path, map_location=self.device)
        _restore(path, "student", unwrap(self.distiller.student), state.get("student"))
        _restore(path, "adapters", self.distiller.criterion, state.get("adapters"))
        saved_opt = state.get("optimizer_class", type(self.optimizer).__name__)
        if saved_opt != type(self.optimizer).__name__:
            raise KDError(
                f"cannot resume from {path}: it was trained with {saved_opt}, this run builds "
                f"{type(self.optimizer).__name__}; resume with the same optimizer, or use "
                "another checkpoint_dir"
            )
        _restore(path, "optimizer", self.optimizer, state.get("optimizer"))
        if self.scheduler is not None and state["scheduler"] is not None:
            _restore(path, "scheduler", self.scheduler, state["scheduler"])
        self.precision.load_state_dict(state["precision"])
        self._partial = state.get("epoch_partial")
        set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.best_top1, self.history = state["best_top1"], list(state["history"])
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)
        return True
