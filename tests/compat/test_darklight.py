"""darklight's README example (seeds/darklight-readme.txt), run on kdkit.

``test_readme_example_runs`` is the README's code with the import changed
(``import darklight as dl`` -> ``import kdkit.compat.darklight as dl``), small models and
images in place of resnet152 / resnet18 on ImageNet, ``workers=0`` (no worker processes in
CI) and ``student_spec=`` (what lets ``kdkit export`` rebuild the student from the saved
files). The rest: darklight's unlabeled "wild" folders, ``labels=False``, apex amp levels and
the choice between TensorRT and ONNX Runtime.
"""

import logging

import pytest
import torch
from PIL import Image
from torch import nn

import kdkit
import kdkit.compat.darklight as dl  # the one changed line: was `import darklight as dl`
from kdkit import KDError
from kdkit.cli import main as cli_main
from kdkit.data import FastLoader
from kdkit.data.arrays import ArrayDataset
from kdkit.teachers import TorchTeacher


def _image(path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8, generator=g).numpy()
    Image.fromarray(pixels).save(path)


def imagenet_tree(root, per_class: int = 4):
    for split, n in (("train", per_class), ("val", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _image(root / split / c / f"{i}.png", hash((split, c, i)) % 1000)
    return root


def tiny_teacher() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 2),
    )  # fmt: skip


def test_readme_example_runs(tmp_path, caplog, one_thread):
    from torchvision import models

    root = imagenet_tree(tmp_path / "imagenet")
    onnx_path = str(tmp_path / "rn152.onnx")
    caplog.set_level(logging.INFO, logger="kdkit")
    # -- the README's code ----------------------------------------------------------------
    teacher = tiny_teacher()  # substitute these with any other models you write
    student = models.resnet18(num_classes=2)

    dl.exportonnx(teacher, onnx_path, bsize=1, hw=[32, 32])
    del teacher  # free up CPU or GPU memory used by teacher pytorch model

    dm = dl.ImageNetManager(root, size=[32, 32], bsize=4, workers=0)

    opt_params = {
        "optimizer": torch.optim.AdamW,
        "okwargs": {"lr": 1e-4, "weight_decay": 0.05},
        "scheduler": torch.optim.lr_scheduler.CosineAnnealingWarmRestarts,
        "skwargs": {"T_0": 10, "T_mult": 2},
        "amplevel": None,
    }
    trainer = dl.StudentTrainer(
        student,
        dm,
        onnx_path,
        opt_params=opt_params,
        student_spec={"model": "torchvision:resnet18", "kwargs": {"num_classes": 2}},
        progress=False,
    )
    trainer.train(epochs=2, save=str(tmp_path / "dltest_{}.pth"))
    # -- what kdkit adds ---------------------------------------------------------------------
    assert "runs on ONNX Runtime: the device is cpu" in caplog.text  # which backend, and why
    saved = tmp_path / "dltest_1.pth"
    assert (tmp_path / "dltest_0.pth").is_file() and saved.is_file()
    # each epoch holds the student; the optimizer state is in last.pt only (not 2x per epoch)
    epoch_file = torch.load(saved, weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "optimizer" not in epoch_file and "rng" not in epoch_file and last["optimizer"]
    assert saved.stat().st_size < 0.6 * (tmp_path / "last.pt").stat().st_size
    module, meta = kdkit.load_model(saved)  # a kdkit checkpoint, not a bare state dict
    assert meta["epoch"] == 2 and list(meta["input_shape"]) == [3, 32, 32]
    x = torch.randn(2, 3, 32, 32)
    trained = trainer.student().eval()
    assert torch.allclose(module(x), trained(x), atol=1e-6)
    assert isinstance(kdkit.make_teacher(saved), TorchTeacher)  # the next run's teacher
    assert cli_main(["export", str(saved), "--onnx", str(tmp_path / "student.onnx")]) == 0


def test_wild_folder_trains_without_labels(tmp_path, one_thread):
    wild = tmp_path / "wild"
    (wild / "batch1").mkdir(parents=True)
    for i in range(6):
        _image(wild / ("batch1" if i % 2 else "") / f"img{i}.jpg", i)
    dm = dl.ImageNetManager(wild, size=[16, 16], bsize=4, workers=0)
    assert isinstance(dm, dl.UnlabeledImageManager) and dm.val_loader is None
    student = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    trainer = dl.StudentTrainer(student, dm, tiny_teacher(), progress=False)
    history = trainer.train(epochs=1, save=None)
    assert "loss_output" in history[0] and "loss_student" not in history[0]


def test_labels_false_ignores_the_labels(one_thread):
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g),
                        torch.randint(0, 2, (16,), generator=g))  # fmt: skip
    student = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    trainer = dl.StudentTrainer(student, FastLoader(data, 8), teacher, labels=False, progress=False)
    history = trainer.train(epochs=1, save=None)
    assert "loss_student" not in history[0]
    # with no labels and no balancer weights, the loss is the distillation loss at weight 1
    assert history[0]["loss_total"] == pytest.approx(history[0]["loss_output"])


def test_apex_amp_levels_map_to_autocast_and_say_so_once(caplog):
    caplog.set_level(logging.INFO, logger="kdkit")
    dl._announced.clear()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dl.precision_for_amplevel("O1", cuda) == "fp16"
    assert dl.precision_for_amplevel("O2", cuda) == "fp16"
    assert dl.precision_for_amplevel("O1", cuda) == "fp16"
    assert dl.precision_for_amplevel("O1", cpu) == "bf16"  # fp16 autocast needs CUDA
    assert dl.precision_for_amplevel(None, cpu) == "fp32"
    assert caplog.text.count("amplevel 'O1'") == 2  # once for fp16 (CUDA), once for bf16
    with pytest.raises(KDError, match="amplevel"):
        dl.precision_for_amplevel("O4", cpu)


def test_onnx_teacher_backend_choice():
    backend, why = dl.onnx_backend(torch.device("cpu"))
    assert backend == "onnx" and "cpu" in why


@pytest.mark.gpu
def test_onnx_teacher_runs_on_tensorrt_when_it_imports(tmp_path):
    pytest.importorskip("tensorrt")
    backend, why = dl.onnx_backend(torch.device("cuda"))
    assert backend == "tensorrt" and "tensorrt" in why
    path = tmp_path / "t.onnx"
    dl.exportonnx(tiny_teacher(), path, hw=[32, 32])
    t = dl._teacher(str(path), torch.device("cuda"))
    assert type(t).__name__ == "TensorRTTeacher"
