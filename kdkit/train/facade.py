"""darklight's ``StudentTrainer`` as a thin facade over :class:`Trainer` + :class:`Distiller`.

::

    trainer = kdkit.StudentTrainer(student, data_manager, "rn152.onnx", opt_params=opt_params)
    trainer.train(epochs=50, save="ckpt_{}.pth")
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.balance import LossBalancer
from kdkit.capture import unwrap
from kdkit.distiller import Distiller
from kdkit.errors import KDError
from kdkit.train.trainer import Trainer

__all__ = ["StudentTrainer"]

log = logging.getLogger(__name__)


def _loaders(data: Any) -> tuple[Any, Any]:
    """Accept a data manager (``.train_loader``/``.val_loader``), a pair, or one loader."""
    if hasattr(data, "train_loader"):
        return data.train_loader, getattr(data, "val_loader", None)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    if hasattr(data, "__iter__"):
        return data, None
    raise KDError("data must be a data manager with .train_loader, a (train, val) pair or a loader")


class StudentTrainer:
    """Train ``student`` against ``teacher`` with Hinton soft targets (or DeiT hard labels).

    ``teacher`` is anything :func:`kdkit.teacher` accepts: an ``nn.Module``, an ``.onnx``
    path (ONNX Runtime) or a TensorRT engine. ``opt_params`` is darklight's dict
    (``optimizer``, ``okwargs``, ``scheduler``, ``skwargs``; ``amplevel`` maps to
    ``precision``: None/"fp32", "bf16", "fp16"). Without labels (``labels=False``, or a
    dataset whose labels are -1) the student learns from the teacher alone.
    """

    def __init__(
        self,
        student: nn.Module,
        data: Any,
        teacher: Any,
        opt_params: dict | None = None,
        *,
        loss: str = "soft",
        temperature: float = 4.0,
        distill_weight: float = 0.5,
        student_weight: float = 0.5,
        device: str | torch.device | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        from kdkit.losses import HardLabel, SoftTargetKL

        if loss not in ("soft", "hard"):
            raise KDError(f"loss must be 'soft' (Hinton) or 'hard' (DeiT), got {loss!r}")
        criterion = SoftTargetKL(temperature=temperature) if loss == "soft" else HardLabel()
        self.distiller = Distiller(
            student,
            teacher,
            criterion,
            LossBalancer(student_weight=student_weight, distill_weight=distill_weight),
        )
        opt_params = dict(opt_params or {})
        amp = opt_params.pop("amplevel", None)
        trainer_kwargs.setdefault("precision", amp or "fp32")
        self.train_loader, self.val_loader = _loaders(data)
        for attr in ("mean", "std"):
            if attr not in trainer_kwargs and getattr(data, attr, None) is not None:
                trainer_kwargs[attr] = tuple(getattr(data, attr))
        self.opt_params = opt_params
        self.device = device
        self.trainer_kwargs = trainer_kwargs
        self.trainer: Trainer | None = None

    def train(self, epochs: int, save: str | None = "ckpt_{}.pth") -> list[dict]:
        """Train for ``epochs``; after each, save the student's weights to ``save.format(epoch)``."""
        save_cb = self._saver(save)
        self.trainer = Trainer(
            self.distiller,
            self.train_loader,
            self.val_loader,
            optimizer=self.opt_params or None,
            epochs=epochs,
            device=self.device,
            epoch_callbacks=[lambda trainer, row: save_cb(row["epoch"])],
            **self.trainer_kwargs,
        )
        return self.trainer.fit()

    def _saver(self, pattern: str | None):
        def save(epoch: int) -> None:
            if not pattern:
                return
            path = Path(pattern.format(epoch))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            torch.save(unwrap(self.distiller.student).state_dict(), tmp)
            tmp.replace(path)
            log.info("saved student to %s", path)

        return save

    def student(self) -> nn.Module:
        """The trained student, hooks removed (:meth:`Distiller.export`)."""
        return self.distiller.export()
