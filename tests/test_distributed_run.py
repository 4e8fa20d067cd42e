"""``kdkit train`` under two gloo ranks (issue 21): a BatchNorm student on a generated image
folder; both ranks report the same val numbers every epoch and end with the same weights
(BatchNorm statistics included), rank 0 alone writes the run directory, and
``train.sync_batchnorm`` on CPUs is one clear error (torch syncs BatchNorm on GPUs only)."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _images import make_photos, tiny_model
from torch import nn


def _config(photos, run_dir: Path, **train) -> dict:
    return {
        "teacher": None,
        "student": tiny_model(),
        "data": {
            "train": {"image_folder": str(photos.train)},
            "val": {"image_folder": str(photos.val)},
            "image_size": 32,
            "batch_size": 4,
            "workers": 0,
            "views": {"crop": "pad", "flip": True},
        },
        "train": {"epochs": 2, "device": "cpu", "progress": False, **train},
        "run_dir": str(run_dir),
    }


def _worker(rank: int, init_file: str, root: str) -> None:
    import kdkit.run.classify_job as classify_job
    import kdkit.run.job as job
    from kdkit.config import load_config
    from kdkit.errors import KDError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = Path(root)
        photos = make_photos(out / f"photos{rank}", broken=False)  # same files on both ranks
        try:
            job.train_run(load_config(data=_config(photos, out / "sync", sync_batchnorm=True)))
            sync_error = ""
        except KDError as err:
            sync_error = str(err)
        built = {}
        build = classify_job.build_run

        def keep(*args, **kwargs):
            built["trainer"], data, choices = build(*args, **kwargs)
            return built["trainer"], data, choices

        classify_job.build_run = keep  # to read this rank's weights after the run
        result = job.train_run(load_config(data=_config(photos, out / f"run{rank}")))
        student = built["trainer"].task.student
        torch.save(
            {
                "history": result.history,
                "sync_error": sync_error,
                "state": {k: v.detach().clone() for k, v in student.state_dict().items()},
                "has_bn": any(isinstance(m, nn.BatchNorm2d) for m in student.modules()),
            },
            out / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_run")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_both_ranks_report_the_same_val_numbers_and_weights(ranks):
    out, (r0, r1) = ranks
    assert r0["has_bn"] and len(r0["history"]) == 2
    for a, b in zip(r0["history"], r1["history"], strict=True):
        for key in ("val_top1", "val_top5", "val_loss"):
            assert a[key] == b[key], key  # one evaluation, one answer
    assert set(r0["state"]) == set(r1["state"])
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key  # running statistics too
    assert {"config.yaml", "best.pt", "report.md", "classes.json"} <= {
        p.name for p in (out / "run0").iterdir()
    }
    assert not (out / "run1").exists()  # rank 1 writes nothing


def test_sync_batchnorm_on_cpu_ranks_is_one_clear_error(ranks):
    _, (r0, r1) = ranks
    for r in (r0, r1):
        assert "SyncBatchNorm runs on GPUs only" in r["sync_error"]
        assert r["sync_error"].startswith("config key 'train.sync_batchnorm'")


def test_sync_batchnorm_converts_the_student_and_checkpoints_stay_batchnorm(tmp_path):
    from kdkit.config import load_config
    from kdkit.load import load_model
    from kdkit.run.job import build_trainer, train_run

    photos = make_photos(tmp_path / "photos", broken=False)
    raw = _config(photos, tmp_path / "run", sync_batchnorm=True, epochs=1)
    trainer, _ = build_trainer(load_config(data=raw))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in trainer.task.student.modules())
    train_run(load_config(data=raw))  # one process: SyncBatchNorm computes BatchNorm's numbers
    model, _ = load_model(tmp_path / "run" / "best.pt")
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
