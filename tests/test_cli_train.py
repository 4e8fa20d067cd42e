"""`kdkit train / eval / export / init` end to end, on a generated image tree (CPU, small)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kdkit.cli import main
from kdkit.load import load_checkpoint

HERE = Path(__file__).parent
CLASSES = ("cat", "dog", "fox")


def _image(rng: np.random.Generator, label: int) -> Image.Image:
    """40x48 noise tinted by class, so the classes are learnable in a few steps."""
    pixels = rng.integers(0, 120, (40, 48, 3))
    pixels[..., label] += 120
    return Image.fromarray(pixels.astype(np.uint8))


def make_tree(root: Path, n_train: int = 6, n_val: int = 3) -> Path:
    """data/{train,val}/<class>/*.jpg|png and data/wild/<nested>/*.jpg (unlabeled)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                ext = "jpg" if i % 2 else "png"
                _image(rng, label).save(folder / f"{i}.{ext}")
    wild = root / "wild" / "deeper"
    wild.mkdir(parents=True)
    for i in range(4):
        _image(rng, i % 3).save((root / "wild" if i < 2 else wild) / f"w{i}.jpg")
    (root / "wild" / ".DS_Store").write_bytes(b"\0junk")  # hidden: skipped
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = make_tree(tmp_path_factory.mktemp("images"))
    torch.manual_seed(0)
    import torchvision

    teacher = torchvision.models.resnet18(num_classes=3)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    return root


def config(root: Path, **train) -> dict:
    return {
        "name": "tiny",
        "teacher": {
            "model": "torchvision:resnet18",
            "kwargs": {"num_classes": 3},
            "weights": str(root / "teacher.pt"),
        },  # fmt: skip
        "student": {"model": "torchvision:mobilenet_v3_small", "kwargs": {"num_classes": 3}},
        "data": {
            "train": {"image_folder": str(root / "train")},
            "unlabeled": [str(root / "wild")],
            "val": {"image_folder": str(root / "val")},
            "image_size": 32,
            "batch_size": 8,
            "workers": 0,
            "views": {"crop": "resized", "flip": True},
        },
        "distill": {"pairs": [{"loss": "soft_kl", "args": {"temperature": 2}}]},
        "train": {
            "epochs": 2,
            "optimizer": {"name": "SGD", "lr": 0.05, "args": {"momentum": 0.9}},
            "device": "cpu",
            "progress": False,
            **train,
        },  # fmt: skip
    }


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_eval_export_end_to_end(tree, tmp_path, capsys):
    cfg = write(tmp_path / "kd.yaml", config(tree))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.csv", "last.pt", "best.pt", "report.md", "curves.png"} <= names
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["versions"]["torch"] == str(torch.__version__) and "kdkit" in saved["versions"]
    assert Path(saved["data"]["train"]["image_folder"]).is_absolute()
    best = load_checkpoint(run / "best.pt")
    assert best["teacher_spec"]["model"] == "torchvision:resnet18"
    assert best["student_spec"]["model"] == "torchvision:mobilenet_v3_small"
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + 2 epochs
    assert "teacher `torchvision:resnet18`" in (run / "report.md").read_text()
    capsys.readouterr()

    assert main(["eval", str(run), "--json", "--teacher"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["student"]["top1"] == best["best_score"]  # the same number, not just close
    assert scores["student"]["loss"] == best["history"][-1]["val_loss"]  # best.pt's own epoch
    assert scores["student"]["images"] == 9 and "teacher" in scores

    onnx = tmp_path / "student.onnx"
    assert main(["export", str(run), "--onnx", str(onnx)]) == 0
    assert onnx.stat().st_size > 0 and "max abs diff" in capsys.readouterr().out
    bench = ["bench", str(run), "--batch-sizes", "2", "--repeats", "1", "--backends", "eager"]
    assert main([*bench, "--out", str(tmp_path / "bench")]) == 0  # both models from the run
    assert (tmp_path / "bench" / "bench.md").exists()


def test_print_config_and_resume_refuses_other_config(tree, tmp_path, capsys):
    cfg = write(tmp_path / "kd.yaml", config(tree, epochs=1))
    run = tmp_path / "run"
    argv = ["train", str(cfg), "--run-dir", str(run)]
    assert main([*argv, "--print-config", "--set", "distill.pairs.0.args.temperature=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["distill"]["pairs"][0]["args"]["temperature"] == 3
    assert not run.exists()  # --print-config writes nothing
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--set", "train.optimizer.lr=0.1", "--set", "train.progress=true",
                 "--resume"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "train.optimizer.lr" in err and "0.05 -> 0.1" in err
    assert "progress" not in err  # a progress bar does not change the run
    assert main(argv) == 2  # a finished run is not overwritten
    assert "already holds a run" in capsys.readouterr().err


def _train_in_process(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed job runs single-threaded: same arithmetic
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def test_sigkill_then_resume_gives_the_same_weights(tree, tmp_path):
    cfg = write(tmp_path / "kd.yaml", config(tree, checkpoint_every=2))
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _train_in_process(["train", str(cfg), "--run-dir", str(ref)]) == 0
    job = [sys.executable, str(HERE / "_train_kill_job.py"), "5", "train", str(cfg)]
    # PYTHONPATH: the kdkit under test (python SCRIPT puts tests/ first on sys.path, not the repo)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    killed = subprocess.run([*job, "--run-dir", str(run)], env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == 4 and state["epoch"] == 1  # 3 steps per epoch: mid-epoch 2
    assert _train_in_process(["train", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["step"] == b["step"] == 6
    for key, value in a["student"].items():
        assert torch.equal(value, b["student"][key]), key  # bitwise on CPU
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3


def test_labeled_without_teacher_trains_on_those_images_alone(tree, tmp_path, caplog):
    """``teacher: null`` + ``data.labeled: N``: the scratch baseline of a KD config, on the
    same N labeled images, not on every image with the rest's labels hidden."""
    raw = config(tree, epochs=1)
    raw["teacher"] = None
    del raw["data"]["unlabeled"]
    raw["data"]["labeled"] = 4
    cfg = write(tmp_path / "scratch.yaml", raw)
    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="kdkit.run.data"):
        assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    assert "data: 4 training images (4 labeled)" in caplog.text
    assert load_checkpoint(run / "last.pt")["step"] == 1  # one batch of 8: 4 images, not 18
    from kdkit.config import load_config
    from kdkit.run.data import build_data

    kd = config(tree)  # the same data section with a teacher: its 4 labeled images are those
    kd["data"]["labeled"] = 4
    kd_rows = build_data(load_config(data=kd).data, seed=0).train_loader.dataset.samples
    scratch = build_data(load_config(data=raw).data, seed=0, keep_unlabeled=False)
    assert scratch.train_loader.dataset.samples == [s for s in kd_rows if s[1] >= 0]


def test_init_writes_a_template_that_validates(tmp_path, capsys):
    out = tmp_path / "my.yaml"
    assert main(["init", "fmnist_kd", "-o", str(out)]) == 0
    assert out.read_text().startswith("#")  # comments kept
    assert main(["init", "fmnist_kd", "-o", str(out)]) == 2  # no silent overwrite
    assert main(["init", "fmnist_kdd"]) == 2
    assert "did you mean 'fmnist_kd'" in capsys.readouterr().err
    assert (
        main(["train", str(out), "--print-config", "--set", "teacher.model=kdkit:fmnist_teacher"])
        == 0
    )


def test_folder_data_split_labeled_and_unlabeled(tree):
    from kdkit.config import load_config
    from kdkit.run.data import build_data

    raw = config(tree)
    raw["data"].update(val={"split": 0.34}, labeled=4)
    data = build_data(load_config(data=raw).data, seed=0)
    train, val = data.train_loader.dataset, data.val_loader.dataset
    assert len(val) == 6 and len(train) == 12 + 4  # 2 of 6 per class carved; 4 wild images
    labels = [y for _, y in train.samples]
    assert sum(y >= 0 for y in labels) == 4 and labels[-4:] == [-1] * 4
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    assert all(".DS_Store" not in str(p) for p, _ in train.samples)
    assert data.input_shape == (3, 32, 32) and data.classes == list(CLASSES)
