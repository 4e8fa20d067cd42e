"""The teacher off the training machine: ``kdkit lm serve`` and the client that trains from it.

- :mod:`~kdkit.lm.serve.scorer`: a loaded teacher scoring token rows, and its fingerprint;
- :mod:`~kdkit.lm.serve.server`: the HTTP routes (FastAPI / uvicorn), request batching;
- :mod:`~kdkit.lm.serve.wire`: kdkit's binary bodies (safetensors), checked on arrival;
- :mod:`~kdkit.lm.serve.vllm`: vLLM's ``/v1/completions`` + ``prompt_logprobs``, both sides;
- :mod:`~kdkit.lm.serve.client`: :class:`ServedTeacher`, a target source of the LM task
  (retries, identity checks), and :mod:`~kdkit.lm.serve.prefetch` (targets ahead of the step).

docs/lm-serve.md is the user's page. Names load lazily: ``import kdkit.lm.serve`` imports
neither httpx nor FastAPI.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ServedTeacher": "kdkit.lm.serve.client",
    "ServedLoader": "kdkit.lm.serve.prefetch",
    "TeacherScorer": "kdkit.lm.serve.scorer",
    "build_app": "kdkit.lm.serve.server",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kdkit.lm.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
