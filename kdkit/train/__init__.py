"""Training: the loop, mixed precision, checkpoints (darklight's facade is in kdkit.compat).

A lazy face, like ``kdkit``'s own: ``import kdkit.train`` loads nothing until a name is used.
"""

from kdkit._lazy import lazy_face

_PUBLIC = {
    "Trainer": "kdkit.train.trainer",
    "StepOutput": "kdkit.task",
    "LoopOptions": "kdkit.train.options",
    "Precision": "kdkit.train.precision",
    "save_checkpoint": "kdkit.train.checkpoint",
    "load_checkpoint": "kdkit.train.checkpoint",
}
#: modules that moved off the loop's package (they serve tasks, not the loop)
_MOVED = {
    "fsdp": ("kdkit._sharding", "", "kdkit._sharding"),
    "evaluate": ("kdkit.metrics", "", "kdkit.metrics (classification_metrics)"),
}

__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_face(__name__, _PUBLIC, moved=_MOVED)
