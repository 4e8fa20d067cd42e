"""Autocast + gradient scaling + backward + optimizer step: one tested unit.

Modelled on Lightning Fabric's precision plugins: the trainer never touches autocast or the
scaler directly, so fp32, bf16 and fp16 share one code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from kdkit._precision import AUTOCAST_DTYPES
from kdkit.errors import KDError
from kdkit.train import distributed

__all__ = ["Precision", "PRECISION_DTYPES"]

#: precision name -> autocast dtype (None: fp32, no autocast), from the one table
PRECISION_DTYPES = AUTOCAST_DTYPES


class Precision:
    """Mixed-precision policy for one device.

    - ``fp32``: no autocast.
    - ``bf16``: autocast to bfloat16 (CUDA, or CPU where the ops support it); no scaler
      needed, bf16 has fp32's exponent range.
    - ``fp16``: autocast to float16 with a ``GradScaler`` (CUDA only).

    With ``grad_accum > 1`` the loss is divided by it, and :meth:`backward_step` steps the
    optimizer only on every ``grad_accum``-th call.
    """

    def __init__(self, precision: str, device: torch.device, grad_accum: int = 1) -> None:
        if precision not in PRECISION_DTYPES:
            raise KDError(f"precision must be one of {list(PRECISION_DTYPES)}, got {precision!r}")
        if grad_accum < 1:
            raise KDError(f"grad_accum must be >= 1, got {grad_accum}")
        if precision == "fp16" and device.type != "cuda":
            raise KDError("fp16 mixed precision needs a CUDA device; use bf16 or fp32 on CPU")
        self.precision = precision
        self.device = device
        self.dtype = PRECISION_DTYPES[precision]
        self.grad_accum = grad_accum
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self._micro = 0
        self._items = 0.0  # items (tokens) of the pending step's micro-batches, this rank

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward_step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        params: Iterable[torch.Tensor] | None = None,
        max_grad_norm: float | None = None,
        normalizer: float | None = None,
    ) -> bool:
        """Backward ``loss``; step and zero the optimizer at accumulation boundaries.

        ``normalizer``: ``loss`` is a sum over that many items (tokens); the gradients are
        then divided, at the boundary, by the items of every micro-batch of this step and
        every DDP rank (one all-reduce), instead of ``loss / grad_accum`` per micro-batch. So
        splitting a batch 1x8 or 8x1, or over ranks, gives the same gradient.

        Returns True when the optimizer stepped (the scaler may still skip an fp16 step whose
        gradients overflowed; that is the scaler's documented behaviour).
        """
        if normalizer is None:
            loss = loss / self.grad_accum
        else:
            self._items += float(normalizer)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self._micro += 1
        if self._micro % self.grad_accum:
            return False
        params = [p for p in (params or []) if p.grad is not None]
        unscaled = False
        if self._items:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
                unscaled = True
            scale = distributed.world_size() / max(distributed.all_reduce_sum(self._items), 1.0)
            torch._foreach_mul_([p.grad for p in params], scale)
            self._items = 0.0
        if max_grad_norm is not None:
            if self.scaler is not None and not unscaled:
                self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    @property
    def steps_next(self) -> bool:
        """True when the next :meth:`backward_step` ends an accumulation (and steps)."""
        return (self._micro + 1) % self.grad_accum == 0

    @property
    def at_step_boundary(self) -> bool:
        """True when no accumulated gradient is pending (safe to checkpoint)."""
        return self._micro % self.grad_accum == 0

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler else None, "micro": self._micro}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._micro = int(state.get("micro", 0))
