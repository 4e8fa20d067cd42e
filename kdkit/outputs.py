"""What a forward pass gives: :class:`Forward` (student output, captured features, teacher
output), and the logits picked out of models that return containers: tuples, dicts, Hugging
Face ``ModelOutput`` s.

Distillation needs one logits tensor per model. A model returning ``(logits, aux)``, a
``{"logits": ..., "features": ...}`` dict or a ``ModelOutput`` gets a message that says what
it returned and how to pick the logits (``output_key`` or a two-line wrapper), instead of a
``TypeError`` from deep inside ``cross_entropy``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kdkit.errors import KDError

if TYPE_CHECKING:
    from kdkit.teachers.base import TeacherOutput

__all__ = ["Forward", "pick_output", "describe_output"]


@dataclass(frozen=True)
class Forward:
    """One forward pass: the student's output, its captured features by module name, and
    the teacher's output (None while distillation is off)."""

    output: Any
    features: Mapping[str, object]
    teacher: TeacherOutput | None

    def feature(self, name: str) -> object:
        if name == "":
            return self.output
        try:
            return self.features[name]
        except KeyError:
            raise KDError(
                f"{name!r} produced no output in the forward pass (captured: "
                f"{sorted(self.features)}); is that module used in forward()?"
            ) from None


def describe_output(out: Any) -> str:
    """A short description of what a model returned (type, keys or length)."""
    name = type(out).__name__
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        try:
            return f"a {name} with keys {list(out.keys())}"
        except Exception:  # noqa: BLE001 - only for the message
            return f"a {name}"
    if isinstance(out, (tuple, list)):
        kinds = [type(v).__name__ for v in out[:4]]
        return f"a {name} of {len(out)} ({', '.join(kinds)}{', ...' if len(out) > 4 else ''})"
    return f"a {name}"


def pick_output(out: Any, key: str | int | None, role: str) -> Any:
    """The logits tensor in a model's return value: ``out`` itself when it is a tensor,
    ``out[key]`` with ``output_key`` given, else a :class:`KDError` naming the fix."""
    if isinstance(out, torch.Tensor):
        return out
    if key is not None:
        try:
            if isinstance(out, (tuple, list)):
                picked = out[int(key)]
            else:
                picked = out[key]
        except (KeyError, IndexError, TypeError, ValueError):
            raise KDError(
                f"output_key={key!r}: the {role} returned {describe_output(out)}, which has "
                "no such entry"
            ) from None
        if isinstance(picked, torch.Tensor):
            return picked
        out = picked
    hint = "'logits'" if hasattr(out, "keys") else "0"
    raise KDError(
        f"the {role} returned {describe_output(out)}, not a logits tensor; pick the logits "
        f"with Distiller(..., output_key={hint}) (a dict/ModelOutput key or a tuple position), "
        f"or wrap the model in a module whose forward returns model(x)[{hint}]"
    )
