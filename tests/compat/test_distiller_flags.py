"""Intel Distiller's KD flags (seeds/distiller-knowledge_distillation.py.txt), run on kdkit.

A Distiller image-classifier script adds the flags to its parser, builds the teacher from
``--kd-teacher`` and ``--kd-resume``, and trains with the weights and start epoch the flags
give. Here the same script shape drives kdkit: the flag names are Distiller's, the teacher
comes from the flags, and the log carries the distillation loss with and without T^2.
"""

import argparse

import pytest
import torch

import kdkit
from kdkit import KDError
from kdkit.compat import add_distillation_args, distillation_from_args
from kdkit.data import FastLoader
from kdkit.data.arrays import ArrayDataset
from kdkit.load import save_checkpoint
from kdkit.models import fmnist_student, fmnist_teacher


def script_args(*argv: str) -> argparse.Namespace:
    """The script's own parser, extended the way Distiller's README says."""
    parser = argparse.ArgumentParser(description="image classifier")
    parser.add_argument("--arch", default="kdkit:fmnist_student")
    parser.add_argument("--epochs", type=int, default=2)
    add_distillation_args(parser, enable_pretrained=True)
    return parser.parse_args(list(argv))


def fake_fmnist(n: int = 64) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    return ArrayDataset(images, torch.randint(0, 10, (n,), generator=g))


def test_flags_build_teacher_and_schedule(tmp_path, one_thread):
    trained = fmnist_teacher()
    torch.save(trained.state_dict(), tmp_path / "teacher.pth")  # a plain state dict
    args = script_args(
        "--kd-teacher", "kdkit:fmnist_teacher", "--kd-resume", str(tmp_path / "teacher.pth"),
        "--kd-temp", "4", "--kd-dw", "0.7", "--kd-sw", "0.3", "--kd-start-epoch", "1",
    )  # fmt: skip
    policy = distillation_from_args(args)
    pairs = zip(policy.teacher.state_dict().values(), trained.state_dict().values(), strict=True)
    for a, b in pairs:
        assert torch.equal(a, b)  # --kd-resume was loaded
    d = kdkit.Distiller(fmnist_student(), policy.teacher, policy.criterion, policy.balancer)
    history = kdkit.Trainer(
        d, FastLoader(fake_fmnist(), 32), epochs=args.epochs, progress=False
    ).fit()
    assert "loss_output" not in history[0]  # before --kd-start-epoch: labels only
    row = history[1]
    assert row["loss_output_unscaled"] == pytest.approx(row["loss_output"] / 16, rel=1e-5)
    expected = 0.7 * row["loss_output"] + 0.3 * row["loss_student"]
    assert row["loss_total"] == pytest.approx(expected, rel=1e-4)


def test_teacher_from_a_bare_arch_name_or_a_checkpoint(tmp_path):
    policy = distillation_from_args(
        script_args("--kd-teacher", "resnet18"), teacher_kwargs={"num_classes": 3}
    )
    assert type(policy.teacher).__name__ == "ResNet" and policy.teacher.fc.out_features == 3
    teacher = fmnist_teacher()
    spec = {"model": "kdkit:fmnist_teacher", "kwargs": {}}
    path = save_checkpoint(
        tmp_path / "t.pt", {"teacher": teacher.state_dict(), "teacher_spec": spec}, role="teacher"
    )
    for argv in (["--kd-teacher", str(path)], ["--kd-resume", str(path)]):
        got = distillation_from_args(script_args(*argv)).teacher
        x = torch.randn(2, 1, 28, 28)
        assert torch.equal(got(x), teacher.eval()(x))


def test_flag_errors_name_the_fix(tmp_path):
    torch.save(fmnist_teacher().state_dict(), tmp_path / "w.pth")
    with pytest.raises(KDError, match="--kd-teacher ARCH"):
        distillation_from_args(script_args("--kd-resume", str(tmp_path / "w.pth")))
    with pytest.raises(KDError, match="frozen"):
        distillation_from_args(script_args("--kd-tw", "0.5"))
    with pytest.raises(KDError, match="resnet1800"):
        distillation_from_args(script_args("--kd-teacher", "resnet1800"))
