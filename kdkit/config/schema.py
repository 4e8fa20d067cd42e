"""The config schema: one frozen dataclass per section, type hints say what each key takes.

Field metadata ``check``/``expected`` add value ranges (``epochs >= 1``); the walk in
:mod:`kdkit.config._yaml` reads both. Adding a key = adding a field here (and a line in the
README's key table).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "RunConfig",
    "TeacherConfig",
    "StudentConfig",
    "ZeroShotConfig",
    "CalibrationConfig",
    "SourceConfig",
    "ViewsConfig",
    "DataConfig",
    "PairConfig",
    "DistillConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainConfig",
    "EarlyStoppingConfig",
    "EmaConfig",
    "MODEL_PREFIXES",
    "TEACHER_ONLY_PREFIXES",
    "field_check",
]

Precision = Literal["fp32", "bf16", "fp16"]
MODEL_PREFIXES = ("kdkit", "torchvision", "timm", "open_clip", "python")
TEACHER_ONLY_PREFIXES = ("onnx", "tensorrt", "cache")


def field_check(test, expected: str) -> dict[str, Any]:
    """Field metadata: a value test and the words that describe what it expects."""
    return {"check": test, "expected": expected}


_SEED = "an integer in [0, 2**63)"


def _positive(expected: str = "an integer >= 1"):
    return field(default=None, metadata=field_check(lambda v: v is None or v >= 1, expected))


# -- teacher and student ----------------------------------------------------------------


@dataclass(frozen=True)
class ZeroShotConfig:
    """Class names (and prompt templates) that turn an image-text teacher into a classifier."""

    classes: tuple[str, ...] = ()
    templates: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CalibrationConfig:
    """int8 calibration: how many training images the quantiser sees, and the fidelity gate:
    the int8 teacher must agree with fp32 on at least ``min_agreement`` of held-out top-1s."""

    samples: int = field(default=512, metadata=field_check(lambda v: v >= 1, "an integer >= 1"))
    min_agreement: float = field(
        default=0.99, metadata=field_check(lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
    )


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen model. ``model``: ``PREFIX:NAME``, a kdkit checkpoint or run directory,
    ``onnx:PATH``, ``tensorrt:PATH`` or ``cache:DIR``. ``backend: auto`` (the default) times
    the backends that run here on the run's first batch and keeps the fastest that agrees with
    eager torch (:mod:`kdkit.teachers.autotune`); the run directory's ``choices.json`` records
    it and ``--resume`` keeps it."""

    model: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    backend: Literal["auto", "torch", "onnx", "tensorrt"] = "auto"
    precision: Literal["fp32", "bf16", "fp16", "int8"] = "fp32"
    pretrained: str | bool | None = None
    zero_shot: ZeroShotConfig | None = None
    probe: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass(frozen=True)
class StudentConfig:
    """The model to train: ``PREFIX:NAME`` + ``kwargs``, or a kdkit checkpoint / run dir."""

    model: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    pretrained: str | bool | None = None


# -- data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceConfig:
    """Where images come from: exactly one of the keys (``split`` only for ``data.val``)."""

    image_folder: str | None = None
    fashion_mnist: Literal["train", "test"] | None = None
    stl10: Literal["train", "test", "unlabeled", "train+unlabeled"] | None = None
    root: str | None = None  # the STL-10 binaries' folder (``stl10`` only)
    split: float | None = field(
        default=None, metadata=field_check(lambda v: v is None or 0 < v < 1, "a fraction in (0, 1)")
    )


