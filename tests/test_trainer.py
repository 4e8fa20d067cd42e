import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import blob_tensors, quadrant_net
from torch import nn

import kdkit
from kdkit import Distiller, KDError, SoftTargetKL, Trainer
from kdkit.compat import StudentTrainer
from kdkit.data import ArrayDataset, FastLoader
from kdkit.train import Precision, load_checkpoint

HERE = Path(__file__).parent


def blobs(n=256, classes=4, seed=0, unlabeled_every=0):
    """Images whose class is the bright quadrant: learnable in a few steps."""
    x, y = blob_tensors(n, classes, seed)
    labels = y.clone()
    if unlabeled_every:
        labels[::unlabeled_every] = -1
    return ArrayDataset(x, labels), ArrayDataset(x, y)


def net(width=8, classes=4):
    return quadrant_net(width, classes)


def trained_teacher():
    train, _ = blobs()
    t = net(16)
    trainer = Trainer(
        Distiller(t, None),
        FastLoader(train, 32),
        epochs=3,
        progress=False,
        optimizer=lambda p: torch.optim.Adam(p, **{"lr": 1e-2}),
    )
    trainer.fit()
    return t


def test_supervised_and_distilled_training_learn():
    train, evalset = blobs()
    teacher = trained_teacher()
    t_acc = Trainer(Distiller(teacher, None), FastLoader(train, 32), progress=False).evaluate(
        FastLoader(evalset, 64, shuffle=False)
    )
    assert t_acc["top1"] > 90
    unlabeled = ArrayDataset(train.images, torch.full_like(train.labels, -1))
    d = Distiller(
        net(), teacher, SoftTargetKL(temperature=2.0), kdkit.LossBalancer(distill_weight=1)
    )
    tr = Trainer(
        d,
        FastLoader(unlabeled, 32),
        FastLoader(evalset, 64, shuffle=False),
        epochs=4,
        optimizer=lambda p: torch.optim.Adam(p, **{"lr": 1e-2}),
        progress=False,
    )
    hist = tr.fit()
    assert "loss_student" not in hist[0]  # label-free: distillation loss only
    assert hist[-1]["val_top1"] > 85 and hist[-1]["loss_output"] < hist[0]["loss_output"]
    assert {"top1", "top5", "loss"} <= set(tr.evaluate())


def test_labeled_rows_add_task_loss_unlabeled_do_not():
    train, _ = blobs(unlabeled_every=2)
    d = Distiller(net(), net(16), SoftTargetKL())
    tr = Trainer(d, FastLoader(train, 16, shuffle=False), progress=False)
    x, y, idx = next(iter(FastLoader(train, 16, shuffle=False)))
    assert "student" in tr.train_step((x, y, idx)).components
    out = tr.train_step((x, torch.full_like(y, -1), idx))
    assert "student" not in out.components and "output" in out.components


