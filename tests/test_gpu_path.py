"""What the first GPU run would have hit (issue 24), checked on the CPU where it can be:
resume loads on the CPU, loaders free themselves by refcount, the compiled models warm up
once, the teacher runs in its own precision, and the step makes no host sync. The GPU-only
halves are marked ``gpu`` and skip without CUDA."""

from __future__ import annotations

import torch
from torch import nn

from kdkit import Distiller, SoftTargetKL, Trainer
from kdkit.data import ArrayDataset, FastLoader


def _blobs(n: int = 64, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(
        torch.randint(0, 255, (n, 1, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 4, (n,), generator=g),
    )


def _net(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, 4),
    )


# -- 1. resume loads the checkpoint on the CPU ---------------------------------------------
def test_resume_loads_on_the_cpu_whatever_the_device(tmp_path):
    """A CUDA ``map_location`` would put the RNG states on the GPU, where ``.numpy()`` and
    ``torch.set_rng_state`` fail. The "meta" device stands in for the GPU: a resume that
    loaded onto ``trainer.device`` would fail the same way."""
    loader = FastLoader(_blobs(32), 16)
    first = Trainer(
        Distiller(_net(), _net(16), SoftTargetKL()),
        loader,
        epochs=1,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    first.fit()
    saved_rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in first.task.student.state_dict().items()}
    torch.manual_seed(123)  # a different RNG state, restored by the resume
    again = Trainer(
        Distiller(_net(), _net(16), SoftTargetKL()),
        loader,
        epochs=1,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    again.device = torch.device("meta")  # where a map_location=self.device would load
    assert again._resume(required=True)
    assert torch.equal(torch.get_rng_state(), saved_rng)
    for k, v in again.task.student.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, weights[k]), k
    assert again.step == first.step