@dataclass(frozen=True)
class ViewsConfig:
    """Per-sample augmentation applied on the device, the same view for teacher and student.

    ``crop``: ``resized`` (random-resized crop with area fraction in ``scale``), ``pad``
    (shift by up to ``pad`` pixels with zero fill) or ``none``. ``num_views``: K fixed views
    per sample (what a teacher cache stores); null draws a fresh view every epoch.
    ``mixup``/``cutmix``: Beta(alpha, alpha) of mixing in a partner image shared by teacher
    and student (0: off; in-memory datasets only), the "patient and consistent" recipe.
    """

    crop: Literal["resized", "pad", "none"] = "resized"
    flip: bool = True
    num_views: int | None = _positive()
    pad: int = field(default=4, metadata=field_check(lambda v: v >= 0, "an integer >= 0"))
    scale: tuple[float, ...] = field(
        default=(0.35, 1.0),
        metadata=field_check(
            lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "[low, high] in (0, 1]"
        ),
    )
    mixup: float = field(
        default=0.0, metadata=field_check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )
    cutmix: float = field(
        default=0.0, metadata=field_check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )


@dataclass(frozen=True)
class DataConfig:
    """Training images (+ unlabeled folders), validation images, size and batching.

    ``labeled: N`` keeps the labels of N training images (stratified for in-memory datasets,
    chosen by ``seed``) and hides the rest (label -1: the teacher's alone). With ``teacher:
    null`` the hidden images are dropped: the run trains on the N labeled images alone, the
    scratch baseline of the same run with a teacher.
    """

    train: SourceConfig
    unlabeled: tuple[str, ...] = ()
    val: SourceConfig | None = None
    labeled: int | None = _positive()
    image_size: int | None = field(
        default=None,
        metadata=field_check(lambda v: v is None or 1 <= v <= 8192, "an integer in [1, 8192]"),
    )
    batch_size: int = field(
        default=128, metadata=field_check(lambda v: 1 <= v <= 2**24, "an integer in [1, 2**24]")
    )
    val_batch_size: int | None = field(
        default=None,
        metadata=field_check(lambda v: v is None or 1 <= v <= 2**24, "an integer in [1, 2**24]"),
    )
    workers: int = field(
        default=2, metadata=field_check(lambda v: 0 <= v <= 256, "an integer in [0, 256]")
    )
    views: ViewsConfig | None = field(default_factory=ViewsConfig)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seed: int = field(default=0, metadata=field_check(lambda v: 0 <= v < 2**63, _SEED))


# -- distillation -----------------------------------------------------------------------


@dataclass(frozen=True)
class PairConfig:
    """One ``(student layer, teacher layer) -> loss``; ``""`` is a model's output."""

    loss: str
    student: str = ""
    teacher: str = ""
    args: Mapping[str, Any] = field(default_factory=dict)
    weight: float = field(
        default=1.0, metadata=field_check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )


@dataclass(frozen=True)
class DistillConfig:
    """The loss pairs and how they are balanced against the labels."""

    pairs: tuple[PairConfig, ...] = (PairConfig(loss="soft_kl"),)
    student_weight: float = field(
        default=0.5, metadata=field_check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )
    distill_weight: float = field(
        default=0.5, metadata=field_check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )
    start_epoch: float = field(
        default=0, metadata=field_check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )
    warmup_epochs: float = field(
        default=0, metadata=field_check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )
    label_smoothing: float = field(
        default=0.0, metadata=field_check(lambda v: 0 <= v < 1, "a number in [0, 1)")
    )


# -- training ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerConfig:
    """A ``torch.optim`` class by name; ``args`` go to its constructor (e.g. momentum)."""

    name: str = "AdamW"
    lr: float = field(
        default=1e-3, metadata=field_check(lambda v: 0 < v < math.inf, "a finite number > 0")
    )
    weight_decay: float = field(
        default=0.0, metadata=field_check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
    )
    args: Mapping[str, Any] = field(default_factory=dict)


#: short scheduler names a config may use for torch's classes
SCHEDULER_ALIASES = {"cosine": "CosineAnnealingLR", "onecycle": "OneCycleLR", "step": "StepLR"}


