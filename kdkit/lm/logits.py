"""What a language model does to ``hidden @ head.T`` before its softmax, found in one place.

kdkit's LM loss never builds ``[tokens, vocab]`` logits: it takes the final hidden states and
the output head and projects token chunks itself (:mod:`kdkit.lm.fused`). That is the model's
distribution only if the model does nothing after its head. Some families do:

=====================================  ===========================================  ============
family (``config.model_type``)         after the head                               config key
=====================================  ===========================================  ============
Gemma 2, Gemma 3 (text), Gemma 3n/4    ``c * tanh(z / c)`` (soft-capping)           ``final_logit_softcapping``
Granite, Granite MoE (shared/hybrid)   ``z / s``                                    ``logits_scaling``
Cohere, Cohere 2                       ``z * s``                                    ``logit_scale``
HyperCLOVA X                           ``z * s``                                    ``logits_scaling``
=====================================  ===========================================  ============

The same key means opposite things in two families (Granite divides by ``logits_scaling``,
HyperCLOVA X multiplies), so the rule is taken from the family, never guessed from a key: a
family outside the table whose config holds one of these keys is left untransformed, and the
logits probe (:mod:`kdkit.lm.probe`), which compares kdkit's view with the model's own
``forward(...).logits`` before the first step, refuses it with the difference it measured.

:func:`output_transform` is the one lookup every path uses (the student and live teacher of
:class:`~kdkit.lm.task.LMTask`, ``kdkit lm capture``, ``kdkit cache check``, the ONNX/int8 LM
teacher and its fidelity gate, ``kdkit eval``). A module that is not a Hugging Face model may
carry its own: an attribute ``output_transform`` holding an :class:`OutputTransform`
(:class:`~kdkit.lm.onnx_teacher.OnnxLMTeacher` does).

The transform is applied chunk by chunk inside the fused loss, in place, with its exact
gradient: ``d/dz c tanh(s z / c) = s (1 - (f / c)^2)`` is recovered from the transformed
logits ``f`` themselves, so soft-capping costs no extra ``[rows, V]`` buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError

__all__ = [
    "IDENTITY",
    "OutputTransform",
    "family_of",
    "output_transform",
    "project_logits",
    "transform_rules",
]


@dataclass(frozen=True)
class OutputTransform:
    """``f(z) = softcap * tanh(scale * z / softcap)``, or ``scale * z`` without a softcap.

    ``z`` are the head's logits (``hidden @ W.T + b``); ``family`` and ``source`` say where the
    rule came from (for messages and the run's report).
    """

    scale: float = 1.0
    softcap: float | None = None
    family: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, float) and self.scale > 0 and self.scale < float("inf")):
            raise KDError(f"a logit scale must be a finite number > 0, got {self.scale!r}")
        if self.softcap is not None and not self.softcap > 0:
            raise KDError(f"a logit soft-cap must be > 0, got {self.softcap!r}")

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def describe(self) -> str:
        """``"none"``, ``"x 0.25 (logit_scale)"``, ``"30 tanh(z / 30) (final_logit_softcapping)"``."""
        if self.identity:
            return "none"
        parts = []
        if self.scale != 1.0:
            parts.append(f"x {self.scale:.6g}")
        if self.softcap is not None:
            parts.append(f"{self.softcap:g} tanh(z / {self.softcap:g})")
        return ", then ".join(parts) + (f" ({self.source})" if self.source else "")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``f(logits)``, out of place (autograd follows it): the reference form."""
        if self.softcap is not None:
            return self.softcap * torch.tanh(logits * (self.scale / self.softcap))
        return logits * self.scale if self.scale != 1.0 else logits

    def apply_(self, logits: torch.Tensor) -> torch.Tensor:
        """``f(logits)`` in place (the fused loop's buffers)."""
        if self.softcap is not None:
            return logits.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap)
        return logits.mul_(self.scale) if self.scale != 1.0 else logits

    def chain_(
        self,
        grad: torch.Tensor,
        log_q: torch.Tensor,
        shift: torch.Tensor,
        temperature: float,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        """``grad`` (``dL/df``) times ``df/dz``, in place: ``dL/dz`` for the head.

        ``log_q = f / T - shift`` (per row) is the log-softmax the loop kept, so the capped
        logits are ``f = T (log_q + shift)`` and ``df/dz = scale (1 - (f / c)^2)`` needs no
        buffer of its own; ``scratch`` (same shape) is clobbered.
        """
        if self.softcap is not None:
            f_over_c = torch.add(log_q, shift.unsqueeze(-1), out=scratch)
            f_over_c.mul_(temperature / self.softcap).square_().neg_().add_(1.0)
            grad.mul_(f_over_c)
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad


#: the transform of a plain head (Llama, Qwen, Mistral, GPT-2, ...)
IDENTITY = OutputTransform()


_SOFTCAP = ("gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text")
_GRANITE = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa")
#: model_type -> (what is done, with which config key)
_RULES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(_SOFTCAP, ("softcap", "final_logit_softcapping")),
    **dict.fromkeys((*_GRANITE, "granitemoe_swa"), ("divide", "logits_scaling")),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), ("multiply", "logit_scale")),
    "hyperclovax": ("multiply", "logits_scaling"),
}
_WORDS = {"softcap": "c tanh(z / c), c = {}", "divide": "z / {}", "multiply": "z * {}"}


def transform_rules() -> dict[str, str]:
    """``model_type -> what kdkit applies after the head``, for every family it knows (docs)."""
    return {f: _WORDS[kind].format(key) for f, (kind, key) in sorted(_RULES.items())}


def family_of(model: nn.Module) -> str:
    """The model's family: its config's ``model_type`` (a Hugging Face model), else its class."""
    config = _text_config(model)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)
    return text() if callable(text) else config


def output_transform(model: nn.Module) -> OutputTransform:
    """What ``model`` does after its head (see the module docstring); the identity for a family
    without a rule. The one lookup of kdkit.lm: every path that projects hidden states calls it."""
    own = getattr(model, "output_transform", None)
    if isinstance(own, OutputTransform):
        return own
    family = family_of(model)
    rule = _RULES.get(family)
    if rule is None:
        return OutputTransform(family=family)
    kind, key = rule
    value = getattr(_text_config(model), key, None)
    if not value:  # e.g. a Gemma 2 config with final_logit_softcapping: null
        return OutputTransform(family=family)
    if kind == "softcap":
        return OutputTransform(softcap=float(value), family=family, source=key)
    scale = 1.0 / float(value) if kind == "divide" else float(value)
    return OutputTransform(scale=scale, family=family, source=key)


def project_logits(
    hidden: torch.Tensor,
    head: nn.Linear | torch.Tensor,
    transform: OutputTransform = IDENTITY,
    vocab: int | None = None,
) -> torch.Tensor:
    """The model's logits ``f(hidden @ W[:vocab].T + b[:vocab])`` as float32 (float64 kept),
    for a *small* set of rows (capture, checks, the probe); the loss never calls this."""
    weight = head.weight if isinstance(head, nn.Linear) else head
    bias = head.bias if isinstance(head, nn.Linear) else None
    vocab = weight.shape[0] if vocab is None else vocab
    logits = hidden.to(weight.dtype) @ weight[:vocab].T
    if bias is not None:
        logits = logits + bias[:vocab]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return transform(logits.to(dtype))
