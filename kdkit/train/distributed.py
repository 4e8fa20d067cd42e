"""Multi-GPU (or multi-process CPU) training with ``torchrun`` and DistributedDataParallel.

Only the trainable part is wrapped: :class:`~kdkit.Distiller` keeps its teacher outside the
module tree, so ``DistributedDataParallel(distiller)`` syncs the student's and the adapters'
gradients and never touches the frozen teacher, which every rank holds a copy of.

    torchrun --nproc_per_node 8 train.py   # in train.py: kdkit.train.distributed.init()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from kdkit._launch import join, launch_env

T = TypeVar("T")

__all__ = [
    "init",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "wrap",
    "StepModule",
    "barrier",
    "broadcast_state",
    "broadcast_buffers",
    "on_main",
    "sync_batchnorm",
]


def init(backend: str | None = None) -> torch.device:
    """Join the process group ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK...).

    Returns this process's device: ``cuda:LOCAL_RANK`` with NCCL where CUDA is available, else
    the CPU with gloo. Without torchrun's variables (or with ``WORLD_SIZE=1``) it does nothing
    and returns the default device, so the same script runs on one process. Variables that
    do not fit together, or a rank 0 that never comes, are one line (:mod:`kdkit._launch`).
    """
    cuda = torch.cuda.is_available()
    launch = launch_env()
    if launch is None:
        return torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", launch.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        join(launch, backend or ("nccl" if cuda else "gloo"))
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(value: float) -> float:
    """``value`` summed over every rank (itself on one process): one collective."""
    if not is_distributed():
        return float(value)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def launch_rank() -> int:
    """This process's rank, also before :func:`init` (torchrun's ``RANK``; 0 alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    launch = launch_env()  # checked: a bad RANK is one line here, before the run lock
    return 0 if launch is None else launch.rank


def is_main() -> bool:
    """Rank 0 writes checkpoints, metrics and progress bars."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class StepModule(nn.Module):
    """``task.step`` as a module's ``forward``, so DDP wraps the whole step.

    Returns a dict, not the :class:`StepOutput` dataclass: DDP finds the tensors a step used
    in dicts and sequences only (pytorch/pytorch#124666), and with ``find_unused_parameters``
    it walks the graph from those outputs.
    """

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.task = task

    def forward(self, batch: Any) -> dict[str, Any]:
        return self.task.step(batch).as_dict()


def wrap(
    module: nn.Module, device: torch.device, find_unused_parameters: bool = False
) -> nn.Module:
    """DDP around ``module`` when running distributed, else ``module`` itself.

    Once distillation is on, every parameter of a distiller (student and adapters) takes
    part in every step, so ``find_unused_parameters`` stays off unless the caller knows some
    will idle (adapters before ``start_epoch``); it costs one graph walk per step.
    """
    if not is_distributed():
        return module
    import kdkit._sharding as fsdp

    if fsdp.is_sharded(module):  # FSDP2 reduce-scatters its own gradients: never also DDP
        return module
    # device_ids=None: DDP then leaves the inputs where the pipeline put them (x on the
    # device; labels, index and view ids on the host, so the step reads them without a
    # sync). With device_ids it would copy every tensor in the batch to the GPU.
    return nn.parallel.DistributedDataParallel(
        module, device_ids=None, find_unused_parameters=find_unused_parameters
    )


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module``, in place.

    For weights that only ``src`` loaded (the best checkpoint, which only rank 0 wrote and
    which another node may not see); a no-op on one process.
    """
    if not is_distributed():
        return
    for tensor in module.state_dict().values():  # detached views of the live tensors
        dist.broadcast(tensor, src)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm running statistics) into every rank's ``module``.

    DDP keeps parameters identical, but each rank's last forward updates its own running
    statistics from its own shard: after this every rank holds the model rank ``src`` saves.
    """
    if not is_distributed():
        return
    for tensor in module.buffers():
        dist.broadcast(tensor, src)


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone, its (picklable) result sent to every rank: one answer
    (the validation metrics) that every rank reports, whatever the ranks' hardware."""
    if not is_distributed():
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``train.sync_batchnorm``: BatchNorm layers -> :class:`torch.nn.SyncBatchNorm` (batch
    statistics over every rank's shard). On one process SyncBatchNorm computes what
    BatchNorm does; torch implements the synchronised version for GPUs only."""
    from kdkit.errors import KDError

    if is_distributed() and device.type != "cuda":
        raise KDError(
            "config key 'train.sync_batchnorm': torch's SyncBatchNorm runs on GPUs only "
            f"(this run is on {device.type}); set it to false"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
