"""darklight's API on kdkit: ``StudentTrainer``, ``ImageNetManager``, ``exportonnx``.

A darklight script runs with its import line changed::

    import kdkit.compat.darklight as dl          # was: import darklight as dl

    dl.exportonnx(teacher, "rn152.onnx", bsize=1, hw=[224, 224])
    dm = dl.ImageNetManager("/data/imagenet/", size=[224, 224], bsize=128)
    trainer = dl.StudentTrainer(student, dm, "rn152.onnx", opt_params=opt_params)
    trainer.train(epochs=50, save="dltest_{}.pth")

What kdkit does differently, and says so in the log: an ``.onnx`` teacher runs on TensorRT
when ``tensorrt`` imports and a CUDA device is used, else on ONNX Runtime; apex ``amplevel``
"O1"/"O2" become fp16 autocast (bf16 on CPU); each ``save`` file is a kdkit checkpoint that
``kdkit export`` and :func:`kdkit.teacher` read (give ``student_spec=`` so they can rebuild
the model). A folder of images without ``train/`` and ``val/`` is darklight's unlabeled
"wild" data: the student learns from the teacher alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from kdkit.balance import LossBalancer
from kdkit.data.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderManager,
    UnlabeledFolderDataset,
    shard_sampler,
)
from kdkit.data.pipeline import InputPipeline
from kdkit.distiller import Distiller
from kdkit.errors import KDError
from kdkit.export import export_onnx
from kdkit.losses import HardLabel, SoftTargetKL
from kdkit.registry import ModelSpec, build_model
from kdkit.teachers.factory import make_teacher
from kdkit.teachers.tensorrt_teacher import import_tensorrt
from kdkit.train.checkpoint import save_checkpoint
from kdkit.train.precision import PRECISION_DTYPES
from kdkit.train.trainer import Trainer

__all__ = [
    "StudentTrainer",
    "ImageNetManager",
    "UnlabeledImageManager",
    "exportonnx",
    "precision_for_amplevel",
    "onnx_backend",
]

log = logging.getLogger(__name__)

#: apex optimisation levels (darklight's ``amplevel``): O0 is fp32, O1-O3 are mixed fp16
APEX_LEVELS = {"O0": "fp32", "O1": "fp16", "O2": "fp16", "O3": "fp16"}
_announced: set[tuple[str, str]] = set()


def precision_for_amplevel(amplevel: str | None, device: torch.device) -> str:
    """kdkit's precision for darklight's ``amplevel`` (None, apex "O0".."O3", or a kdkit
    name); an apex level is logged once per (level, precision), since kdkit has no apex."""
    if amplevel is None:
        return "fp32"
    if amplevel in PRECISION_DTYPES:
        return amplevel
    if amplevel not in APEX_LEVELS:
        raise KDError(
            f"amplevel must be None, one of {sorted(APEX_LEVELS)} (apex) or "
            f"{sorted(PRECISION_DTYPES)}, got {amplevel!r}"
        )
    precision = APEX_LEVELS[amplevel]
    if precision == "fp16" and device.type != "cuda":
        precision = "bf16"  # fp16 autocast needs CUDA; bf16 is CPU's mixed precision
    if (amplevel, precision) not in _announced:
        _announced.add((amplevel, precision))
        log.info(
            "amplevel %r (apex) runs as %s autocast%s: kdkit uses torch.autocast, not apex",
            amplevel,
            precision,
            "" if precision != "bf16" or amplevel == "O0" else " (fp16 needs a CUDA device)",
        )
    return precision


def onnx_backend(device: torch.device) -> tuple[str, str]:
    """``("tensorrt" | "onnx", why)``: TensorRT when it imports and ``device`` is CUDA."""
    if device.type != "cuda":
        return "onnx", f"the device is {device.type}, TensorRT needs a CUDA GPU"
    try:
        trt = import_tensorrt()
    except KDError:
        return "onnx", "tensorrt is not installed (pip install kdkit[tensorrt])"
    name = torch.cuda.get_device_name(device)
    return "tensorrt", f"tensorrt {getattr(trt, '__version__', '?')} imports and {name} is present"


def _teacher(teacher: Any, device: torch.device) -> Any:
    """An ``.onnx`` path runs on the fastest backend available (see :func:`onnx_backend`)."""
    if not isinstance(teacher, (str, os.PathLike)) or Path(teacher).suffix.lower() != ".onnx":
        return teacher
    backend, why = onnx_backend(device)
    label = "TensorRT" if backend == "tensorrt" else "ONNX Runtime"
    log.info("teacher %s runs on %s: %s", teacher, label, why)
    if backend == "onnx":
        return make_teacher(teacher, backend="onnx")
    try:
        return make_teacher(teacher, backend="tensorrt", device=device)
    except KDError as err:
        log.warning("TensorRT could not build %s (%s); ONNX Runtime runs it instead", teacher, err)
        return make_teacher(teacher, backend="onnx")


class _Unlabeled:
    """A loader whose labels are all -1 (``labels=False``); length and epoch pass through."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    @property
    def sampler(self) -> Any:
        """The wrapped loader's sampler, so the Trainer can ``set_epoch`` a DDP shard."""
        return getattr(self.loader, "sampler", None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, Any]]:
        for batch in self.loader:
            x, *rest = batch if isinstance(batch, (tuple, list)) else (batch,)
            index = rest[1] if len(rest) > 1 else None
            yield x, torch.full((x.shape[0],), -1, dtype=torch.int64), index


