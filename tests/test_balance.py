import pytest
import torch

from kdkit import KDError, LossBalancer


def t(v):
    return torch.tensor(float(v))


def test_static_weights_and_student_weight():
    b = LossBalancer(
        weights={"output": 2.0, ("layer1", "layer2"): 3.0}, student_weight=0.25, distill_weight=0.75
    )
    total = b(
        {"output": t(1.0), "layer1<-layer2": t(2.0), "x<-y": t(4.0)},
        t(8.0),
        {"layer1<-layer2": ("layer1", "layer2")},
    )
    # 0.75 * (2*1 + 3*2 + 1*4) + 0.25 * 8
    assert total.item() == pytest.approx(0.75 * 12 + 2.0)


def test_start_epoch_switches_distillation_on():
    b = LossBalancer(start_epoch=2)
    b.set_epoch(1.5)
    assert not b.active
    assert b({"output": t(5.0)}, t(3.0)).item() == 3.0  # task loss alone, full weight
    b.set_epoch(2)
    assert b.active
    assert b({"output": t(5.0)}, t(3.0)).item() == pytest.approx(0.5 * 5 + 0.5 * 3)


def test_linear_warmup_after_start():
    b = LossBalancer(start_epoch=1, warmup_epochs=4, student_weight=0.0, distill_weight=1.0)
    ramps = []
    for e in (1, 2, 3, 5, 9):
        b.set_epoch(e)
        ramps.append(b({"output": t(1.0)}, t(0.0)).item())
    assert ramps == pytest.approx([0.0, 0.25, 0.5, 1.0, 1.0])


def test_soft_label_only_works_without_task_loss():
    b = LossBalancer(distill_weight=1.0)
    assert b({"output": t(2.0)}).item() == 2.0


def test_nothing_to_train_is_an_error():
    b = LossBalancer(start_epoch=3)
    with pytest.raises(KDError, match="nothing to train"):
        b({"output": t(1.0)}, None)


def test_negative_weight_rejected():
    with pytest.raises(KDError, match="student_weight"):
        LossBalancer(student_weight=-1)
