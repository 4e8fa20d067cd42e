"""ModelOpt's distillation guide (seeds/modelopt-distillation.rst.txt), run on kdkit.

``test_guide_example_runs`` is the guide's example with one line changed, the import
(``import modelopt.torch.distill as mtd`` -> ``import kdkit.compat.modelopt as mtd``), plus
what the guide leaves to the user: a teacher, a few training steps with the one added
``compute_kd_loss(student_loss=...)`` line, and saving / reloading the exported student. The
other tests check the guide's rules: custom two-argument losses, "no balancer for a single
pair without a student loss", and every ``teacher_model`` form.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet

import kdkit
import kdkit.compat.modelopt as mtd  # the one changed line: was modelopt.torch.distill
from kdkit import KDError


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_guide_example_runs(tmp_path, one_thread):
    from torchvision.models import resnet18 as resnet50  # the guide's resnet50, made small

    teacher_model = (resnet50, (), {"num_classes": 10})  # "(model_cls_or_callable, args, kwargs)"

    # -- the guide's code, verbatim from here -------------------------------------------
    # User-defined model (student)
    model = resnet50(num_classes=10)

    # Configure and convert for distillation
    distillation_config = {
        # `teacher_model` is a model class or callable, or a tuple.
        # If a tuple, it must be of the form (model_cls_or_callable,) or
        # (model_cls_or_callable, args) or (model_cls_or_callable, args, kwargs).
        "teacher_model": teacher_model,
        "criterion": mtd.LogitsDistillationLoss(),
        "loss_balancer": mtd.StaticLossBalancer(),
    }
    distillation_model = mtd.convert(model, mode=[("kd_loss", distillation_config)])
    assert isinstance(distillation_model, type(model))  # "isinstance() will still work"
    # -- the user's training loop, with the one added loss line --------------------------
    teacher_before = [p.clone() for p in distillation_model.teacher.module.parameters()]
    student_before = model.conv1.weight.detach().clone()
    optimizer = torch.optim.SGD(distillation_model.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        optimizer.zero_grad()
        output = distillation_model(x)
        loss = distillation_model.compute_kd_loss(student_loss=F.cross_entropy(output, y))
        loss.backward()
        optimizer.step()
    comps = distillation_model.last_losses
    # StaticLossBalancer(0.5): 0.5 * kd + (1 - 0.5) * student
    assert comps["total"] == pytest.approx(0.5 * comps["output"] + 0.5 * comps["student"])
    # -- the guide again -------------------------------------------------------------------
    # Export model in original class form
    model_exported = mtd.export(distillation_model)

    assert type(model_exported) is ResNet and model_exported is model  # never class-swapped
    assert _hooks(model_exported) == 0
    assert not torch.equal(model.conv1.weight, student_before)  # the student trained
    after = distillation_model.teacher.module.parameters()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, after, strict=True))
    # save and reload the student: a plain state dict of the user's own class
    torch.save(model_exported.state_dict(), tmp_path / "student.pt")
    reloaded = resnet50(num_classes=10)
    reloaded.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True))
    model_exported.eval(), reloaded.eval()
    assert torch.equal(reloaded(x), model_exported(x))


class Tiny(nn.Module):
    def __init__(self, width: int = 4, classes: int = 3):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x):
        return self.layers(x)


def l1(s, t):
    """A user's own two-argument loss, as the guide says users often write."""
    return (s - t).abs().mean()


@pytest.mark.parametrize("criterion", [nn.MSELoss(), l1, nn.SmoothL1Loss()])
def test_custom_two_argument_losses_on_one_pair_give_the_raw_loss(criterion):
    student, teacher = Tiny(), Tiny()
    d = mtd.convert(student, mode=[("kd_loss", {"teacher_model": teacher, "criterion": criterion})])
    x = torch.randn(6, 5)
    d(x)
    loss = d.compute_loss()  # one pair, no student loss, no balancer: the raw loss
    with torch.no_grad():
        raw = criterion(student(x), teacher(x))
    assert loss.item() == pytest.approx(raw.item(), rel=1e-6)
    loss.backward()
    assert student.layers[0].weight.grad is not None


def test_pairwise_criterion_with_module_names_and_kldiv():
    def kl(s, t):
        return nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s, 1), F.softmax(t, 1))

    config = {
        "teacher_model": lambda: Tiny(width=8),
        "criterion": {("layers.1", "layers.1"): nn.MSELoss(), ("", ""): kl},
        "loss_balancer": mtd.StaticLossBalancer([0.3, 0.5]),
    }
    student = Tiny(width=8)
    d = mtd.convert(student, config)
    d(torch.randn(4, 5))
    loss = d.compute_loss(student_loss=torch.tensor(2.0))
    c = d.last_losses
    expected = 0.3 * c["layers.1<-layers.1"] + 0.5 * c["output"] + 0.2 * 2.0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "teacher_model",
    [Tiny, (Tiny,), (Tiny, (4,)), (Tiny, (), {"width": 4}), lambda: Tiny(), Tiny()],
    ids=["class", "tuple1", "tuple2", "tuple3", "callable", "module"],
)
def test_every_teacher_model_form(teacher_model):
    d = mtd.convert(Tiny(), {"teacher_model": teacher_model})
    assert isinstance(d.teacher.module, Tiny)
    assert isinstance(d.criterion[0], kdkit.SoftTargetKL)  # ModelOpt's default criterion


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(KDError, match="teacher_model"):
        mtd.convert(Tiny(), {"criterion": nn.MSELoss()})
    with pytest.raises(KDError, match="did you mean 'criterion'"):
        mtd.convert(Tiny(), {"teacher_model": Tiny, "criterium": nn.MSELoss()})
    with pytest.raises(KDError, match="returned int"):
        mtd.convert(Tiny(), {"teacher_model": lambda: 3})
    with pytest.raises(KDError, match="mode"):
        mtd.convert(Tiny(), mode=[("quantize", {})])
    with pytest.raises(KDError, match="sum to at most 1"):
        mtd.StaticLossBalancer([0.7, 0.6])