@dataclass(frozen=True)
class SchedulerConfig:
    """A ``torch.optim.lr_scheduler`` class by name (``cosine`` is ``CosineAnnealingLR``), or
    null for a constant rate.

    ``OneCycleLR`` gets ``max_lr`` = the optimizer's lr and ``total_steps`` filled in,
    ``CosineAnnealingLR`` gets ``T_max``; ``interval``: stepped per ``step`` or ``epoch``.
    ``warmup_epochs``: a linear warm-up from ~0 to the lr first, then the scheduler over the
    remaining epochs (torch's ``SequentialLR`` of ``LinearLR`` and it).
    """

    name: str | None = None
    interval: Literal["step", "epoch"] = "step"
    args: Mapping[str, Any] = field(default_factory=dict)
    warmup_epochs: float = field(default=0, metadata=field_check(lambda v: v >= 0, "a number >= 0"))

    def __post_init__(self) -> None:
        if self.name in SCHEDULER_ALIASES:  # the resolved config names torch's class
            object.__setattr__(self, "name", SCHEDULER_ALIASES[self.name])


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """Stop when ``metric`` (an epoch column, e.g. ``val_top1`` or ``val_loss``; null: the
    task's best metric) has not improved by more than ``min_delta`` for ``patience`` epochs."""

    metric: str | None = None
    patience: int = field(default=5, metadata=field_check(lambda v: v >= 1, "an integer >= 1"))
    min_delta: float = field(default=0.0, metadata=field_check(lambda v: v >= 0, "a number >= 0"))
    mode: Literal["auto", "min", "max"] = "auto"


@dataclass(frozen=True)
class EmaConfig:
    """An exponential moving average of the student's weights (torch's AveragedModel):
    evaluated, and saved as ``best.pt``, instead of the raw weights."""

    decay: float = field(default=0.9998, metadata=field_check(lambda v: 0 < v < 1, "in (0, 1)"))


@dataclass(frozen=True)
class TrainConfig:
    """The loop: epochs, optimizer, schedule, precision, seed, device, checkpoints.

    ``channels_last: auto`` (the default) times the student's step in both memory formats on
    the run's first batch and keeps the faster (recorded in ``choices.json``, kept by
    ``--resume``); ``true`` / ``false`` force one. Outside ``kdkit train`` auto means false.
    ``overlap: auto`` (the default) times the teacher run beside the student against the
    sequential step on the first batch, the same way (:mod:`kdkit.train.overlap`).
    """

    epochs: int = field(default=10, metadata=field_check(lambda v: v >= 1, "an integer >= 1"))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: Precision = "fp32"
    seed: int = field(default=0, metadata=field_check(lambda v: 0 <= v < 2**63, _SEED))
    device: str | None = None
    channels_last: bool | Literal["auto"] = "auto"
    overlap: bool | Literal["auto"] = "auto"
    compile: bool = False
    sync_batchnorm: bool = False  # torchrun on GPUs: the student's BatchNorm -> SyncBatchNorm
    grad_accum: int = field(default=1, metadata=field_check(lambda v: v >= 1, "an integer >= 1"))
    max_grad_norm: float | None = field(
        default=None, metadata=field_check(lambda v: v is None or 0 < v < math.inf, "a number > 0")
    )
    checkpoint_every: int | None = _positive()
    progress: bool = True
    #: FSDP2 under torchrun (``task: lm``): student and teacher sharded over the ranks
    fsdp: bool = False
    #: recompute the student's decoder layers in backward instead of keeping their
    #: activations (``task: lm``, Hugging Face's gradient_checkpointing_enable)
    gradient_checkpointing: bool = False
    early_stopping: EarlyStoppingConfig | None = None
    ema: EmaConfig | None = None
    loggers: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = ()
    log_every: int | None = _positive()


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run. ``run_dir`` defaults to ``runs/NAME``; ``versions`` is written by kdkit
    into the resolved config (kdkit, torch) and ignored when configs are compared.

    ``teacher: null`` (or no ``teacher:`` section) trains the student on the labels alone
    (fine-tuning the future teacher, or the scratch baseline): ``distill:`` is then unused,
    ``data.unlabeled`` refused and ``data.labeled: N`` means the N labeled images alone.
    ``task: classify`` is the default (a config without ``task:`` is an image run).
    """

    task: Literal["classify"] = "classify"
    name: str = "run"
    teacher: TeacherConfig | None = None
    student: StudentConfig
    data: DataConfig
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