def _loaders(data: Any) -> tuple[Any, Any]:
    """Accept a data manager (``.train_loader``/``.val_loader``), a pair, or one loader."""
    if hasattr(data, "train_loader"):
        return data.train_loader, getattr(data, "val_loader", None)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    if hasattr(data, "__iter__"):
        return data, None
    raise KDError("data must be a data manager with .train_loader, a (train, val) pair or a loader")


def _spec_for(student: nn.Module, spec: Any) -> dict[str, Any] | None:
    """The student's model spec as data, checked against the student's own weights."""
    if spec is None:
        log.warning(
            "StudentTrainer got no student_spec: the per-epoch checkpoints hold the weights "
            "but not how to rebuild the model, so `kdkit export` and kdkit.make_teacher() cannot "
            "read them; pass student_spec='torchvision:resnet18' (or your registered model)"
        )
        return None
    parsed = ModelSpec.parse(spec, where="student_spec")
    built = build_model(parsed, where="student_spec").state_dict()
    own = student.state_dict()
    if {k: tuple(v.shape) for k, v in built.items()} != {k: tuple(v.shape) for k, v in own.items()}:
        raise KDError(
            f"student_spec {parsed.model} {dict(parsed.kwargs)} builds a model whose weights do "
            f"not match the student ({type(student).__name__}); fix the name or kwargs"
        )
    return parsed.to_dict()


_OPT_KEYS = {"optimizer", "okwargs", "scheduler", "skwargs", "amplevel"}


def from_opt_params(
    opt_params: Mapping[str, Any] | None,
) -> tuple[Callable[[Any], torch.optim.Optimizer], Callable[[Any], Any] | None]:
    """darklight's ``opt_params`` dict -> ``(optimizer factory, scheduler factory or None)``,
    the typed form :class:`kdkit.Trainer` takes (``optimizer=``, ``scheduler=``).

    ``optimizer`` is a ``torch.optim`` class (default AdamW with lr 1e-3, weight decay 0.01
    when neither it nor ``okwargs`` is given), ``okwargs`` its keywords; ``scheduler`` /
    ``skwargs`` likewise; ``amplevel`` is read by :func:`precision_for_amplevel`.
    """
    spec = dict(opt_params or {})
    unknown = set(spec) - _OPT_KEYS
    if unknown:
        raise KDError(f"unknown opt_params keys {sorted(unknown)}; expected {sorted(_OPT_KEYS)}")
    cls = spec.get("optimizer", torch.optim.AdamW)
    default = {"lr": 1e-3, "weight_decay": 0.01} if "optimizer" not in spec else {}
    okwargs = dict(spec.get("okwargs") or default)

    def optimizer(params: Any) -> torch.optim.Optimizer:
        try:
            return cls(params, **okwargs)
        except TypeError as err:
            name = getattr(cls, "__name__", cls)
            raise KDError(f"cannot build {name} with {okwargs}: {err}") from None

    sched_cls = spec.get("scheduler")
    if sched_cls is None:
        return optimizer, None
    skwargs = dict(spec.get("skwargs") or {})

    def scheduler(opt: torch.optim.Optimizer) -> Any:
        try:
            return sched_cls(opt, **skwargs)
        except TypeError as err:
            raise KDError(f"cannot build scheduler {sched_cls}: {err}") from None

    return optimizer, scheduler