def test_mgd_loss_name_and_a_yaml_shaped_config():
    """The kdkit train YAML's pair records go through the same from_config."""
    student, teacher = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
    config = {
        "teacher_model": teacher,
        "criterion": [
            {"loss": "mgd", "args": {"student_channels": 4, "teacher_channels": 6}, "weight": 2.0}
        ],
        "loss_balancer": {"student_weight": 0.0, "distill_weight": 1.0},
    }
    d = mtd.convert(student, config)
    assert isinstance(d.criterion[0], kdkit.MGD)
    d(torch.randn(2, 3, 5, 5))
    assert d.compute_loss().item() == pytest.approx(2.0 * d.last_losses["output"], rel=1e-6)
    mgd = mtd.MGDLoss(4, 6, alpha_mgd=0.5, lambda_mgd=0.3)
    assert (mgd.alpha, mgd.mask_ratio) == (0.5, 0.3)


def test_converted_model_is_an_instance_of_the_students_class_with_its_attributes():
    """The guide: "isinstance() will still work, as the model dynamically becomes a subclass
    of the original's". kdkit's wrapper class does; the student itself is never swapped."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    distillation_model = mtd.convert(model, {"teacher_model": (resnet18, (), {"num_classes": 10})})
    assert isinstance(distillation_model, type(model)) and type(model) is ResNet
    assert distillation_model.fc is model.fc and distillation_model.layer4 is model.layer4
    assert distillation_model._forward_impl.__self__ is model  # methods bind to the student
    head = nn.Linear(512, 10)
    distillation_model.fc = head  # assignment reaches the student
    assert model.fc is head and "fc" not in distillation_model._modules
    assert type(mtd.convert(resnet18(), {"teacher_model": Tiny})) is type(distillation_model)
    seq = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    d = mtd.convert(seq, {"teacher_model": Tiny})
    assert isinstance(d, nn.Sequential) and len(d) == 2 and d[1] is seq[1]
    assert list(d.state_dict()) == [f"student.{k}" for k in seq.state_dict()]
    d.eval()
    assert not seq.training and not d.training
    copied = copy.deepcopy(d)  # a copy is a converted model of its own student
    assert isinstance(copied, nn.Sequential) and copied[0] is copied.student[0] is not seq[0]

    class WithProperty(Tiny):
        @property
        def width(self):
            return self.layers[0].out_features

    assert mtd.convert(WithProperty(), {"teacher_model": Tiny}).width == 4  # on the student


def test_eval_forward_runs_the_teacher_only_when_a_loss_is_asked_for():
    student, teacher = Tiny(), Tiny()
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    d = mtd.convert(student, {"teacher_model": teacher})
    d.eval()
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert torch.equal(d(x), student(x))
    assert calls == []  # validation costs the student only
    loss = d.compute_kd_loss()
    assert len(calls) == 1
    d.train()
    d(x)
    assert len(calls) == 2 and loss.item() == pytest.approx(d.compute_loss().item(), rel=1e-6)


def test_mto_save_and_restore_rebuild_the_teacher_from_its_callable(tmp_path):
    """The guide's third step with ``import modelopt.torch.opt as mto`` changed to kdkit's."""
    import kdkit.compat.opt as mto  # was: import modelopt.torch.opt as mto

    config = {
        "teacher_model": (Tiny, (), {"width": 6}),
        "criterion": mtd.LogitsDistillationLoss(2.0),
        "loss_balancer": mtd.StaticLossBalancer(0.7),
    }
    model = mtd.convert(Tiny(), mode=[("kd_loss", config)])
    x = torch.randn(4, 5)
    model(x)
    model.compute_loss(student_loss=torch.tensor(1.0)).backward()
    mto.save(model, tmp_path / "kd.pth")
    saved = torch.load(tmp_path / "kd.pth", weights_only=True)
    assert not any("width" in str(k) or k.startswith("teacher") for k in saved["student"])
    restored = mto.restore(Tiny(), tmp_path / "kd.pth")
    assert isinstance(restored, mtd.DistillationModel) and isinstance(restored, Tiny)
    assert restored.teacher.module.layers[0].out_features == 6  # rebuilt, fresh weights
    assert torch.equal(restored.student(x), model.student(x))
    b = restored.balancer
    assert (b.distill_weight, b.student_weight) == pytest.approx((0.7, 0.3))
    assert restored.criterion[0].temperature == 2.0
    # a custom loss is code: restore says to pass the config, and then works
    custom = mtd.convert(Tiny(), {"teacher_model": Tiny, "criterion": l1})
    mto.save(custom, tmp_path / "custom.pth")
    with pytest.raises(KDError, match="config=distillation_config"):
        mto.restore(Tiny(), tmp_path / "custom.pth")
    again = mto.restore(Tiny(), tmp_path / "custom.pth", {"teacher_model": Tiny, "criterion": l1})
    assert torch.equal(again.student(x), custom.student(x))
    # a function outside the script and the registry is code a file chose: refused
    with pytest.raises(KDError, match="trust_code"):
        mtd_config = {"callable": "os:system", "args": ["true"], "kwargs": {}}
        from kdkit.compat._modelopt_config import rebuild_teacher_model

        rebuild_teacher_model(mtd_config)
    # the exported student saves and restores as a plain module
    mto.save(mtd.export(model), tmp_path / "student.pth")
    plain = mto.restore(Tiny(), tmp_path / "student.pth")
    assert type(plain) is Tiny and torch.equal(plain(x), model.student(x))
