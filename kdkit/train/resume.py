"""What the loop saves and restores: every RNG, the optimizer, the position, the task's weights.

A killed run resumed from ``last.pt`` ends with the same weights as one that was never
interrupted: the checkpoint holds the task's trainable parts (``student``, ``adapters``), the
optimizer, scheduler and scaler states, every RNG state, the epoch / step / batch position and
the loss sums of an unfinished epoch. The file format and the atomic write are on the ground
floor (:mod:`kdkit.load`), so export and teachers read checkpoints without the loop.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kdkit._sharding as fsdp
from kdkit.config import diff
from kdkit.errors import KDError
from kdkit.load import load_checkpoint, restore_part
from kdkit.registry import ModelSpec
from kdkit.train import distributed
from kdkit.train.overlap import resumed_records

#: plain data a checkpoint stores beside the weights (``kdkit eval/export/bench`` read them)
RUN_INFO_KEYS = (
    "student_spec",
    "teacher_spec",
    "config",
    "input_shape",
    "mean",
    "std",
    "classes",
    "fingerprints",  # {"teacher": ..., "cache": ..., "dataset": ...}: what the run depends on
    "val_files",  # an image-folder run's val split members (kdkit eval re-scores the same)
)
#: config keys that do not change a run's result (ignored when resume compares configs)
IGNORED_CONFIG_KEYS = ("versions", "run_dir", "train.progress")

__all__ = [
    "check_run_info",
    "rng_state",
    "set_rng_state",
    "cpu_copy",
    "trainer_state",
    "resume_trainer",
    "restore_best",
    "save_epoch",
    "check_same_run",
    "IGNORED_CONFIG_KEYS",
]

log = logging.getLogger(__name__)


def check_run_info(run_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """``run_info`` as a dict, its keys checked against what a checkpoint stores and a
    student spec parsed now (plain data naming a model: a bad one fails before training)."""
    info = dict(run_info or {})
    unknown = sorted(set(info) - set(RUN_INFO_KEYS))
    if unknown:
        raise KDError(f"run_info keys must be among {list(RUN_INFO_KEYS)}, got {unknown}")
    if info.get("student_spec") is not None:
        ModelSpec.parse(info["student_spec"], where="student_spec")
    return info


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values only, so the
    checkpoint loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`; the tensors may arrive on any device (they are read on the
    CPU, so a checkpoint loaded with ``map_location="cuda"`` still restores)."""
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = torch.as_tensor(keys).cpu()
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s).cpu() for s in state["cuda"]])


def cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def trainer_state(trainer: Any) -> dict[str, Any]:
    """What ``last.pt`` holds: the task's parts, the run info, optimizer, scheduler, scaler,
    RNG, position, the unfinished epoch's loss sums, the best score and the history."""
    scheduler = trainer.scheduler.state_dict() if trainer.scheduler is not None else None
    info = {k: trainer.run_info.get(k) for k in RUN_INFO_KEYS}
    for k in ("input_shape", "mean", "std"):
        if info[k] is None:
            info[k] = getattr(trainer.inputs, k, None)
        info[k] = list(info[k]) if info[k] else None
    if info["classes"] is not None:  # class names: what kdkit predict prints
        info["classes"] = [str(c) for c in info["classes"]]
    partial = None
    if trainer.batch_in_epoch:  # a resumed epoch's metrics row averages all of its steps
        sums = {k: float(v) for k, v in trainer._epoch_sums.items()}
        partial = {"sums": sums, "steps": trainer.batch_in_epoch}
    return {
        **trainer.task.checkpoint_state(),
        **info,
        "optimizer": fsdp.optimizer_state(trainer.task, trainer.optimizer),
        "optimizer_class": type(trainer.optimizer).__name__,
        "scheduler": scheduler,
        "precision": trainer.precision.state_dict(),
        "rng": rng_state(),
        "epoch": trainer.epoch,
        "step": trainer.step,
        "batch_in_epoch": trainer.batch_in_epoch,
        "epoch_partial": partial,
        "best_score": trainer.best_score,  # of the task's best_metric (top1, ppl...)
        "best_metric": trainer.best_metric,
        "history": trainer.history,
        # the first batch's measured choices (auto teacher backend, overlap split): kept
        "choices": {c.key: c.to_dict() for c in getattr(trainer, "choices", ())},
    }


def save_epoch(trainer: Any, row: dict[str, Any]) -> None:
    """At an epoch's end: the best score so far on the task's metric, ``last.pt`` and (when
    the epoch is the best) ``best.pt``, or an in-memory copy of the best weights without a
    checkpoint directory (``fit(restore_best=True)``)."""
    trainer.nan_guard.check()  # an epoch never ends with a NaN unreported
    score = row.get(f"val_{trainer.best_metric}")
    best = trainer.best_score
    better = score is not None and (score > best if trainer.higher_is_better else score < best)
    if better:
        trainer.best_score = score
    if trainer.checkpoint_dir is not None:
        trainer.save("last.pt")
        if better:
            with trainer._averaged():  # best.pt holds the weights that were evaluated
                trainer.save("best.pt")
    elif better and trainer._keep_best_in_memory:
        with trainer._averaged():
            state = trainer.task.checkpoint_state()
            trainer._best_weights = {k: cpu_copy(v) for k, v in state.items()}


