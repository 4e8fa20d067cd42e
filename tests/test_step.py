"""The one place a batch's loss is computed (``Distiller.step``), the lazy-adapter warning for
hand-written loops, and ``fit(restore_best=True)``."""

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit import Distiller, FeatureMSE, KDError, LossBalancer, SoftTargetKL, Trainer
from kdkit.compat.modelopt import DistillationModel
from kdkit.distiller import StepOutput, labeled_cross_entropy

CLASSES = 5


class Net(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU())
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.head(self.body(x))


def make(prepare: bool = True):
    pairs = {("", ""): SoftTargetKL(temperature=2.0), ("body", "body"): FeatureMSE()}
    d = Distiller(Net(8), Net(16), pairs, LossBalancer(student_weight=0.3, distill_weight=0.7))
    if prepare:
        d.prepare(torch.randn(2, 6))
    return d


def batch(n=6, seed=0, unlabeled=(1, 4)):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    y[list(unlabeled)] = -1
    return torch.randn(n, 6, generator=g), y


def test_step_equals_modelopt_forward_then_compute_loss():
    d = make()
    x, y = batch()
    out = d.step(x, y)
    assert isinstance(out, StepOutput) and out.loss.requires_grad
    m = DistillationModel(d)  # ModelOpt's two calls live in kdkit.compat.modelopt
    logits = m(x, labels=y)
    total = m.compute_loss(labeled_cross_entropy(logits, y))
    assert torch.allclose(out.logits, logits)
    assert torch.allclose(out.loss, total)
    assert {"output", "body<-body", "student", "total"} <= set(out.components)
    c = out.components
    expected = 0.7 * (c["output"] + c["body<-body"]) + 0.3 * c["student"]
    assert torch.allclose(c["total"], expected)
    assert m.last_losses["total"] == pytest.approx(
        float(total.detach())
    )  # kept for hand-written loops


def test_task_loss_is_summed_over_labeled_rows_divided_by_all_rows():
    d = make()
    x, y = batch()
    out = d.step(x, y)
    keep = y >= 0
    by_hand = F.cross_entropy(out.logits[keep], y[keep], reduction="sum") / len(y)
    assert torch.allclose(out.components["student"], by_hand)
    unlabeled = d.step(x, torch.full_like(y, -1))
    assert "student" not in unlabeled.components and "output" in unlabeled.components


def test_step_keeps_nothing_between_calls():
    d = make()
    x1, y1 = batch(seed=1)
    x2, y2 = batch(seed=2)
    m = DistillationModel(d)
    logits1 = m(x1, labels=y1)  # a ModelOpt-style forward waiting for compute_loss()
    expected = m.compute_loss(labeled_cross_entropy(logits1, y1))
    first = d.step(x2, y2)
    assert d._capture.outputs == {}  # no activations of the batch left in the hooks
    assert torch.equal(d.step(x2, y2).loss, first.loss)  # history does not matter
    # the step did not disturb the pending forward
    assert torch.equal(m.compute_loss(labeled_cross_entropy(logits1, y1)), expected)


def test_lazy_adapter_created_in_a_hand_written_loop_warns_once():
    d = make(prepare=False)
    x, y = batch()
    torch.optim.SGD(d.parameters(), lr=0.1)  # built too early: the adapter does not exist
    with pytest.warns(UserWarning, match=r"prepare\(example_batch\)"):
        m = DistillationModel(d)
        m(x)
        m.compute_loss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d.step(x, y)  # once only
        ready = make(prepare=True)
        ready.step(x, y)  # prepared first: silent


def test_trainer_adds_late_adapters_to_a_given_optimizer():
    d = make(prepare=False)
    opt = torch.optim.SGD(d.student.parameters(), lr=0.1)
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Trainer prepares before its first step
        tr = Trainer(d, [(x, y)], optimizer=opt, device="cpu", progress=False)
        tr.fit()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in d.criterion.parameters()} <= in_opt


class ScriptedVal:
    """Scores epoch 0 at 100% top-1 and every later epoch at 0%: the best epoch is the first."""

    def __init__(self, model, x):
        self.model, self.x, self.calls = model, x, 0

    def __iter__(self):
        self.calls += 1
        with torch.no_grad():
            pred = self.model(self.x).argmax(1)
        yield self.x, pred if self.calls == 1 else (pred + 1) % CLASSES


