"""The Teacher protocol every backend implements.

A teacher is frozen: no autograd, never in train mode, never wrapped in DDP, never saved in a
checkpoint. Backends (eager torch, ONNX Runtime, TensorRT, a cache on disk) are
interchangeable: the Distiller only calls ``teacher(x, index=..., view=...)`` and reads a
:class:`TeacherOutput`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kdkit.errors import KDError
from kdkit.losses.topk import TopK

__all__ = ["TopK", "TeacherOutput", "Teacher"]


@dataclass
class TeacherOutput:
    """What a teacher returns for one batch.

    ``logits`` is the model's final output (a tensor, or :class:`TopK` for a top-k cache);
    ``features`` maps the intermediate names the Distiller asked for to their tensors.
    """

    logits: torch.Tensor | TopK | None
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor | TopK:
        """The output named ``name``; ``""`` is the model's own output."""
        if name == "":
            if self.logits is None:
                raise KDError("this teacher returned no final output")
            return self.logits
        try:
            return self.features[name]
        except KeyError:
            raise KDError(
                f"teacher output {name!r} was not captured; captured: {sorted(self.features)}"
            ) from None


class Teacher(ABC):
    """Base class of the teacher backends (the one level of abstraction we allow).

    Subclasses implement :meth:`forward`. ``request_features(names)`` tells the backend which
    intermediate outputs to return besides the final one; backends that cannot expose them
    raise :class:`KDError` there, before training starts.
    """

    #: device the backend wants its input on (``None``: wherever the input already is)
    device: torch.device | None = None

    def __init__(self) -> None:
        self.feature_names: tuple[str, ...] = ()

    def check_dataset(self, dataset: Any, sampler: Any = None) -> None:  # noqa: B027 (a default)
        """Refuse a training ``dataset`` (drawn through ``sampler``'s views) this teacher
        cannot answer for, before the first step. A live model answers any input: the default
        accepts everything; a cache of another dataset refuses
        (:class:`~kdkit.cache.CachedTeacher`)."""

    def request_features(self, names: Sequence[str]) -> None:
        names = tuple(n for n in names if n != "")
        if names:
            raise KDError(
                f"{type(self).__name__} returns only final outputs, so the intermediate "
                f"teacher layers {list(names)} cannot be distilled from it; use a TorchTeacher "
                "(a plain nn.Module) for feature pairs"
            )
        self.feature_names = ()

    @abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        *,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
    ) -> TeacherOutput:
        """Run the teacher on ``x`` (already on :attr:`device`). No autograd is recorded."""

    def __call__(
        self,
        x: torch.Tensor,
        *,
        index: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
    ) -> TeacherOutput:
        # no_grad, not inference_mode: the outputs are loss targets, and autograd must be able
        # to save them for the student's backward pass.
        with torch.no_grad():
            return self.forward(x, index=index, view=view)

    def to(self, device: torch.device | str) -> Teacher:
        """Move the backend to ``device`` where that makes sense (a no-op by default)."""
        return self

    def fingerprint(self) -> str:
        """A stable hash of what the teacher computes (used to key caches)."""
        raise KDError(f"{type(self).__name__} has no fingerprint; it cannot key a cache")
