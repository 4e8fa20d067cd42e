"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a model that does not fit one device.

DDP keeps a whole copy of the trainable model on every rank; FSDP2 keeps ``1/world`` of each
parameter (a ``DTensor`` shard) and all-gathers one block at a time for its forward and
backward. kdkit shards at two levels, the way torch's own recipes do: every repeated block
(a transformer layer) is its own unit, and the rest (embeddings, final norm, output head) is the
root unit, gathered for the whole step.

Three things differ from DDP, and this module owns them so the loop does not branch:

- the step must run through the *root unit's* ``forward`` (FSDP2's hooks gather the root's
  parameters there and schedule the reduce-scatter of their gradients), so a task that is
  sharded routes its ``step`` through ``self(...)``;
- a sharded module's ``state_dict`` holds shards: checkpoints are written from
  :func:`full_state` / :func:`optimizer_state` (a collective: every rank calls them, rank 0
  gets the tensors) and read back with :func:`load_full_state` / :func:`load_optimizer_state`
  (rank 0's copy is broadcast, so only rank 0 needs the file);
- the module is never wrapped in DDP (:func:`kdkit.train.distributed.wrap` checks
  :func:`is_sharded`).

A frozen model (the teacher) is sharded the same way; its root is gathered for the step with
:func:`gathered` and freed after it, because under ``no_grad`` there is no backward to free it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "blocks_of",
    "gathered",
    "full_state",
    "is_sharded",
    "load_full_state",
    "load_optimizer_state",
    "optimizer_state",
    "shard",
]


def _fsdp() -> Any:
    from torch.distributed import fsdp

    return fsdp


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` or any of its submodules was given to ``fully_shard``."""
    fsdp_module = _fsdp().FSDPModule
    return any(isinstance(m, fsdp_module) for m in module.modules())


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, one FSDP unit each.

    A Hugging Face model names them (``_no_split_modules``: ``LlamaDecoderLayer``...); for any
    other module, the members of its largest ``nn.ModuleList``.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(root: nn.Module, blocks: Iterable[nn.Module]) -> nn.Module:
    """``fully_shard`` each of ``blocks``, then ``root`` (which holds the rest); returns
    ``root``, now an ``FSDPModule`` whose parameters are shards over every rank."""
    fully_shard = _fsdp().fully_shard
    for block in blocks:
        fully_shard(block)
    fully_shard(root)
    return root


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """The root unit's full parameters for the ``with`` body (a no-op when not sharded).

    For a frozen model read outside its own ``forward`` (the teacher's head in the fused
    loss): its blocks gather themselves as they run, the root is gathered here and freed on
    exit.
    """
    if not isinstance(module, _fsdp().FSDPModule):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded ``state_dict`` on the CPU of rank 0 (``{}`` on the others).

    A collective: every rank must call it. Not sharded: the plain ``state_dict``.
    """
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole ``state_dict`` into ``module``'s shards, from rank 0's ``state`` (the other
    ranks' are ignored and may be ``{}``). A collective; not sharded: ``load_state_dict``."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options(broadcast_from_rank0=True))


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state (keyed by parameter name) on rank 0, for ``last.pt``."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_state` (rank 0's ``state`` is broadcast)."""
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_options(broadcast_from_rank0=True))
