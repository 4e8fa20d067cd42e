"""Argparse flags that give an existing training script distillation in a few lines.

The flag names follow Intel Distiller's ``add_distillation_args`` (``--kd-temperature``,
``--kd-distill-wt``, ``--kd-student-wt``, ``--kd-teacher-wt``, ``--kd-start-epoch``), so
scripts written for it keep working::

    parser = argparse.ArgumentParser()
    kdkit.add_distillation_args(parser)
    args = parser.parse_args()
    policy = kdkit.distillation_from_args(args)
    distiller = kdkit.Distiller(student, teacher, policy.criterion, policy.balancer)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from kdkit.balance import LossBalancer
from kdkit.errors import KDError

__all__ = ["add_distillation_args", "distillation_from_args", "KDPolicy", "KD_LOSSES"]

KD_LOSSES = ("kl", "hard", "dkd")


@dataclass(frozen=True)
class KDPolicy:
    """What the flags describe: the output-pair loss and how to weigh it."""

    criterion: nn.Module
    balancer: LossBalancer


def add_distillation_args(
    parser: argparse.ArgumentParser, arch_choices: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """Add a "Knowledge distillation" argument group to ``parser`` and return it."""
    g = parser.add_argument_group("Knowledge distillation")
    g.add_argument("--kd-teacher", choices=arch_choices, metavar="ARCH", help="teacher arch")
    g.add_argument("--kd-resume", default="", metavar="PATH", help="teacher weights file")
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


def distillation_from_args(args: argparse.Namespace) -> KDPolicy:
    """Turn the parsed flags into a loss for the output pair and a :class:`LossBalancer`."""
    from kdkit.losses import DKD, HardLabel, SoftTargetKL

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
    return KDPolicy(criterion=criterion, balancer=balancer)
