"""Hidden-state distillation between decoder layers (``distill.pairs`` of a ``task: lm`` run).

DistillKit's hidden-state mode, and what image runs do with feature pairs: student layer ``i``
learns the teacher's layer ``j`` at the trained positions, through a learned linear projection
when the widths differ (``nn.Linear(student width, teacher width, bias=False)``, trained with
the student and saved in checkpoints as ``adapters``). Ref: Romero et al. 2015 (FitNets,
arXiv:1412.6550) for the projected hint; Sanh et al. 2019 (DistilBERT, arXiv:1910.01108) for
the cosine on hidden states.

The layers' outputs are caught by forward hooks on the models' decoder layers, registered for
one step and removed after it (:meth:`HiddenPairs.capture`). Each pair's loss is a *sum* over
the trained tokens (per token: the mean squared error over the teacher's width, or 1 - cosine),
like the token loss, so the loop's token normalization applies to both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kdkit._sharding import blocks_of
from kdkit.errors import KDError
from kdkit.lm.models import output_head

__all__ = ["HiddenPairs", "LayerPair"]


@dataclass(frozen=True)
class LayerPair:
    """Student decoder layer ``student`` learns teacher layer ``teacher`` (0-based; -1 is
    the last), weighted by ``weight``; ``loss``: ``mse`` or ``cosine``."""

    student: int
    teacher: int
    weight: float = 1.0
    loss: str = "mse"


def _width(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    width = getattr(getattr(cfg, "get_text_config", lambda: cfg)(), "hidden_size", None)
    return int(width or output_head(model).in_features)


def _layer(blocks: list[nn.Module], index: int, role: str) -> nn.Module:
    if not -len(blocks) <= index < len(blocks):
        raise KDError(
            f"config key 'distill.pairs': the {role} has {len(blocks)} decoder layers "
            f"(0..{len(blocks) - 1}, or -1 for the last), not layer {index}"
        )
    return blocks[index]


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[return-value]


class HiddenPairs(nn.Module):
    """The pairs' projections (the trainable part) and the hooks that catch the layers."""

    def __init__(self, pairs: Sequence[LayerPair], student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        if not pairs:
            raise KDError("HiddenPairs needs at least one pair")
        bad = [p.loss for p in pairs if p.loss not in ("mse", "cosine")]
        if bad:
            raise KDError(f"config key 'distill.pairs': loss {bad[0]!r}; use mse or cosine")
        s_blocks, t_blocks = blocks_of(student), blocks_of(teacher)
        self.pairs = list(pairs)
        self._s = [_layer(s_blocks, p.student, "student") for p in pairs]
        self._t = [_layer(t_blocks, p.teacher, "teacher") for p in pairs]
        ws, wt = _width(student), _width(teacher)
        self.proj = nn.ModuleList(
            nn.Linear(ws, wt, bias=False) if ws != wt else nn.Identity() for _ in pairs
        )

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
        """Catch the paired layers' outputs during one step; the hooks are removed after."""
        seen: dict[tuple[str, int], torch.Tensor] = {}
        handles = []
        for role, layers in (("s", self._s), ("t", self._t)):
            for i, layer in enumerate(layers):

                def hook(module, args, output, key=(role, i)):  # noqa: ANN001
                    seen[key] = _hidden(output)

                handles.append(layer.register_forward_hook(hook))
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    def loss(self, seen: dict[tuple[str, int], torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The weighted sum over pairs of each pair's loss summed over the trained tokens."""
        total = None
        for i, pair in enumerate(self.pairs):
            if ("s", i) not in seen or ("t", i) not in seen:
                raise KDError(
                    "distill.pairs: a paired layer did not run in this step (a teacher run by "
                    "ONNX Runtime or from a cache has no layers to catch)"
                )
            s = self.proj[i](seen[("s", i)][mask].float())
            t = seen[("t", i)][mask].detach().float()
            if pair.loss == "mse":
                per_token = (s - t).pow(2).mean(-1)
            else:
                per_token = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)
            term = pair.weight * per_token.sum()
            total = term if total is None else total + term
        return total
