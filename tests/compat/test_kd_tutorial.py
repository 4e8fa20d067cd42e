"""The "KD for CNNs in PyTorch" tutorial (seeds/kd-cnn-pytorch-tutorial.txt), run on kdkit.

The tutorial fine-tunes a frozen pre-trained teacher's new head, precomputes the teacher's
outputs once (``get_outputs``), trains a small CNN with its own ``loss_kd(outputs, labels,
teacher_outputs, T, alpha)`` and returns the best epoch's weights. Each step is one kdkit
call here; the tutorial's own loss function runs unchanged as a Distiller criterion.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkit
from kdkit.cache import CachedTeacher, precompute
from kdkit.compat.modelopt import DistillationModel
from kdkit.data import FastLoader
from kdkit.data.arrays import ArrayDataset


class Net(nn.Module):
    """The tutorial's student, narrower."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc1(self.pool1(self.layer1(x)).flatten(1))


def loss_kd(outputs, labels, teacher_outputs, temparature, alpha):
    """The tutorial's loss, as written there (nn.KLDivLoss() with its default reduction)."""
    kd = nn.KLDivLoss()(
        F.log_softmax(outputs / temparature, dim=1), F.softmax(teacher_outputs / temparature, dim=1)
    )
    return kd * (alpha * temparature * temparature) + F.cross_entropy(outputs, labels) * (
        1.0 - alpha
    )


def data(n: int = 48) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = (images.float().mean(dim=(1, 2, 3)) > 127.5).long() * 2  # learnable: classes 0/2
    return ArrayDataset(images, labels)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_tutorial_loss_runs_as_the_criterion_and_equals_kdkits_up_to_its_reduction():
    t, alpha = 2.0, 0.5
    student, teacher = Net(), Net()
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 4, (5,))
    # the tutorial's loss already holds its CE term: ModelOpt's two calls give it the labels
    # without adding kdkit's own task loss (kdkit.compat.modelopt.DistillationModel)
    d = DistillationModel(
        kdkit.Distiller(student, teacher, lambda s, te, labels: loss_kd(s, labels, te, t, alpha))
    )
    d(x, labels=y)
    loss = d.compute_loss()  # one pair, no balancer, no separate student loss: as written
    with torch.no_grad():
        s_out, t_out = student(x), teacher(x)
    assert loss.item() == pytest.approx(loss_kd(s_out, y, t_out, t, alpha).item(), rel=1e-6)
    # kdkit's own pieces: SoftTargetKL is "batchmean" (summed over classes), the tutorial's
    # nn.KLDivLoss() averages over classes too, so its KD term is C = 4 times smaller.
    native = kdkit.Distiller(
        student, teacher, kdkit.SoftTargetKL(t), kdkit.LossBalancer(None, 1 - alpha, alpha)
    )
    got = native.step(x, y).loss.item()  # the task loss: cross-entropy on labeled rows
    kd = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_out / t, 1), F.softmax(t_out / t, 1))
    assert got == pytest.approx(
        (alpha * t * t * kd + (1 - alpha) * F.cross_entropy(s_out, y)).item(), rel=1e-5
    )


def test_tutorial_pipeline(tmp_path, one_thread):
    train, val = data(48), data(16)
    # 1. the teacher: frozen body, a new head trained on the labels (Distiller without teacher)
    teacher = Net()
    for p in teacher.parameters():
        p.requires_grad = False
    teacher.fc1 = nn.Linear(8, 4)
    kdkit.Trainer(
        kdkit.Distiller(teacher, None), FastLoader(train, 16), epochs=2, progress=False
    ).fit()
    # 2. get_outputs: the teacher's logits for every sample, computed once
    cache = precompute(teacher, train, tmp_path / "cache", progress=False)
    # 3. train the student on them with alpha = 0.5, T = 1; keep the best epoch's weights
    student = Net()
    d = kdkit.Distiller(
        student, CachedTeacher(cache), kdkit.SoftTargetKL(1.0), kdkit.LossBalancer(None, 0.5, 0.5)
    )
    trainer = kdkit.Trainer(
        d, FastLoader(train, 16), FastLoader(val, 16, shuffle=False), epochs=3, progress=False
    )
    history = trainer.fit(restore_best=True)
    best = max(row["val_top1"] for row in history)
    assert trainer.evaluate()["top1"] == pytest.approx(best)
    assert all("loss_output" in row for row in history)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_the_doc_mapping_with_the_tutorials_own_dataloader(tmp_path, one_thread):
    """docs/coming-from.md as written: the tutorial's ``(x, y)`` DataLoader of normalized
    float tensors, ``WithIndex`` for the cache, the lambda criterion in kdkit's Trainer."""
    from torch.utils.data import DataLoader, TensorDataset

    from kdkit.data import WithIndex

    g = torch.Generator().manual_seed(0)
    trainset = TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 4, (32,)))
    teacher = Net()
    cache = precompute(teacher, trainset, tmp_path / "cache", progress=False)
    plain = DataLoader(trainset, batch_size=8, shuffle=True)
    d = kdkit.Distiller(Net(), CachedTeacher(cache), kdkit.SoftTargetKL(1.0))
    with pytest.raises(kdkit.KDError, match=r"WithIndex\(dataset\)"):
        kdkit.Trainer(d, plain, epochs=1, progress=False).fit()
    loader = DataLoader(WithIndex(trainset), batch_size=8, shuffle=True)
    assert kdkit.Trainer(d, loader, epochs=1, progress=False).fit()[0]["loss_output"] > 0
    # the tutorial's loss already holds its CE term: weigh kdkit's task loss 0
    t, alpha = 2.0, 0.5
    student = Net()
    d = kdkit.Distiller(
        student,
        teacher,
        lambda s, t_out, labels: loss_kd(s, labels, t_out, t, alpha),
        kdkit.LossBalancer(student_weight=0.0, distill_weight=1.0),
    )
    x, y = trainset.tensors[0][:8], trainset.tensors[1][:8]
    with torch.no_grad():
        want = loss_kd(student(x), y, teacher(x), t, alpha)
    assert d.step(x, y).loss.item() == pytest.approx(want.item(), rel=1e-6)
