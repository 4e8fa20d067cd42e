"""Two gloo processes on the CPU, started once for the whole module (~3 s of torch import per
process): DDP trains the student and a lazy adapter identically on both ranks, the teacher is
never wrapped, only rank 0 writes files, and an image folder is read one shard per rank."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.utils.data import DistributedSampler

from kdkit import Distiller, FeatureMSE, LossBalancer, SoftTargetKL, Trainer
from kdkit.data import ArrayDataset, FastLoader, ImageFolderManager
from kdkit.train import distributed, load_checkpoint

N_TRAIN_IMAGES = 8


def net(width, channels=1):
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, 3),
    )


def _distill(rank: int, world: int, mine: Path, overlap: bool | str = "auto") -> dict:
    """A logit pair + a feature pair whose 4 -> 8 adapter is created lazily; distillation
    starts at epoch 1, so the adapter idles (no gradient on any rank) through epoch 0.
    ``overlap``: the Trainer's (``"1+1"``: the teacher on a worker thread beside DDP's step)."""
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(
        torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g),
        torch.randint(0, 3, (64,), generator=g),
    )
    torch.manual_seed(0)  # same initial weights on every rank
    teacher, student = net(8), net(4)
    pairs = {("", ""): SoftTargetKL(), ("1", "1"): FeatureMSE()}
    d = Distiller(student, teacher, pairs, LossBalancer(start_epoch=1))
    loader = FastLoader(data, 8, seed=1, num_replicas=world, rank=rank)
    snapshots = []
    tr = Trainer(
        d,
        loader,
        FastLoader(data, 32, shuffle=False),
        epochs=2,
        progress=False,
        device="cpu",
        checkpoint_dir=mine,  # one folder per rank, to see which rank writes
        overlap=overlap,
        callbacks=[
            SimpleNamespace(on_epoch=lambda t, row: snapshots.append(_copy(d.state_dict())))
        ],
    )
    assert isinstance(tr._ddp_step, nn.parallel.DistributedDataParallel)
    assert distributed.world_size() == world
    wrapped = {id(p) for p in tr._ddp_step.parameters()}
    assert not wrapped & {id(p) for p in teacher.parameters()}  # the teacher is never in DDP
    assert {id(p) for p in d.criterion.parameters()} <= wrapped  # the adapter is
    adapter_init = d.criterion[1].adapter.weight.detach().clone()
    tr.fit(restore_best=True)
    return {"epochs": snapshots, "final": _copy(d.state_dict()), "adapter_init": adapter_init}


def _image_folder(rank: int, root: Path) -> dict:
    manager = ImageFolderManager(root, size=8, batch_size=2, workers=0, seed=0)
    sampler = manager.train_loader.sampler
    assert isinstance(sampler, DistributedSampler)
    shards = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        shards.append(torch.cat([batch[2] for batch in manager.train_loader]))
    return {"shards": shards}


def _darklight(rank: int, root: Path, mine: Path) -> None:
    """darklight's per-epoch save under DDP (each rank is given its own folder)."""
    import kdkit.compat.darklight as dl

    torch.manual_seed(0)
    manager = dl.ImageNetManager(root, size=8, batch_size=2, workers=0)
    trainer = dl.StudentTrainer(net(4, 3), manager, net(8, 3), device="cpu", progress=False)
    trainer.train(epochs=1, save=str(mine / "ckpt_{}.pth"))


