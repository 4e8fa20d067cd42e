"""Experiment trackers beside ``metrics.csv``: TensorBoard, MLflow, Weights & Biases.

Each is the tracker's own client, imported only when a run asks for it (``train.loggers``),
and kept to files: TensorBoard event files under ``RUN/tb``, an MLflow file store under
``RUN/mlruns``, a W&B run in offline mode under ``RUN/wandb`` (``wandb sync`` uploads it).
A missing package is one :class:`KDError` naming the extra to install. :class:`Trackers` is a
Trainer callback: per step every ``log_every`` steps (loss components, learning rate; also a
console line, trackers or not) and per epoch (the epoch's row), rank 0 only.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdkit.errors import KDError
from kdkit.train.metrics import report_epoch

__all__ = ["TRACKERS", "Trackers", "make_tracker"]

#: tracker name -> (module to import, pip extra)
TRACKERS = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}


def _client(name: str) -> Any:
    module, extra = TRACKERS[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KDError(
            f"train.loggers: {name} needs its package, which is not installed: "
            f"pip install 'kdkit[{extra}]'"
        ) from None


class _TensorBoard:
    def __init__(self, directory: Path) -> None:
        self.writer = _client("tensorboard").SummaryWriter(str(directory / "tb"))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, directory: Path) -> None:
        self.mlflow = _client("mlflow")
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # the user's server or database wins
            # a file store in the run directory: offline, nothing to set up. MLflow 3 keeps it
            # in "maintenance mode" behind this switch (still supported, no new features)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.mlflow.set_tracking_uri((directory / "mlruns").resolve().as_uri())
        self.run = self.mlflow.start_run(run_name=directory.name)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Wandb:
    def __init__(self, directory: Path) -> None:
        wandb = _client("wandb")
        mode = os.environ.get("WANDB_MODE", "offline")  # files unless the user says online
        self.run = wandb.init(dir=str(directory), name=directory.name, mode=mode, reinit=True)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


_MAKERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}


def make_tracker(name: str, directory: str | os.PathLike) -> Any:
    """One tracker writing under ``directory`` (the run directory)."""
    if name not in _MAKERS:
        raise KDError(f"train.loggers: unknown tracker {name!r}; known: {sorted(_MAKERS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return _MAKERS[name](directory)


class Trackers:
    """A Trainer callback feeding ``names`` trackers: each step's loss components and lr
    every ``log_every`` steps (None: per epoch only) under ``train/``, each epoch's row
    under ``epoch/``. The trackers are created (and a missing package refused) at once."""

    def __init__(
        self, names: Sequence[str], directory: str | os.PathLike, log_every: int | None = None
    ) -> None:
        from kdkit.train import distributed

        self.every = log_every
        self.trackers = [make_tracker(n, directory) for n in names] if distributed.is_main() else []

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def on_step(self, trainer: Any, out: Any) -> None:
        if not self.every or trainer.step % self.every or not trainer.is_main:
            return
        metrics = {f"train/loss_{k}": float(v) for k, v in out.components.items()}
        metrics["train/lr"] = float(trainer.optimizer.param_groups[0]["lr"])
        self._log(metrics, trainer.step)
        cells = "  ".join(f"{k.removeprefix('train/')} {v:.4g}" for k, v in metrics.items())
        report_epoch(f"step {trainer.step}  {cells}", trainer.options.progress)

    def on_epoch(self, trainer: Any, row: Mapping[str, Any]) -> None:
        numbers = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        numbers["epoch"] = numbers.get("epoch", 0.0) + 1  # counted from 1, as everywhere shown
        self._log({f"epoch/{k}": v for k, v in numbers.items() if k != "step"}, trainer.step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
