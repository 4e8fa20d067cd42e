"""Language-model distillation: token-level losses over a vocabulary (``kdkit.lm``).

Imports are lazy (PEP 562) so that ``import kdkit.lm`` stays cheap; each public name is loaded
from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DIVERGENCES": "kdkit.lm.divergence",
    "divergence_value": "kdkit.lm.divergence",
    "value_and_grad": "kdkit.lm.divergence",
    "token_divergence": "kdkit.lm.fused",
    "LossOutput": "kdkit.lm.fused",
    "DenseTeacher": "kdkit.lm.fused",
    "DenseLogits": "kdkit.lm.fused",
    "TeacherTarget": "kdkit.lm.fused",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kdkit.lm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
