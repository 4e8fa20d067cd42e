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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdkit.capture import unwrap
from kdkit.distiller import Distiller
from kdkit.errors import KDError
from kdkit.train import distributed
from kdkit.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kdkit.train.metrics import MetricLog, topk_correct
from kdkit.train.optim import build_optimizer, build_scheduler
from kdkit.train.precision import Precision

__all__ = ["Trainer", "StepOutput"]

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one training step produced (``components`` are detached tensors)."""

    loss: torch.Tensor
    components: dict[str, torch.Tensor]
    logits: torch.Tensor


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
    stored in checkpoints so ``kdkit export`` can rebuild the student. With a
    :class:`~kdkit.cache.CachedTeacher`, ``cache_check_teacher=`` (the live teacher) runs the
    fidelity gate on ``cache_check_probe`` samples before training starts.
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
        callbacks: Iterable[Callable[[Trainer, StepOutput], None]] = (),
        epoch_callbacks: Iterable[Callable[[Trainer, dict], None]] = (),
        cache_check_teacher: Any = None,
        cache_check_probe: int = 64,
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
        self.checkpoint_every = checkpoint_every
        self.scheduler_interval = scheduler_interval
        self.max_grad_norm = max_grad_norm
        self.progress = progress
        self.student_spec, self.input_shape = student_spec, input_shape
        self.callbacks = list(callbacks)
        self.epoch_callbacks = list(epoch_callbacks)
        if cache_check_teacher is not None:
            self._check_cache(cache_check_teacher, cache_check_probe)
        torch.manual_seed(seed)
        if channels_last:
            distiller.student.to(memory_format=torch.channels_last)
        self._prepare_adapters()
        opt_params = optimizer if isinstance(optimizer, dict) else None
        self.optimizer = build_optimizer(optimizer, distiller.parameters())
        self.scheduler = build_scheduler(scheduler, self.optimizer, opt_params)
        if compile:
            distiller.student = torch.compile(distiller.student)
        # DDP wraps the distiller (student + adapters): the teacher is not in its module tree.
        self._model = distributed.wrap(distiller, self.device)
        self.is_main = distributed.is_main()
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.best_top1 = -math.inf

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
        report = check(
            cached.cache_dir,
            live_teacher,
            getattr(dataset, "base", dataset),
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
        x = prepare_input(x, index, view_ids, views, self.mean, self.std, self.device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, view_ids

    # -- one step -------------------------------------------------------------------------
    def train_step(self, batch: Any) -> StepOutput:
        x, y, index = self._unpack(batch)
        x, view_ids = self._input(x, index, self.epoch)
        n_labeled = int((y >= 0).sum()) if y is not None else 0  # y is on the CPU: no sync
        y_dev = y.to(self.device, non_blocking=True) if y is not None else None
        idx_dev = index.to(self.device, non_blocking=True) if index is not None else None
        view_dev = view_ids.to(self.device) if view_ids is not None else None
        with self.precision.autocast():
            logits = self._model(x, index=idx_dev, view=view_dev, labels=y_dev)
            task = None
            if n_labeled:
                # Per-sample weighting: the batch loss is the mean over ALL rows of
                # (task_i if labeled) + distill_i. A mean over the labeled rows alone would
                # give each of the ~2 labeled rows in a 1k-of-60k batch 60x the weight of an
                # unlabeled one (measured on Fashion-MNIST: 81.1% vs 87.2% after 2 epochs).
                task = (
                    F.cross_entropy(logits.float(), y_dev, ignore_index=-1, reduction="sum")
                    / y_dev.shape[0]
                )
            loss = self.distiller.compute_loss(task)
        self._check_finite(loss)
        self.precision.backward_step(
            loss, self.optimizer, self.distiller.parameters(), self.max_grad_norm
        )
        return StepOutput(loss.detach(), self.distiller.last_loss_tensors, logits.detach())

    def _check_finite(self, loss: torch.Tensor) -> None:
        if torch.isfinite(loss).item():
            return
        bad = {k: v for k, v in self.distiller.last_losses.items() if not math.isfinite(v)}
        culprit = next((k for k in bad if k != "total"), "total")
        last = self.checkpoint_dir / "last.pt" if self.checkpoint_dir else None
        where = f"; the last good checkpoint is {last}" if last and last.exists() else ""
        raise KDError(
            f"non-finite loss at epoch {self.epoch} step {self.step}: {culprit} = "
            f"{bad.get(culprit)} (components {bad}); lower the learning rate or check the "
            f"inputs{where}"
        )

    # -- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train for ``epochs``; with ``resume=True`` continue from ``checkpoint_dir/last.pt``."""
        if resume:
            self._resume()
        log_dir = self.checkpoint_dir if self.is_main else None
        metrics = MetricLog(log_dir, resume_epoch=self.epoch if resume else None)
        try:
            while self.epoch < self.epochs:
                row = self._train_epoch()
                if self.val_loader is not None:
                    row.update({f"val_{k}": v for k, v in self.evaluate().items()})
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
        return self.history

    def _batches(self) -> Iterable:
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        if self.batch_in_epoch and hasattr(loader, "iter_from"):
            return loader.iter_from(self.batch_in_epoch)
        return itertools.islice(iter(loader), self.batch_in_epoch, None)

    def _train_epoch(self) -> dict[str, Any]:
        self.distiller.train()
        try:
            n_batches = len(self.train_loader)
        except TypeError:
            n_batches = None
        sums: dict[str, torch.Tensor] = {}
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
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        elapsed = time.perf_counter() - start
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        row.update({f"loss_{k}": float(v) / max(steps, 1) for k, v in sums.items()})
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
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler,
            "precision": self.precision.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "best_top1": self.best_top1,
            "history": self.history,
        }

    def save(self, name: str = "last.pt") -> Path | None:
        """Atomically write the current state to ``checkpoint_dir/name`` (rank 0 only)."""
        if self.checkpoint_dir is None or not self.is_main:
            return None
        return save_checkpoint(self.checkpoint_dir / name, self.state())

    def _save_epoch(self, row: dict[str, Any]) -> None:
        if self.checkpoint_dir is None:
            return
        self.save("last.pt")
        top1 = row.get("val_top1")
        if top1 is not None and top1 > self.best_top1:
            self.best_top1 = top1
            self.save("best.pt")

    def _resume(self) -> None:
        if self.checkpoint_dir is None:
            raise KDError("resume=True needs checkpoint_dir")
        path = self.checkpoint_dir / "last.pt"
        if not path.exists():
            log.info("no checkpoint at %s: starting from scratch", path)
            return
        state = load_checkpoint(path, map_location=self.device)
        unwrap(self.distiller.student).load_state_dict(state["student"])
        self.distiller.criterion.load_state_dict(state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])
        set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.best_top1, self.history = state["best_top1"], list(state["history"])
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)
