"""End to end: a teacher trained here, a smaller student distilled through a logit pair and a
feature pair, measurably closer to the teacher afterwards."""

import torch
import torch.nn.functional as F
from torch import nn

from kdkit import Distiller, FeatureMSE, LossBalancer, SoftTargetKL


def synthetic(n, gen):
    # 4 classes arranged on two noisy rings in 10-d: not linearly separable.
    x = torch.randn(n, 10, generator=gen)
    r = x[:, :2].norm(dim=1)
    y = (r > 1.2).long() * 2 + (x[:, 2] > 0).long()
    return x, y


class MLP(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        layers, d = [], 10
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.features(x))


def agreement_and_kl(student, teacher, x):
    with torch.no_grad():
        s, t = student(x), teacher(x)
    agree = (s.argmax(1) == t.argmax(1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    return agree, kl.item()


def test_distillation_moves_student_towards_teacher():
    gen = torch.Generator().manual_seed(0)
    x, y = synthetic(4000, gen)
    x_test, _ = synthetic(1000, gen)
    teacher = MLP(64, 3)
    opt = torch.optim.Adam(teacher.parameters(), 3e-3)
    for _ in range(300):
        i = torch.randint(0, len(x), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(teacher(x[i]), y[i]).backward()
        opt.step()
    teacher.eval()

    student = MLP(16, 2)
    before = agreement_and_kl(student, teacher, x_test)
    d = Distiller(
        student,
        teacher,
        {("", ""): SoftTargetKL(temperature=2.0), ("features.1", "features.3"): FeatureMSE()},
        LossBalancer(distill_weight=1.0),
    )
    d.prepare(x[:8])  # creates the 16 -> 64 adapter before the optimizer sees parameters
    opt = torch.optim.Adam(d.parameters(), 3e-3)
    d.train()
    for _ in range(300):  # no labels at all: the teacher is the only signal
        i = torch.randint(0, len(x), (128,), generator=gen)
        loss = d.step(x[i]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    student = d.export()
    after = agreement_and_kl(student, teacher, x_test)
    assert after[0] > before[0] + 0.3, (before, after)
    assert after[0] > 0.85
    assert after[1] < before[1] / 3
