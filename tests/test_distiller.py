import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit import Distiller, FeatureMSE, KDError, LossBalancer, SoftTargetKL
from kdkit.compat.modelopt import DistillationModel
from kdkit.teachers import TorchTeacher


def two_call(*args):
    """ModelOpt's forward -> compute_loss pair lives in kdkit.compat.modelopt."""
    return DistillationModel(Distiller(*args))


class Net(nn.Module):
    def __init__(self, width: int, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


def make(classes_t=5, width_s=8, width_t=16):
    s, te = Net(width_s), Net(width_t, classes_t)
    crit = {("", ""): SoftTargetKL(temperature=2.0), ("body", "body"): FeatureMSE()}
    return s, te, two_call(s, te, crit)


def hooks(m):
    return sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())


def test_forward_returns_student_output_and_teacher_stays_frozen():
    s, te, d = make()
    x = torch.randn(4, 6)
    d.train()
    out = d(x)
    assert torch.allclose(out, s(x))
    assert not te.training
    assert all(not p.requires_grad for p in te.parameters())
    ids = {id(p) for p in d.parameters()}
    assert not ids & {id(p) for p in te.parameters()}
    assert not any(k.startswith("teacher") for k in d.state_dict())


@pytest.mark.filterwarnings("ignore:a loss created new parameters")  # lazy adapters on purpose
def test_compute_loss_components_and_gradients():
    s, te, d = make()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    out = d(x)
    loss = d.compute_loss(F.cross_entropy(out, y))
    loss.backward()
    comps = d.last_losses
    assert set(comps) == {"output", "output_unscaled", "body<-body", "student", "total"}
    assert comps["output_unscaled"] == pytest.approx(comps["output"] / 4)  # T = 2
    expected = 0.5 * (comps["output"] + comps["body<-body"]) + 0.5 * comps["student"]
    assert comps["total"] == pytest.approx(expected, rel=1e-6)
    assert all(p.grad is not None for p in s.parameters())
    assert d.criterion[1].adapter.weight.grad is not None  # 8 -> 16 adapter trained too


def test_describe_lists_pairs_and_materialises_adapter():
    s, te, d = make()
    n_before = len(list(d.parameters()))
    table = d.describe(torch.randn(2, 6))
    text = str(table)
    assert "body<-body" in text and "(2, 8)" in text and "(2, 16)" in text
    assert len(list(d.parameters())) > n_before
    assert table[0].name == "output" and table[0].student_shape == (2, 5)


def test_wrong_module_names_suggest_valid_ones():
    s, te = Net(8), Net(16)
    with pytest.raises(KDError, match="student; did you mean"):
        two_call(s, te, {("bdy", "body"): FeatureMSE()})
    with pytest.raises(KDError, match="teacher; did you mean"):
        two_call(s, te, {("body", "hed"): FeatureMSE()})


def test_mismatched_class_counts_name_pair_and_shapes():
    s, te, d = make(classes_t=100)
    d(torch.randn(3, 6))
    with pytest.raises(KDError) as err:
        d.compute_loss()
    msg = str(err.value)
    assert "<output>" in msg and "5" in msg and "100" in msg


def test_compute_loss_before_forward_is_an_error():
    _, _, d = make()
    with pytest.raises(KDError, match="before compute_loss"):
        d.compute_loss()


def test_teacher_skipped_before_start_epoch():
    calls = []
    te = Net(16)
    te.register_forward_hook(lambda *a: calls.append(1))
    d = two_call(Net(8), te, SoftTargetKL(), LossBalancer(start_epoch=1))
    out = d(torch.randn(2, 6))
    task = F.cross_entropy(out, torch.tensor([0, 1]))
    loss = d.compute_loss(task)
    assert not calls and set(d.last_losses) == {"student", "total"}
    assert loss.item() == task.item()  # the task loss at full weight before distillation
    d.set_epoch(1)
    d(torch.randn(2, 6))
    assert calls


@pytest.mark.filterwarnings("ignore:a loss created new parameters")  # lazy adapters on purpose
def test_export_returns_users_class_without_hooks():
    s, te, d = make()
    d(torch.randn(2, 6))
    exported = d.export()
    assert type(exported) is Net and exported is s
    assert hooks(s) == 0 and hooks(te) == 0
    # the distiller keeps working afterwards (hooks come back only inside it)
    d(torch.randn(2, 6))
    d.compute_loss()


def test_state_dict_round_trip_with_lazy_adapter(tmp_path):
    d = make()[2].distiller
    d.prepare(torch.randn(2, 6))
    path = tmp_path / "d.pt"
    torch.save(d.state_dict(), path)
    d2 = make()[2].distiller  # a fresh distiller: its adapter does not exist yet
    assert d2.criterion[1].adapter is None
    d2.load_state_dict(torch.load(path, weights_only=True))
    for (k, v), (k2, v2) in zip(d.state_dict().items(), d2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.filterwarnings("ignore:a loss created new parameters")  # lazy adapters on purpose
def test_names_work_through_dataparallel_wrapper():
    s, te = Net(8), Net(16)
    d = two_call(nn.DataParallel(s), te, {("module.body", "body"): FeatureMSE()})
    d(torch.randn(2, 6))
    assert d.compute_loss().requires_grad
    assert type(d.export()) is Net


def test_any_teacher_backend_is_accepted():
    te = TorchTeacher(Net(16))
    d = two_call(Net(8, 5), te, SoftTargetKL())
    d(torch.randn(2, 6))
    assert d.compute_loss().ndim == 0
