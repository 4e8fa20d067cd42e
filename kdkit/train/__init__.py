"""Training: the loop, mixed precision, checkpoints, and the darklight-style facade."""

from kdkit.train.checkpoint import load_checkpoint, save_checkpoint
from kdkit.train.facade import StudentTrainer
from kdkit.train.precision import Precision
from kdkit.train.trainer import StepOutput, Trainer

__all__ = [
    "Trainer",
    "StepOutput",
    "StudentTrainer",
    "Precision",
    "save_checkpoint",
    "load_checkpoint",
]