def restore_best(trainer: Any) -> None:
    """Load the best epoch's weights into the task. Rank 0 reads them and broadcasts, so every
    rank ends identical even without a shared file system."""
    best = trainer._best_weights
    if trainer.checkpoint_dir is not None:
        distributed.barrier()  # rank 0 has finished writing best.pt
        path = trainer.checkpoint_dir / "best.pt"
        exists = trainer.is_main and path.exists()
        best = load_checkpoint(path, map_location="cpu") if exists else None
    sharded = fsdp.is_sharded(trainer.task)
    if sharded:  # every rank loads (a collective): rank 0's copy is broadcast into the shards
        found = distributed.all_reduce_sum(float(trainer.is_main and best is not None)) > 0
        best = (best or {}) if found else None
    if trainer.is_main or sharded:
        if best is None:
            log.warning("restore_best: no best weights were recorded; keeping the last")
        else:
            trainer.task.load_checkpoint_state(best, "best.pt")
            log.info(
                "restored the best weights (val %s %.4g)", trainer.best_metric, trainer.best_score
            )
    if not sharded:
        distributed.broadcast_state(trainer.task)


def check_same_run(path: Path | str, state: dict[str, Any], run_info: dict[str, Any]) -> None:
    """Refuse to resume when the config recorded *inside* the checkpoint (not ``config.yaml``,
    which a user can edit) differs from this run's, listing the keys, or when a fingerprint
    of what the run depends on (teacher weights, cache, dataset) changed since it was saved."""
    saved, this = state.get("config"), run_info.get("config")
    if isinstance(saved, dict) and isinstance(this, dict):
        changed = diff(saved, this, ignore=IGNORED_CONFIG_KEYS)
        # more epochs extend a run (kdkit/run/extend.py has already refused the schedules that
        # cannot be extended); every other difference is refused
        before, after = changed.get("train.epochs", (0, 0))
        if isinstance(before, int) and isinstance(after, int) and after > before:
            del changed["train.epochs"]
        if changed:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:8])
            raise KDError(
                f"cannot resume from {path}: this config differs from the one recorded in it "
                f"({len(changed)} key(s): {listed}); resume with the same config, or start a "
                "new run in another directory"
            )
    saved_fp, this_fp = state.get("fingerprints") or {}, run_info.get("fingerprints") or {}
    if isinstance(saved_fp, dict) and isinstance(this_fp, dict):
        changed_fp = sorted(k for k in saved_fp if k in this_fp and saved_fp[k] != this_fp[k])
        if changed_fp:
            raise KDError(
                f"cannot resume from {path}: the {', '.join(changed_fp)} changed since it was "
                "saved (fingerprints differ: a file was replaced); put the original back, or "
                "start a new run in another directory"
            )


def resume_trainer(trainer: Any, required: bool = True) -> bool:
    """Load ``checkpoint_dir/last.pt`` into ``trainer``; False when there is none and
    ``required`` is off (a missing file is an error otherwise: a typo'd directory must not
    silently start from scratch)."""
    if trainer.checkpoint_dir is None:
        raise KDError("resume needs checkpoint_dir")
    path = Path(trainer.checkpoint_dir) / "last.pt"
    if not path.exists():
        if required:
            raise KDError(
                f"resume=True but there is no checkpoint at {path}; check checkpoint_dir, "
                "or pass resume='auto' to start from scratch when there is none"
            )
        log.info("no checkpoint at %s: starting from scratch", path)
        return False
    # on the CPU: load_state_dict copies weights to their device, and the RNG states must be
    # CPU tensors (a CUDA map_location would break set_rng_state)
    state = load_checkpoint(path, map_location="cpu")
    check_same_run(path, state, trainer.run_info)
    trainer.task.load_checkpoint_state(state, str(path))
    this = type(trainer.optimizer).__name__
    saved = state.get("optimizer_class", this)
    if saved != this:
        raise KDError(
            f"cannot resume from {path}: it was trained with {saved}, this run builds {this}; "
            "resume with the same optimizer, or use another checkpoint_dir"
        )
    if fsdp.is_sharded(trainer.task):
        fsdp.load_optimizer_state(trainer.task, trainer.optimizer, state["optimizer"])
    else:
        restore_part(path, "optimizer", trainer.optimizer, state.get("optimizer"))
    if trainer.scheduler is not None and state["scheduler"] is not None:
        restore_part(path, "scheduler", trainer.scheduler, state["scheduler"])
    trainer.precision.load_state_dict(state["precision"])
    if getattr(trainer, "ema", None) is not None:  # train.ema: the average continues too
        trainer.ema.load_state_dict(state.get("ema"), str(path))
    trainer._partial = state.get("epoch_partial")
    trainer.recorded_choices = resumed_records(state.get("choices"))
    set_rng_state(state["rng"])
    trainer.epoch, trainer.step = state["epoch"], state["step"]
    trainer.batch_in_epoch = state["batch_in_epoch"]
    # checkpoints written before best_score was named for what it holds called it best_top1
    best = state["best_score"] if "best_score" in state else state["best_top1"]
    trainer.best_score, trainer.history = best, list(state["history"])
    log.info("resumed from %s at epoch %d, step %d", path, trainer.epoch, trainer.step)
    return True
