"""FSDP2 on two gloo processes (CPU): ``LMTask.shard()`` trains the student to the same weights
as one process with the whole batch, the teacher is sharded and frozen, ``last.pt`` holds whole
(unsharded) tensors, and a resumed sharded run continues to the same weights."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

pytest.importorskip("transformers")

from _lm_fixtures import tiny_llama  # noqa: E402

from kdkit import Trainer  # noqa: E402
from kdkit import _sharding as fsdp  # noqa: E402
from kdkit.lm import Aligner, LMTask, TokenInputs, TokenRow  # noqa: E402
from kdkit.train import distributed, load_checkpoint  # noqa: E402

ROWS = (9, 17, 5, 30, 12, 8, 21, 14)  # unequal lengths: per-rank means would differ


def _rows() -> list:
    g = torch.Generator().manual_seed(0)
    return [TokenRow.of(torch.randint(0, 300, (n,), generator=g).tolist()) for n in ROWS]


def _trainer(world: int, rank: int, run_dir: Path, epochs: int, shard: bool) -> Trainer:
    """Global batch 4 every step: 2 rows per rank on 2 ranks, 4 rows on one process."""
    rows = _rows()
    task = LMTask(tiny_llama(seed=2, hidden_size=16, intermediate_size=32), tiny_llama(seed=1))
    if shard:
        task.shard()
    sampler = DistributedSampler(rows, num_replicas=world, rank=rank, seed=3)
    collate = Aligner(pad_id=0, max_length=32)
    loader = DataLoader(rows, batch_size=4 // world, sampler=sampler, collate_fn=collate)
    val = DataLoader(rows[:4], batch_size=4, collate_fn=collate)
    return Trainer(
        task,
        loader,
        val,
        torch.optim.AdamW(task.parameters(), lr=1e-2),
        epochs=epochs,
        max_grad_norm=0.5,  # the clipping norm is over every rank's shards
        progress=False,
        device="cpu",
        inputs=TokenInputs("cpu"),
        checkpoint_dir=run_dir,
    )


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = Path(out_dir)
        tr = _trainer(world, rank, out / "straight", epochs=2, shard=True)
        task = tr.task
        assert tr._ddp_step.__class__.__name__ == "StepModule"  # FSDP is never also DDP
        teacher = [p for p in task.teacher.parameters()]
        assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in teacher)
        assert not any(p.requires_grad for p in teacher)
        assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in task.parameters())
        tr.fit()
        result = {"straight": fsdp.full_state(task.student), "history": tr.history}
        tr._restore_best()  # rank 0 reads best.pt; every rank's shards get it
        result["best"] = fsdp.full_state(task.student)
        # one epoch, then a fresh sharded run resumes from last.pt for the second
        _trainer(world, rank, out / "resumed", epochs=1, shard=True).fit()
        again = _trainer(world, rank, out / "resumed", epochs=2, shard=True)
        again.fit(resume=True)
        result["resumed"] = fsdp.full_state(again.task.student)
        if distributed.is_main():
            torch.save(result, out / "result.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return out, torch.load(out / "result.pt", weights_only=True)


def test_two_sharded_ranks_train_like_one_process(fsdp_run, tmp_path):
    out, result = fsdp_run
    alone = _trainer(1, 0, tmp_path, epochs=2, shard=False)
    alone.fit()
    expected = alone.task.student.state_dict()
    assert set(result["straight"]) == set(expected)
    for k, v in expected.items():
        # the same sums in another order: Adam turns ~1e-7 gradient noise into ~1e-6
        torch.testing.assert_close(result["straight"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(result["history"], alone.history, strict=True):
        assert a["val_ppl"] == pytest.approx(b["val_ppl"], rel=1e-5)


def test_sharded_checkpoint_is_whole_and_resumes_exactly(fsdp_run):
    out, result = fsdp_run
    last = load_checkpoint(out / "straight" / "last.pt", map_location="cpu")
    for k, v in result["straight"].items():  # whole tensors, loadable without torch.distributed
        assert type(last["student"][k]) is torch.Tensor and last["student"][k].shape == v.shape
    # the optimizer's state is keyed by the task's parameter names, every one of them whole
    assert set(last["optimizer"]["state"]) == {f"student.{k}" for k in result["straight"]}
    best = load_checkpoint(out / "straight" / "best.pt", map_location="cpu")["student"]
    for k, v in result["best"].items():
        torch.testing.assert_close(v, best[k], rtol=0, atol=0, msg=k)
    for k, v in result["resumed"].items():
        torch.testing.assert_close(v, result["straight"][k], rtol=0, atol=0, msg=k)
