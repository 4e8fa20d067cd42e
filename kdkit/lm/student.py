"""What a ``task: lm`` run does to its student before training: LoRA adapters and gradient
checkpointing.

- ``student.peft`` (TRL's ``peft_config``): the ``peft`` library injects LoRA layers into the
  model in place (``get_peft_model``) and freezes the base weights; kdkit trains the model it
  was handed (``get_base_model()``: the same modules, adapters inside), so the step, the fused
  loss and the probe see an ordinary causal LM and the optimizer gets the adapters only. The
  output head is never adapted: the fused loss reads its weight directly.
- ``train.gradient_checkpointing``: Hugging Face's ``gradient_checkpointing_enable`` (the
  non-reentrant torch checkpoint), so each decoder layer's activations are recomputed in
  backward; the loss and gradients are the same, the memory lower.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from kdkit.errors import KDError
from kdkit.lm.models import output_head

__all__ = ["add_lora", "enable_gradient_checkpointing", "prepare_student"]

log = logging.getLogger(__name__)


def add_lora(student: nn.Module, peft_cfg: Any) -> Any:
    """The ``peft.PeftModel`` of ``student`` with LoRA adapters as ``peft_cfg``
    (:class:`~kdkit.config.LMPeftConfig`) says; ``student`` itself now holds them."""
    try:
        import peft
    except ImportError as e:
        msg = f"student.peft needs the 'peft' package ({e}); pip install 'kdkit[peft]'"
        raise KDError(msg) from None
    targets = peft_cfg.target_modules
    lora = peft.LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        modules_to_save=list(peft_cfg.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = peft.get_peft_model(student, lora)
    except ValueError as e:  # peft names the modules it could not find
        raise KDError(f"config key 'student.peft': {str(e).splitlines()[0]}") from None
    if hasattr(output_head(model.get_base_model()), "lora_A"):
        raise KDError(
            "config key 'student.peft.target_modules' names the output head; the fused loss "
            "reads the head's weight directly: adapt the decoder layers only"
        )
    return model


def enable_gradient_checkpointing(student: nn.Module) -> None:
    """Hugging Face's gradient checkpointing of the decoder layers (non-reentrant)."""
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise KDError(
            f"config key 'train.gradient_checkpointing': {type(student).__name__} does not "
            "support it (a Hugging Face model with supports_gradient_checkpointing does)"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_student(
    student: nn.Module, *, peft: Any = None, gradient_checkpointing: bool = False
) -> nn.Module:
    """The module the run trains: ``student`` with LoRA adapters (``peft``) and / or gradient
    checkpointing; unchanged without either."""
    if peft is not None:
        wrapped = add_lora(student, peft)
        student = wrapped.get_base_model()
        trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
        total = sum(p.numel() for p in student.parameters())
        log.info("student.peft: LoRA r=%d, %d of %d parameters trained", peft.r, trained, total)
    if gradient_checkpointing:
        enable_gradient_checkpointing(student)
    return student