#: the parts of a Trainer state only a resume reads (the optimizer's moments dominate)
_RESUME_ONLY = ("optimizer", "optimizer_class", "scheduler", "precision", "rng", "epoch_partial")


class _SaveEachEpoch:
    def __init__(self, fn: Callable[[dict], None]) -> None:
        self.fn = fn

    def on_epoch(self, trainer: Trainer, row: dict) -> None:
        self.fn(row)


class StudentTrainer:
    """Train ``student`` against ``teacher`` with Hinton soft targets (or DeiT hard labels).

    ``teacher``: an ``nn.Module``, an ``.onnx`` path (TensorRT or ONNX Runtime, logged), or
    anything :func:`kdkit.teacher` accepts. ``opt_params`` is darklight's dict
    (``optimizer``, ``okwargs``, ``scheduler``, ``skwargs``, ``amplevel``). ``labels=False``
    ignores the training labels (the student learns from the teacher alone, as on a folder
    of unlabeled images). ``student_spec`` (``"torchvision:resnet18"``, a registered
    ``kdkit:`` model, ...) goes into every checkpoint so ``kdkit export`` can rebuild the
    student. Other keyword arguments go to :class:`~kdkit.Trainer`.
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
        labels: bool = True,
        student_spec: Any = None,
        device: str | torch.device | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if loss not in ("soft", "hard"):
            raise KDError(f"loss must be 'soft' (Hinton) or 'hard' (DeiT), got {loss!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        criterion = SoftTargetKL(temperature=temperature) if loss == "soft" else HardLabel()
        # Without labels the task term is absent: the distillation loss at full weight.
        balancer = (
            LossBalancer(student_weight=student_weight, distill_weight=distill_weight)
            if labels
            else LossBalancer(student_weight=0.0, distill_weight=1.0)
        )
        self.student_spec = _spec_for(student, student_spec)
        self.distiller = Distiller(student, _teacher(teacher, self.device), criterion, balancer)
        opt_params = dict(opt_params or {})
        amp = opt_params.pop("amplevel", None)
        trainer_kwargs.setdefault("precision", precision_for_amplevel(amp, self.device))
        self.train_loader, self.val_loader = _loaders(data)
        if not labels:
            self.train_loader = _Unlabeled(self.train_loader)
        for attr in ("mean", "std"):
            if attr not in trainer_kwargs and getattr(data, attr, None) is not None:
                trainer_kwargs[attr] = tuple(getattr(data, attr))
        size = getattr(data, "size", None)
        if "input_shape" not in trainer_kwargs and size is not None:
            trainer_kwargs["input_shape"] = (3, *size)
        self.opt_params = opt_params
        self.trainer_kwargs = trainer_kwargs
        self.trainer: Trainer | None = None

    def train(
        self, epochs: int, save: str | None = "ckpt_{}.pth", *, save_optimizer: bool = False
    ) -> list[dict]:
        """Train for ``epochs``, one line per epoch on the console (no logging set-up needed);
        after each, write a kdkit checkpoint to ``save.format(epoch)`` (rank 0 only).

        Each epoch's file holds the student, its spec and the run info: what ``kdkit export``,
        :func:`kdkit.load_model` and :func:`kdkit.teacher` read. The optimizer, scheduler and
        RNG states (for AdamW, twice the student's size: 90 MB on a resnet18) go only into
        ``last.pt`` beside them, overwritten each epoch; ``save_optimizer=True`` puts them in
        every epoch's file as well.
        """
        kwargs = dict(self.trainer_kwargs)
        optimizer, scheduler = from_opt_params(self.opt_params)
        self.trainer = Trainer(
            self.distiller,
            self.train_loader,
            self.val_loader,
            optimizer=optimizer,
            scheduler=scheduler,
            epochs=epochs,
            device=self.device,
            inputs=InputPipeline(
                kwargs.pop("views", None),
                kwargs.pop("mean", None),
                kwargs.pop("std", None),
                channels_last=bool(kwargs.pop("channels_last", False)),
                dataset=getattr(self.train_loader, "dataset", None),
            ),
            run_info={
                "student_spec": self.student_spec,
                "input_shape": kwargs.pop("input_shape", None),
            },
            callbacks=[_SaveEachEpoch(lambda row: self._save(save, row["epoch"], save_optimizer))],
            **kwargs,
        )
        return self.trainer.fit()

    def _save(self, pattern: str | None, epoch: int, save_optimizer: bool) -> None:
        if not pattern or self.trainer is None or not self.trainer.is_main:
            return
        state = self.trainer.state()
        path = Path(pattern.format(epoch))
        save_checkpoint(path.parent / "last.pt", state)  # what resume needs, one file
        if not save_optimizer:
            state = {k: v for k, v in state.items() if k not in _RESUME_ONLY}
        save_checkpoint(path, state)
        log.info("saved epoch %d to %s", epoch, path)

    def student(self) -> nn.Module:
        """The trained student, hooks removed (:meth:`Distiller.export`)."""
        return self.distiller.export()


class UnlabeledImageManager:
    """darklight's "wild" data: a folder of images at any depth, no classes, no validation.

    ``train_loader`` yields ``(uint8 images, labels all -1, indices)`` with RandomResizedCrop
    and flips (under DDP each rank reads its own shard); ``val_loader`` is None.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | Sequence[int] = (224, 224),
        batch_size: int = 128,
        workers: int = 2,
        *,
        bsize: int | None = None,
        num_workers: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        batch_size = bsize if bsize is not None else batch_size
        workers = num_workers if num_workers is not None else workers
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        transform = v2.Compose(
            [v2.RandomResizedCrop(self.size, antialias=True), v2.RandomHorizontalFlip()]
            + [v2.PILToTensor()]
        )
        self.root = Path(root)
        self.train_dataset = UnlabeledFolderDataset(self.root, transform)
        drop_last = drop_last and len(self.train_dataset) >= batch_size
        sampler = shard_sampler(self.train_dataset, seed, drop_last)  # each DDP rank: a shard
        self.train_loader = DataLoader(
            self.train_dataset,
            batch_size=batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            num_workers=workers,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),
            persistent_workers=workers > 0,
        )
        self.val_loader = None


def ImageNetManager(root: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:  # noqa: N802
    """darklight's data manager: :class:`~kdkit.data.ImageFolderManager` for a
    ``train/`` + ``val/`` tree, :class:`UnlabeledImageManager` for a folder of images
    without that layout (unlabeled "wild" data)."""
    root_path = Path(root)
    if root_path.is_dir() and not (root_path / kwargs.get("train_dir", "train")).is_dir():
        log.info("%s has no train/ folder: reading it as unlabeled images", root_path)
        return UnlabeledImageManager(root, *args, **kwargs)
    return ImageFolderManager(root, *args, **kwargs)


def exportonnx(
    model: nn.Module, path: str | os.PathLike, bsize: int = 1, hw: Sequence[int] = (224, 224)
) -> Any:
    """darklight's ``exportonnx``: :func:`kdkit.export_onnx` of a 3-channel model, verified.

    The file has a dynamic batch axis, so ``bsize`` only documents the intended batch.
    """
    del bsize
    return export_onnx(model, path, (3, *hw))