def _worker(rank: int, world: int, init_file: str, out_dir: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = Path(out_dir)
        mine = out / f"rank{rank}"
        result = _distill(rank, world, mine)
        result["overlapped"] = _distill(rank, world, out / f"overlap{rank}", "1+1")["final"]
        result.update(_image_folder(rank, Path(root)))
        _darklight(rank, Path(root), mine)
        result["lm_grads"] = _lm_grads(rank, world)
        torch.save(result, out / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


LM_ROWS = (9, 17, 5, 30, 12, 8, 21, 14)  # unequal lengths: per-rank means would differ


def _lm_grads(rank: int, world: int) -> list[torch.Tensor]:
    """The LM task's normalized gradients with this rank's share of 8 rows (DDP + the loop's
    token normalization: one all-reduce of the token count per step)."""
    from _lm_fixtures import tiny_llama

    from kdkit.lm import Aligner, LMTask, TokenRow
    from kdkit.train.distributed import StepModule
    from kdkit.train.precision import Precision

    g = torch.Generator().manual_seed(0)
    rows = [TokenRow.of(torch.randint(0, 300, (n,), generator=g).tolist()) for n in LM_ROWS]
    mine = rows[rank::world]
    task = LMTask(tiny_llama(seed=2, hidden_size=16, intermediate_size=32), tiny_llama(seed=1))
    step = distributed.wrap(StepModule(task), torch.device("cpu"))
    seen = []

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            seen.extend(p.grad.clone() for grp in self.param_groups for p in grp["params"])

    opt = Recorder(task.parameters(), lr=0.0)
    out = step(Aligner(pad_id=0, max_length=32)(mine))
    Precision("fp32", torch.device("cpu")).backward_step(
        out["loss"], opt, list(task.parameters()), None, out["normalizer"]
    )
    return seen


def _copy(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _image_tree(root: Path) -> None:
    g = torch.Generator().manual_seed(0)
    for split, per_class in (("train", N_TRAIN_IMAGES // 2), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=g)
                Image.fromarray(pixels.numpy()).save(root / split / c / f"{i}.png")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _image_tree(out / "images")
    mp.spawn(
        _worker,
        args=(2, str(out / "init"), str(out), str(out / "images")),
        nprocs=2,
        join=True,
    )
    results = [torch.load(out / f"result{r}.pt", weights_only=True) for r in (0, 1)]
    return out, results


def _assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_student_and_adapter_stay_identical(ddp_run):
    _, (r0, r1) = ddp_run
    assert any(".adapter." in k for k in r0["final"])
    for a, b in zip(r0["epochs"], r1["epochs"], strict=True):
        _assert_same(a, b)  # after every epoch, before any final broadcast
    _assert_same(r0["final"], r1["final"])


def test_ddp_with_the_teacher_overlapped_ends_with_the_sequential_weights(ddp_run):
    """overlap "1+1": each rank's teacher runs on its own thread beside the DDP step (the
    student keeps one thread, as in the sequential run): the same weights, bitwise."""
    _, results = ddp_run
    for r in results:
        _assert_same(r["final"], r["overlapped"])


def test_adapter_idles_before_start_epoch_then_trains(ddp_run):
    _, (r0, _) = ddp_run
    key = "criterion.1.adapter.weight"
    after_epoch0, after_epoch1 = (s[key] for s in r0["epochs"])
    assert torch.equal(after_epoch0, r0["adapter_init"])  # no gradient, no decay
    assert not torch.equal(after_epoch1, after_epoch0)


def test_only_rank0_writes_and_restore_best_loads_best(ddp_run):
    out, (r0, _) = ddp_run
    assert not (out / "rank1").exists() or not any((out / "rank1").iterdir())
    written = {p.name for p in (out / "rank0").iterdir()}
    assert {"last.pt", "best.pt", "metrics.csv", "ckpt_0.pth"} <= written
    best = load_checkpoint(out / "rank0" / "best.pt")
    for k, v in best["student"].items():
        assert torch.equal(r0["final"][f"student.{k}"], v), k


def test_image_folder_ranks_read_disjoint_shards(ddp_run):
    _, (r0, r1) = ddp_run
    for epoch in (0, 1):
        a, b = r0["shards"][epoch].tolist(), r1["shards"][epoch].tolist()
        assert len(a) == len(b) == N_TRAIN_IMAGES // 2
        assert sorted(a + b) == list(range(N_TRAIN_IMAGES))
    assert r0["shards"][0].tolist() != r0["shards"][1].tolist()  # set_epoch reshuffles


def test_single_process_is_not_wrapped():
    assert not distributed.is_distributed() and distributed.is_main()
    m = nn.Linear(2, 2)
    assert distributed.wrap(m, torch.device("cpu")) is m
    distributed.broadcast_state(m)  # a no-op without a process group


def test_lm_gradient_over_two_ranks_equals_one_process(ddp_run):
    pytest.importorskip("transformers")
    from _lm_fixtures import tiny_llama

    from kdkit.lm import Aligner, LMTask, TokenRow

    _, results = ddp_run
    g = torch.Generator().manual_seed(0)
    rows = [TokenRow.of(torch.randint(0, 300, (n,), generator=g).tolist()) for n in LM_ROWS]
    task = LMTask(tiny_llama(seed=2, hidden_size=16, intermediate_size=32), tiny_llama(seed=1))
    out = task.step(Aligner(pad_id=0, max_length=32)(rows))
    out.loss.backward()
    alone = [p.grad / out.normalizer for p in task.parameters()]
    for r in (0, 1):
        for a, b in zip(alone, results[r]["lm_grads"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