def test_killed_run_resumes_to_identical_weights(tmp_path):
    job = [sys.executable, str(HERE / "_resume_job.py")]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}  # the kdkit under test
    ref, resumed = tmp_path / "ref.pt", tmp_path / "resumed.pt"
    run = functools.partial(subprocess.run, env=env, timeout=300)
    run([*job, str(tmp_path / "a"), str(ref), "-1", "0"], check=True)
    killed = run([*job, str(tmp_path / "b"), str(resumed), "10", "0"])
    assert killed.returncode == -9  # SIGKILL at step 10, mid-epoch 2; last checkpoint: step 8
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (1, 8, 2)
    run([*job, str(tmp_path / "b"), str(resumed), "-1", "1"], check=True)
    a, b = torch.load(ref, weights_only=True), torch.load(resumed, weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise on CPU
    rows = (tmp_path / "b" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header + one row per epoch, none duplicated by the resume


class NaNAfter(nn.Module):
    def __init__(self, inner, after):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x):
        self.calls += 1
        out = self.inner(x)
        return out * float("nan") if self.calls > self.after else out


def test_nan_loss_stops_with_step_and_component(tmp_path):
    train, _ = blobs()
    teacher = NaNAfter(net(16), after=8)  # 8 good steps (no dry run: no lazy adapter)
    d = Distiller(net(), teacher, SoftTargetKL())
    tr = Trainer(d, FastLoader(train, 32), epochs=3, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(KDError) as err:
        tr.fit()
    msg = str(err.value)
    assert "epoch 1 step 8" in msg and "output" in msg and "last.pt" in msg
    state = load_checkpoint(tmp_path / "last.pt")  # last good checkpoint intact
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["student"].values())


def test_best_and_last_checkpoints_and_csv(tmp_path):
    train, evalset = blobs()
    d = Distiller(net(), None)
    tr = Trainer(
        d,
        FastLoader(train, 32),
        FastLoader(evalset, 64, shuffle=False),
        epochs=2,
        checkpoint_dir=tmp_path,
        progress=False,
        run_info={"student_spec": {"factory": "x:y"}, "input_shape": (1, 8, 8)},
    )
    tr.fit()
    assert {"last.pt", "best.pt", "metrics.csv"} <= {p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.tmp"))
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["student_spec"] == {"factory": "x:y"} and state["input_shape"] == [1, 8, 8]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "val_top1" in header and "img_per_s" in header


def test_load_checkpoint_refuses_foreign_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"a": 1}, p)
    with pytest.raises(KDError, match="not a kdkit checkpoint"):
        load_checkpoint(p)
    p.write_bytes(b"garbage")
    with pytest.raises(KDError, match="not a readable checkpoint"):
        load_checkpoint(p)


def test_precision_policies():
    cpu = torch.device("cpu")
    with pytest.raises(KDError, match="fp16"):
        Precision("fp16", cpu)
    with pytest.raises(KDError, match="precision"):
        Precision("int8", cpu)
    p = Precision("bf16", cpu)
    with p.autocast():
        assert torch.mm(torch.randn(2, 2), torch.randn(2, 2)).dtype == torch.bfloat16
    lin = nn.Linear(2, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    acc = Precision("fp32", cpu, grad_accum=2)
    w0 = lin.weight.detach().clone()
    assert not acc.backward_step(lin(torch.ones(1, 2)).sum(), opt)
    assert torch.equal(lin.weight, w0)  # no step on the first micro-batch
    assert acc.backward_step(lin(torch.ones(1, 2)).sum(), opt)
    assert not torch.equal(lin.weight, w0) and lin.weight.grad is None


def test_student_trainer_facade_saves_each_epoch(tmp_path):
    train, evalset = blobs()
    teacher = trained_teacher()
    st = StudentTrainer(
        net(),
        (FastLoader(train, 32), FastLoader(evalset, 64, shuffle=False)),
        teacher,
        opt_params={
            "optimizer": torch.optim.AdamW,
            "okwargs": {"lr": 1e-2},
            "scheduler": torch.optim.lr_scheduler.CosineAnnealingWarmRestarts,
            "skwargs": {"T_0": 10, "T_mult": 2},
            "amplevel": None,
        },
        progress=False,
    )
    hist = st.train(epochs=2, save=str(tmp_path / "ckpt_{}.pth"))
    assert (tmp_path / "ckpt_0.pth").exists() and (tmp_path / "ckpt_1.pth").exists()
    assert len(hist) == 2 and hist[-1]["val_top1"] > 50
    assert type(st.student()) is nn.Sequential


def test_bad_opt_params_are_clear():
    train, _ = blobs()
    from kdkit.compat.darklight import from_opt_params

    with pytest.raises(KDError, match="unknown opt_params"):
        from_opt_params({"optimiser": 1})
    with pytest.raises(KDError, match="from_opt_params"):  # the core takes typed objects only
        Trainer(Distiller(net(), None), FastLoader(train, 32), optimizer={"optimizer": 1})
