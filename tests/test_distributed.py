"""Two gloo processes on the CPU: DDP keeps the students identical and the teacher unwrapped."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdkit import Distiller, FeatureMSE, SoftTargetKL, Trainer
from kdkit.data import ArrayDataset, FastLoader
from kdkit.train import distributed


def net(width):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, 3),
    )


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        data = ArrayDataset(
            torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g),
            torch.randint(0, 3, (64,), generator=g),
        )
        torch.manual_seed(0)  # same initial weights on every rank
        teacher, student = net(8), net(4)
        d = Distiller(student, teacher, {("", ""): SoftTargetKL(), ("1", "1"): FeatureMSE()})
        loader = FastLoader(data, 8, seed=1, num_replicas=world, rank=rank)
        tr = Trainer(d, loader, epochs=2, progress=False, device="cpu", checkpoint_dir=out_dir)
        assert isinstance(tr._model, nn.parallel.DistributedDataParallel)
        assert distributed.world_size() == world
        tr.fit()
        torch.save(d.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_students_stay_identical(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(a) == set(b) and any(".adapter." in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert (tmp_path / "last.pt").exists()  # written once, by rank 0


def test_single_process_is_not_wrapped():
    assert not distributed.is_distributed() and distributed.is_main()
    m = nn.Linear(2, 2)
    assert distributed.wrap(m, torch.device("cpu")) is m
