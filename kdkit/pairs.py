"""Typed loss pairs: which student output is matched to which teacher output, by what loss.

The core speaks only :class:`Pair` records. Every other shape a user may know arrives through
one translation: a bare loss (the two models' outputs), kdkit's ``{(student, teacher): loss}``
shortcut (:func:`as_pairs`), the ``distill.pairs`` YAML list (``kdkit/run/models.py``) and
ModelOpt's ``criterion`` dict (``kdkit/compat/_modelopt_config.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError
from kdkit.losses._call import as_loss_module, takes_labels
from kdkit.losses.topk import TopK

__all__ = ["Pair", "PairInfo", "PairTable", "as_pairs", "describe_pairs", "pair_name", "shape_of"]

Loss = nn.Module | Callable[..., torch.Tensor]


def pair_name(student_name: str, teacher_name: str) -> str:
    """Component name used in logs and balancer weights: ``"output"`` for the final outputs."""
    if student_name == "" and teacher_name == "":
        return "output"
    return f"{student_name or 'output'}<-{teacher_name or 'output'}"


@dataclass(frozen=True)
class Pair:
    """``loss(student[student], teacher[teacher])``, weighed by ``weight`` in the balancer.

    ``""`` names a model's own output. ``loss`` is any module or callable taking
    ``(student_out, teacher_out)`` (and ``labels=`` when its signature has it); plain callables
    are wrapped once, here, so the Distiller holds modules only.
    """

    student: str = ""
    teacher: str = ""
    loss: nn.Module | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        for side in ("student", "teacher"):
            if not isinstance(getattr(self, side), str):
                raise KDError(
                    f"Pair.{side} must be a module name (str), got {getattr(self, side)!r}"
                )
        if self.loss is None:
            raise KDError("a Pair needs a loss")
        where = f"the loss for ({self.student!r}, {self.teacher!r})"
        object.__setattr__(self, "loss", as_loss_module(self.loss, where=where))
        if not isinstance(self.weight, (int, float)) or self.weight < 0:
            raise KDError(f"Pair.weight must be a number >= 0, got {self.weight!r}")

    @property
    def name(self) -> str:
        return pair_name(self.student, self.teacher)

    @property
    def takes_labels(self) -> bool:
        return takes_labels(self.loss)


def as_pairs(pairs: Loss | Sequence[Pair] | Mapping[tuple[str, str], Loss] | None) -> list[Pair]:
    """``Pair`` records from a list of them, one loss (the outputs), or ``{(s, t): loss}``."""
    if pairs is None:
        return []
    if isinstance(pairs, Pair):
        return [pairs]
    if isinstance(pairs, Mapping):
        if not pairs:
            raise KDError("pairs must be a loss, a list of kdkit.Pair or a dict {(s, t): loss}")
        items = []
        for key, loss in pairs.items():
            ok = isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)
            if not ok:
                raise KDError(f"pair keys must be (student_name, teacher_name), got {key!r}")
            items.append(Pair(key[0], key[1], loss))
        return items
    if isinstance(pairs, Sequence) and not isinstance(pairs, (str, bytes)):
        if not pairs or not all(isinstance(p, Pair) for p in pairs):
            raise KDError("pairs must be a non-empty list of kdkit.Pair records")
        return list(pairs)
    return [Pair("", "", pairs)]


def shape_of(t: object) -> tuple[int, ...]:
    if isinstance(t, TopK):
        return tuple(t.values.shape)
    if isinstance(t, torch.Tensor):
        return tuple(t.shape)
    raise KDError(f"expected a tensor output, got {type(t).__name__}")


@dataclass
class PairInfo:
    """One row of :meth:`kdkit.Distiller.describe`."""

    name: str
    student: str
    teacher: str
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]
    adapter: str
    loss: str


class PairTable(list):
    """A list of :class:`PairInfo` that prints as a table."""

    def __str__(self) -> str:
        head = ("pair", "student shape", "teacher shape", "adapter", "loss")
        rows = [
            (p.name, str(p.student_shape), str(p.teacher_shape), p.adapter, p.loss) for p in self
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)


def describe_pairs(
    run: Any,
    pairs: Sequence[Pair],
    labelled: Sequence[bool],
    pair_loss: Callable[[Pair, bool], Any],
) -> PairTable:
    """The table of :meth:`kdkit.Distiller.describe`: each pair's modules, shapes, adapter and
    loss, from one dry-run forward ``run`` (a :class:`~kdkit.distiller.Forward`).
    ``pair_loss(pair, with_labels)`` computes the pair's loss once, which creates its lazy
    adapter so the table can show it."""
    table = PairTable()
    for pair, with_labels in zip(pairs, labelled, strict=True):
        s_out, t_out = run.feature(pair.student), run.teacher.get(pair.teacher)
        pair_loss(pair, with_labels)
        summary = getattr(pair.loss, "adapter_summary", None)
        s_shape, t_shape = shape_of(s_out), shape_of(t_out)
        adapter = summary(s_shape, t_shape) if callable(summary) else "none"
        table.append(
            PairInfo(
                pair.name,
                pair.student or "<output>",
                pair.teacher or "<output>",
                s_shape,
                t_shape,
                adapter,
                repr(pair.loss).replace("\n", " "),
            )
        )
    return table
