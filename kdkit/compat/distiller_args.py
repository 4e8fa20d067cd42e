"""Intel Distiller's knowledge-distillation flags for an existing training script.

The flag names follow Distiller's ``add_distillation_args`` (``--kd-teacher``,
``--kd-resume``, ``--kd-temperature``, ``--kd-distill-wt``, ``--kd-student-wt``,
``--kd-teacher-wt``, ``--kd-start-epoch``), so scripts written for it keep working::

    parser = argparse.ArgumentParser()
    kdkit.add_distillation_args(parser)
    args = parser.parse_args()
    policy = kdkit.distillation_from_args(args, teacher_kwargs={"num_classes": 10})
    distiller = kdkit.Distiller(student, policy.teacher, policy.criterion, policy.balancer)

``--kd-teacher`` is a model string as in the ``kdkit train`` config (``torchvision:resnet50``,
``kdkit:fmnist_teacher``; a bare name such as ``resnet50`` means torchvision's, as in
Distiller's image classifier), or a teacher file (kdkit checkpoint, ``.onnx``, engine).
``--kd-resume`` loads the teacher's weights (a kdkit checkpoint, a torch state dict or
``.safetensors``); a kdkit checkpoint alone names its model, so it needs no ``--kd-teacher``.

The soft-target loss is scaled by T^2 (Hinton et al. 2015); the Distiller's log shows it
both ways (``output`` and ``output_unscaled``), the unscaled one being comparable between
runs at different temperatures, as Distiller logged it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kdkit.balance import LossBalancer
from kdkit.errors import KDError
from kdkit.load import load_model, load_weights
from kdkit.losses import DKD, HardLabel, SoftTargetKL
from kdkit.registry import ModelSpec, build_model

__all__ = ["add_distillation_args", "distillation_from_args", "KDPolicy", "KD_LOSSES"]

log = logging.getLogger(__name__)

KD_LOSSES = ("kl", "hard", "dkd")
_FILE_SUFFIXES = (".onnx", ".engine", ".plan", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class KDPolicy:
    """What the flags describe: the teacher (None without ``--kd-teacher``/``--kd-resume``),
    the loss on the output pair, and how to weigh it."""

    criterion: nn.Module
    balancer: LossBalancer
    teacher: Any = None


def add_distillation_args(
    parser: argparse.ArgumentParser,
    arch_choices: Sequence[str] | None = None,
    enable_pretrained: bool = False,
) -> argparse.ArgumentParser:
    """Add a "Knowledge distillation" argument group to ``parser`` and return it."""
    g = parser.add_argument_group("Knowledge distillation")
    g.add_argument(
        "--kd-teacher",
        choices=arch_choices,
        metavar="ARCH",
        help="teacher: a model string (torchvision:resnet50, kdkit:NAME; a bare name is "
        "torchvision's) or a teacher file (kdkit checkpoint, .onnx)",
    )
    if enable_pretrained:
        g.add_argument(
            "--kd-pretrained",
            action="store_true",
            help="torchvision's pre-trained teacher weights (weights='DEFAULT'; downloads)",
        )
    g.add_argument(
        "--kd-resume",
        default="",
        metavar="PATH",
        help="teacher weights: a kdkit checkpoint, a torch state dict or .safetensors",
    )
    g.add_argument(
        "--kd-temperature",
        "--kd-temp",
        dest="kd_temp",
        type=float,
        default=1.0,
        metavar="T",
        help="softmax temperature; the soft-target loss is scaled by T^2 (default: 1)",
    )
    g.add_argument(
        "--kd-distill-wt",
        "--kd-dw",
        dest="kd_distill_wt",
        type=float,
        default=0.5,
        metavar="W",
        help="weight of the distillation loss (default: 0.5)",
    )
    g.add_argument(
        "--kd-student-wt",
        "--kd-sw",
        dest="kd_student_wt",
        type=float,
        default=0.5,
        metavar="W",
        help="weight of the student's loss against the labels (default: 0.5)",
    )
    g.add_argument(
        "--kd-teacher-wt",
        "--kd-tw",
        dest="kd_teacher_wt",
        type=float,
        default=0.0,
        metavar="W",
        help="weight of a teacher-vs-labels loss; must be 0: kdkit's teacher is frozen",
    )
    g.add_argument(
        "--kd-start-epoch",
        type=int,
        default=0,
        metavar="EPOCH",
        help="epoch from which distillation is on (before it: labels only, no teacher)",
    )
    g.add_argument(
        "--kd-warmup-epochs",
        type=float,
        default=0.0,
        metavar="N",
        help="ramp the distillation weight linearly over N epochs after the start",
    )
    g.add_argument(
        "--kd-loss",
        choices=KD_LOSSES,
        default="kl",
        help="kl: Hinton soft targets; hard: DeiT hard labels; dkd: decoupled KD",
    )
    return parser


def _is_file_arg(text: str) -> bool:
    return Path(text).is_file() or Path(text).suffix.lower() in _FILE_SUFFIXES


def build_teacher(
    arch: str | None,
    resume: str = "",
    *,
    kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    trust_code: bool = False,
) -> Any:
    """The teacher that ``--kd-teacher ARCH`` and ``--kd-resume PATH`` describe, or None."""
    kwargs = dict(kwargs or {})
    if not arch:
        if not resume:
            return None
        # a kdkit checkpoint names its model; a bare state dict cannot
        try:
            module, meta = load_model(resume, trust_code=trust_code)
        except KDError as err:
            raise KDError(
                f"--kd-resume {resume}: {err}. A plain weights file needs the architecture: "
                "add --kd-teacher ARCH (e.g. torchvision:resnet50)"
            ) from None
        log.info("teacher from --kd-resume %s (%s)", resume, meta.get("role", "model"))
        return module
    if _is_file_arg(arch):
        if resume:
            raise KDError(
                f"--kd-teacher {arch} is a file that already holds the teacher's weights; "
                "drop --kd-resume, or give --kd-teacher an architecture"
            )
        if Path(arch).suffix.lower() in (".pt", ".pth", ".ckpt"):
            return load_model(arch, trust_code=trust_code)[0]
        return arch  # .onnx / engine: kdkit.make_teacher() picks the backend
    spec = arch if ":" in arch else f"torchvision:{arch}"
    if pretrained:
        kwargs.setdefault("weights", "DEFAULT")
    module = build_model(ModelSpec.parse({"model": spec, "kwargs": kwargs}), trust_code=trust_code)
    if resume:
        load_weights(module, resume)
        log.info("teacher %s with weights from %s", spec, resume)
    elif not pretrained:
        log.warning(
            "teacher %s has random weights: give --kd-resume PATH (or --kd-pretrained)", spec
        )
    return module


def distillation_from_args(
    args: argparse.Namespace,
    *,
    teacher_kwargs: Mapping[str, Any] | None = None,
    trust_code: bool = False,
) -> KDPolicy:
    """The teacher, the output-pair loss and the :class:`LossBalancer` the flags describe.

    ``teacher_kwargs`` go to the teacher's builder (e.g. ``{"num_classes": 10}``).
    """
    if args.kd_teacher_wt != 0:
        raise KDError(
            "--kd-teacher-wt must be 0: the teacher is frozen, so a teacher-vs-labels loss "
            "could not train it (fine-tune the teacher first, then distill)"
        )
    if args.kd_temp <= 0:
        raise KDError(f"--kd-temperature must be > 0, got {args.kd_temp}")
    if args.kd_loss == "kl":
        criterion: nn.Module = SoftTargetKL(temperature=args.kd_temp)
    elif args.kd_loss == "hard":
        criterion = HardLabel()
    else:
        criterion = DKD(temperature=args.kd_temp)
    balancer = LossBalancer(
        student_weight=args.kd_student_wt,
        distill_weight=args.kd_distill_wt,
        start_epoch=args.kd_start_epoch,
        warmup_epochs=args.kd_warmup_epochs,
    )
    teacher = build_teacher(
        getattr(args, "kd_teacher", None),
        getattr(args, "kd_resume", "") or "",
        kwargs=teacher_kwargs,
        pretrained=bool(getattr(args, "kd_pretrained", False)),
        trust_code=trust_code,
    )
    return KDPolicy(criterion=criterion, balancer=balancer, teacher=teacher)
