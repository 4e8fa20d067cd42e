"""A mixture-of-experts student's router load-balancing loss, as its own training adds it.

A Hugging Face MoE causal LM (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite-MoE, GPT-OSS, ...)
trained on its own adds ``router_aux_loss_coef * load_balancing_loss_func(router_logits,
num_experts, top_k, attention_mask)`` to its language-model loss (Switch Transformer's auxiliary
loss, Fedus et al. 2021, arXiv:2101.03961, eq. 4-6). Without it the router is free to send every
token to a few experts, and a distilled MoE student drifts there. kdkit takes the function and
its arguments from the model itself (its own module's ``load_balancing_loss_func``, its
``num_experts`` / ``num_experts_per_tok`` / ``router_aux_loss_coef``), so the term is the one
the family defines; the decoder is asked for its router logits with ``output_router_logits``.

The fused KD loss is a *sum* over the batch's trained tokens, divided by the tokens of the whole
optimizer step (:mod:`kdkit.lm.task`); the model's own loss is a token mean plus
``coef * aux``. So the task adds ``coef * aux * tokens`` to its sum: after the loop's
normalization that is ``coef * aux`` (a token-weighted mean of the micro-batches' aux losses
under gradient accumulation), exactly the model's own weighting of the two terms.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.lm.logits import family_of

__all__ = ["RouterAux", "router_aux"]


@dataclass(frozen=True)
class RouterAux:
    """How a MoE model computes its router loss: its own ``function`` and arguments."""

    function: Callable[..., torch.Tensor]
    num_experts: int
    top_k: int
    coef: float
    family: str

    def __call__(
        self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The aux loss of one forward (a scalar); padding excluded when ``attention_mask``
        (``[B, L]``, 1 = token) is given, as in the model's own forward."""
        return self.function(router_logits, self.num_experts, self.top_k, attention_mask)


def _first(obj: Any, *names: str) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def router_aux(model: nn.Module) -> RouterAux | None:
    """The router loss of a Hugging Face MoE causal LM, or None (a dense model, or a module
    that does not say: no ``load_balancing_loss_func`` beside its class)."""
    config = getattr(model, "config", None)
    function = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    if config is None or not callable(function):
        return None
    experts = _first(model, "num_experts") or _first(config, "num_local_experts", "num_experts")
    top_k = _first(model, "num_experts_per_tok") or _first(config, "num_experts_per_tok")
    coef = _first(model, "router_aux_loss_coef")
    coef = coef if coef is not None else _first(config, "router_aux_loss_coef")
    if not experts or not top_k or coef is None:
        return None
    return RouterAux(function, int(experts), int(top_k), float(coef), family_of(model))
