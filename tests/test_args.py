import argparse

import pytest
import torch

import kdkit
from kdkit import KDError
from kdkit.compat import add_distillation_args, distillation_from_args


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_distillation_args(parser)
    return parser.parse_args(list(argv))


def test_distiller_compatible_flags_build_policy():
    args = parse("--kd-temp", "4", "--kd-dw", "0.7", "--kd-sw", "0.3", "--kd-start-epoch", "2")
    policy = distillation_from_args(args)
    assert isinstance(policy.criterion, kdkit.SoftTargetKL)
    assert policy.criterion.temperature == 4.0
    b = policy.balancer
    assert (b.distill_weight, b.student_weight, b.start_epoch) == (0.7, 0.3, 2)


def test_long_flag_names_and_loss_choice():
    args = parse("--kd-temperature", "2", "--kd-distill-wt", "1", "--kd-loss", "dkd")
    policy = distillation_from_args(args)
    assert isinstance(policy.criterion, kdkit.DKD)
    assert policy.balancer.distill_weight == 1.0


def test_policy_drives_a_distiller():
    args = parse("--kd-temp", "2")
    policy = distillation_from_args(args)
    s, te = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    d = kdkit.Distiller(s, te, policy.criterion, policy.balancer)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    out = d.step(x, y)
    loss, comps = out.loss, {k: float(v) for k, v in out.components.items()}
    assert loss.requires_grad and set(comps) == {"output", "output_unscaled", "student", "total"}
    assert comps["output_unscaled"] == pytest.approx(comps["output"] / 4)  # logged without T^2
    assert policy.teacher is None  # no --kd-teacher / --kd-resume given


def test_teacher_weight_must_be_zero():
    with pytest.raises(KDError, match="frozen"):
        distillation_from_args(parse("--kd-tw", "0.5"))
