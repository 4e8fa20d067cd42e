"""Lazy imports of the Hugging Face packages, with the install hint (private).

``import kdkit.lm.<module>`` must stay cheap and must work without ``transformers``: only the
functions that load or build a model or tokenizer call these.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kdkit.errors import KDError

__all__ = ["require"]

_HINT = "pip install 'kdkit[lm]'"


def require(name: str) -> ModuleType:
    """Import ``transformers`` or ``tokenizers`` or raise a one-line KDError with the fix."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise KDError(f"kdkit.lm needs the {name!r} package ({e}); {_HINT}") from None