@pytest.mark.parametrize("on_disk", [True, False])
def test_restore_best_loads_the_best_epoch(tmp_path, on_disk):
    d = make(prepare=False)
    train = [batch(seed=s) for s in range(3)]
    snapshots = []
    tr = Trainer(
        d,
        train,
        ScriptedVal(d.student, train[0][0]),
        epochs=3,
        device="cpu",
        progress=False,
        checkpoint_dir=tmp_path if on_disk else None,
        optimizer=lambda p: torch.optim.SGD(p, **{"lr": 0.5}),
        callbacks=[
            SimpleNamespace(on_epoch=lambda t, row: snapshots.append(_copy(d.state_dict())))
        ],
    )
    history = tr.fit(restore_best=True)
    assert [row["val_top1"] for row in history] == [100.0, 0.0, 0.0]
    now = d.state_dict()
    assert all(torch.equal(now[k], snapshots[0][k]) for k in now)  # epoch 0, student+adapter
    assert any(not torch.equal(now[k], snapshots[-1][k]) for k in now)


def test_fit_returns_with_last_weights_by_default_and_restore_best_needs_val():
    d = make()
    train = [batch(seed=s) for s in range(2)]
    snapshots = []
    tr = Trainer(
        d,
        train,
        ScriptedVal(d.student, train[0][0]),
        epochs=2,
        device="cpu",
        progress=False,
        callbacks=[
            SimpleNamespace(on_epoch=lambda t, row: snapshots.append(_copy(d.state_dict())))
        ],
    )
    tr.fit()
    assert all(torch.equal(v, snapshots[-1][k]) for k, v in d.state_dict().items())
    no_val = Trainer(make(), train, device="cpu", progress=False)
    with pytest.raises(KDError, match="restore_best=True needs a val_loader"):
        no_val.fit(restore_best=True)


def _copy(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _train_config(**changes):
    from kdkit.config import OptimizerConfig, SchedulerConfig, TrainConfig

    base = dict(
        epochs=2,
        optimizer=OptimizerConfig(name="SGD", lr=0.05, args={"momentum": 0.9}),
        scheduler=SchedulerConfig(name="OneCycleLR"),
        seed=3,
        device="cpu",
        progress=False,
    )
    return TrainConfig(**{**base, **changes})


def test_from_config_maps_the_train_section_onto_the_keywords():
    train = [batch(seed=s) for s in range(3)]
    torch.manual_seed(0)
    a = make()
    by_config = Trainer.from_config(_train_config(), a, train)
    assert isinstance(by_config.optimizer, torch.optim.SGD) and by_config.epochs == 2
    assert by_config.optimizer.defaults["momentum"] == 0.9  # (OneCycleLR cycles it)
    assert by_config.scheduler.total_steps == 2 * len(train)  # OneCycleLR, stepped per batch
    by_config.fit()
    torch.manual_seed(0)
    b = make()
    torch.manual_seed(3)  # what from_config does with train.seed
    Trainer(
        b,
        train,
        epochs=2,
        optimizer=lambda p: torch.optim.SGD(p, **{"lr": 0.05, "momentum": 0.9}),
        scheduler=lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=6),
        scheduler_interval="step",
        device="cpu",
        progress=False,
    ).fit()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_from_config_takes_a_run_config_and_refuses_duplicated_keys():
    from kdkit.config import parse

    run = parse(
        {
            "teacher": "kdkit:teacher",
            "student": "kdkit:student",
            "data": {"train": {"fashion_mnist": "train"}},
            "train": {
                "epochs": 1,
                "scheduler": {"name": "CosineAnnealingLR", "interval": "epoch"},
                "progress": False,
            },
        }
    )
    train = [batch()]
    tr = Trainer.from_config(run, make(), train, device="cpu")  # device= may override
    assert tr.scheduler.T_max == 1 and tr.options.scheduler_interval == "epoch"
    with pytest.raises(KDError, match="epochs"):
        Trainer.from_config(run, make(), train, epochs=3)


def test_reduce_on_plateau_steps_per_epoch_on_the_val_loss():
    from kdkit.config import SchedulerConfig

    cfg = _train_config(scheduler=SchedulerConfig(name="ReduceLROnPlateau"))
    train = [batch(seed=s) for s in range(2)]
    x, y = batch(seed=9, unlabeled=())
    tr = Trainer.from_config(cfg, make(), train, [(x, y)])
    assert tr.options.scheduler_interval == "epoch"
    history = tr.fit()
    assert tr.scheduler.best == min(row["val_loss"] for row in history)
