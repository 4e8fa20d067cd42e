"""Training: the loop, mixed precision, checkpoints (darklight's facade is in kdkit.compat)."""

from kdkit.train.checkpoint import load_checkpoint, save_checkpoint
from kdkit.train.precision import Precision
from kdkit.train.trainer import StepOutput, Trainer

__all__ = [
    "Trainer",
    "StepOutput",
    "Precision",
    "save_checkpoint",
    "load_checkpoint",
]
