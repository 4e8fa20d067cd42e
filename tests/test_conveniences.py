"""What users expect from timm / HF Trainer, built from torch's own pieces: warm-up then
cosine from YAML, label smoothing on the task loss, early stopping, an EMA of the student."""

import pytest
import torch
from torch import nn

import kdkit
from kdkit.config import parse
from kdkit.data import ArrayDataset, FastLoader


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    return ArrayDataset(x, (x.float().mean((1, 2, 3)) > 127.5).long())


def _net():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def _train_cfg(**train):
    raw = {
        "teacher": {"model": "kdkit:fmnist_teacher"},
        "student": {"model": "kdkit:fmnist_student"},
        "data": {"train": {"fashion_mnist": "train"}},
        "train": {"progress": False, **train},
    }
    return parse(raw).train


def test_warmup_then_cosine_from_yaml():
    train = _train_cfg(
        epochs=5,
        optimizer={"name": "SGD", "lr": 1.0},
        scheduler={"name": "cosine", "warmup_epochs": 1, "interval": "epoch"},
    )
    assert train.scheduler.name == "CosineAnnealingLR"
    d = kdkit.Distiller(_net(), None)
    trainer = kdkit.Trainer.from_config(train, d, FastLoader(_data(), 16))
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.SequentialLR)
    lrs = [row["lr"] for row in trainer.fit()]  # the lr after each epoch's scheduler step
    # warm-up 1 epoch from 1/2 to 1, then cosine over the 4 remaining epochs down to 0
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert lrs == sorted(lrs, reverse=True)
    with pytest.raises(kdkit.KDError, match="shorter than the run"):
        bad = _train_cfg(epochs=2, scheduler={"name": "cosine", "warmup_epochs": 2})
        kdkit.Trainer.from_config(bad, kdkit.Distiller(_net(), None), FastLoader(_data(), 16))


def test_label_smoothing_on_the_task_loss_only():
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, -1, 1, 0, -1])
    student = _net()
    d = kdkit.Distiller(student, None, label_smoothing=0.1)
    with torch.no_grad():
        logits = student(x)
    labeled = y >= 0
    want = nn.functional.cross_entropy(logits[labeled], y[labeled], label_smoothing=0.1)
    assert d.step(x, y).loss.item() == pytest.approx(want.item() * 4 / 6, rel=1e-6)  # / all rows
    cfg = parse({
        "teacher": {"model": "kdkit:fmnist_teacher"}, "student": {"model": "kdkit:fmnist_student"},
        "data": {"train": {"fashion_mnist": "train"}}, "distill": {"label_smoothing": 0.1},
    })  # fmt: skip
    from kdkit.run.models import build_distiller

    built = build_distiller(cfg, _net(), _net())
    assert built.label_smoothing == 0.1
    with pytest.raises(kdkit.KDError, match="label_smoothing"):
        kdkit.Distiller(_net(), None, label_smoothing=1.0)


def test_early_stopping_from_yaml_stops_and_a_resume_stops_again(tmp_path):
    train = _train_cfg(
        epochs=8,
        optimizer={"lr": 1e-9},
        early_stopping={"metric": "val_loss", "patience": 2, "min_delta": 1e-6},
    )
    assert train.early_stopping.patience == 2

    def make():
        d = kdkit.Distiller(_net(), None)
        loader = FastLoader(_data(), 16)
        val = FastLoader(_data(16, 1), 16, shuffle=False)
        return kdkit.Trainer.from_config(train, d, loader, val, checkpoint_dir=tmp_path)

    history = make().fit()  # lr ~0: the val loss never improves after epoch 1
    assert len(history) == 3
    again = make()
    assert again.fit(resume=True) == history and again.epoch == 3  # stops again at once
    with pytest.raises(kdkit.KDError, match="not among this run's epoch metrics"):
        es = kdkit.train.early_stopping.EarlyStopping(metric="val_top9")
        es.reason_to_stop(history, "val_top9", True)


def test_ema_is_evaluated_saved_as_best_and_resumed_exactly(tmp_path):
    """train.ema: torch's AveragedModel; val metrics and best.pt are the average's, last.pt
    holds raw weights + average, and a killed run resumes both bit for bit."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    train = _train_cfg(epochs=2, ema={"decay": 0.9}, optimizer={"lr": 0.05})

    def make(directory):
        torch.manual_seed(0)
        d = kdkit.Distiller(_net(), None)
        val = FastLoader(_data(16, 1), 16, shuffle=False)
        return kdkit.Trainer.from_config(
            train, d, FastLoader(_data(), 8, seed=0), val, checkpoint_dir=directory
        )

    trainer = make(tmp_path / "a")
    reference = AveragedModel(
        trainer.task.student, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True
    )
    trainer.callbacks.append(lambda t, out: reference.update_parameters(t.task.student))
    trainer.fit()
    student, average = trainer.task.student, trainer.ema.average.module
    raw = [p.detach().clone() for p in student.parameters()]
    avg = list(reference.module.parameters())
    assert all(map(torch.allclose, average.parameters(), avg))
    with trainer.ema.applied():
        assert all(map(torch.equal, student.parameters(), average.parameters()))
    assert all(map(torch.equal, student.parameters(), raw))
    best = kdkit.train.load_checkpoint(tmp_path / "a" / "best.pt")["student"]
    last = kdkit.train.load_checkpoint(tmp_path / "a" / "last.pt")
    assert not torch.equal(best["1.weight"], last["student"]["1.weight"]) and "ema" in last
    # resume after the first epoch ends where the uninterrupted run did, average included
    first = make(tmp_path / "b")
    first.options = type(first.options)(**{**vars(first.options), "epochs": 1})
    first.fit()
    resumed = make(tmp_path / "b")
    resumed.fit(resume=True)
    assert all(map(torch.equal, resumed.ema.average.module.parameters(), average.parameters()))


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb"])
def test_trackers_log_per_step_and_epoch_or_say_which_extra(name, tmp_path, monkeypatch):
    import importlib.util

    from kdkit.train.trackers import TRACKERS

    module = TRACKERS[name][0]
    installed = importlib.util.find_spec(module.split(".")[0]) is not None
    if module.startswith("torch."):  # torch ships the writer, the tensorboard package the rest
        installed = importlib.util.find_spec("tensorboard") is not None
    train = _train_cfg(epochs=1, loggers=[name], log_every=1)
    assert train.loggers == (name,) and train.log_every == 1

    def make():
        d = kdkit.Distiller(_net(), None)
        return kdkit.Trainer.from_config(
            train, d, FastLoader(_data(), 16), checkpoint_dir=tmp_path / "run"
        )

    if not installed:  # the venv has none of them: the error names the extra
        with pytest.raises(kdkit.KDError, match=rf"pip install 'kdkit\[{name}\]'"):
            make()
        return
    monkeypatch.setenv("WANDB_MODE", "offline")
    make().fit()
    folder = {"tensorboard": "tb", "mlflow": "mlruns", "wandb": "wandb"}[name]
    assert any((tmp_path / "run" / folder).rglob("*"))  # the tracker's own files


def test_log_every_prints_a_line_per_n_steps(caplog):
    caplog.set_level("INFO", logger="kdkit")
    train = _train_cfg(epochs=1, log_every=2)
    kdkit.Trainer.from_config(train, kdkit.Distiller(_net(), None), FastLoader(_data(), 8)).fit()
    steps = [
        r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("step ")
    ]
    assert steps == ["2", "4"] and "loss_total" in caplog.text and "lr " in caplog.text
