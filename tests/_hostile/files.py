"""What the rows start from: model files and caches built once a session (:class:`Files`),
and each room's own folder (:class:`Fx`, the ``hostile`` fixture of tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.errors import KDError

from .lm import LMFiles, build_lm_files
from .make import (
    MEAN,
    SIZE,
    STD,
    STUDENT,
    dataset,
    image_tree,
    run_config,
    student,
    teacher_weights,
    write_yaml,
)
from .rows import WorkStarted

PWN = ["sh", "-c", "id > PWNED"]  # a spec that runs this writes PWNED in the cwd


@dataclass
class Files:
    """Model files, caches and a dataset, built once a session (read only: a row that
    changes one works on a copy, :func:`work_copy`)."""

    ckpt: Path  # the student's best.pt
    teacher_ckpt: Path  # the same weights saved with role "teacher"
    legacy_ckpt: Path  # format version 1
    pwned: Path  # a legacy spec naming subprocess:call
    pwned_python: Path  # a python: spec naming subprocess:call
    markdown: Path  # README.pt, a text file
    onnx: Path
    truncated_onnx: Path
    corrupt_onnx: Path
    a_file: Path  # a file where a directory is wanted
    cache: Path  # a teacher cache of `dataset` (fp32 logits)
    cache_topk: Path
    weights_only: Path  # a plain state dict
    dataset: Any
    teacher_net: nn.Module


@dataclass
class Fx(Files):
    """One room's fixture: the session's :class:`Files` and a folder of its own."""

    root: Path  # this room's folder, the working directory while its rows run
    tree: Path  # root/images: an image_tree
    weights: Path  # teacher weights for run_config
    cfg: Path  # run_config(tree, weights)
    hung: set = field(default_factory=set)

    @functools.cached_property
    def run(self) -> Path:
        """A finished ``kdkit train`` run of ``cfg`` (trained on first use; copy it to change
        it)."""
        from kdkit.cli import main

        run = self.root / "run"
        assert main(["train", str(self.cfg), "--run-dir", str(run)]) == 0
        return run

    @functools.cached_property
    def lm(self) -> LMFiles:
        """The ``task: lm`` files of this room (built on first use)."""
        return build_lm_files(self.root / "lmfiles")


def build_files(root: Path) -> Files:
    from kdkit.cache import precompute
    from kdkit.export import export_onnx
    from kdkit.load import save_checkpoint

    model = student()
    sd = model.state_dict()
    shape = [1, SIZE, SIZE]
    ckpt = save_checkpoint(
        root / "best.pt", {"student": sd, "student_spec": STUDENT, "input_shape": shape}
    )
    teacher_spec = {"model": "kdkit:fmnist_student", "kwargs": {}}
    teacher_ckpt = save_checkpoint(root / "teacher.pt", {
        "role": "teacher", "teacher": sd, "teacher_spec": teacher_spec, "input_shape": shape,
    })  # fmt: skip
    legacy = {"format": "kdkit-checkpoint", "version": 1, "student": sd, "student_spec": STUDENT}
    torch.save({**legacy, "input_shape": shape}, root / "legacy.pt")
    pwned_spec = {"factory": "subprocess:call", "kwargs": {"args": PWN}}
    pwned = save_checkpoint(root / "pwned.pt", {"student": sd, "student_spec": pwned_spec,
                                                "input_shape": shape})  # fmt: skip
    pwned_python = save_checkpoint(
        root / "pwned_python.pt",
        {"student": sd, "student_spec": {"model": "python:subprocess:call", "kwargs": {"args": PWN}},
         "input_shape": shape},
    )  # fmt: skip
    markdown = root / "README.pt"
    markdown.write_text("# my model\n\nTrained for 3 epochs.\n")
    onnx = root / "student.onnx"
    export_onnx(model, onnx, (1, SIZE, SIZE))
    data = onnx.read_bytes()
    (root / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (root / "corrupt.onnx").write_bytes(os.urandom(4096))
    a_file = root / "a_file"
    a_file.write_text("not a directory")
    images = dataset()
    teacher_net = student()
    cache = precompute(teacher_net, images, root / "cache", shard_size=8, progress=False,
                       mean=MEAN, std=STD, dtype="fp32")  # fmt: skip
    cache_topk = precompute(teacher_net, images, root / "cache_topk", shard_size=8, topk=3,
                            progress=False, mean=MEAN, std=STD)  # fmt: skip
    weights_only = root / "weights.pt"
    torch.save(sd, weights_only)
    return Files(
        ckpt, teacher_ckpt, root / "legacy.pt", pwned, pwned_python, markdown, onnx,
        root / "truncated.onnx", root / "corrupt.onnx", a_file, cache, cache_topk, weights_only,
        images, teacher_net,
    )  # fmt: skip


def room(files: Files, root: Path) -> Fx:
    """A room's :class:`Fx` in ``root``: an image tree, teacher weights and a config."""
    tree = image_tree(root / "images")
    weights = teacher_weights(root / "teacher.pt")
    cfg = write_yaml(root / "kd.yaml", run_config(tree, weights))
    shared = {f.name: getattr(files, f.name) for f in dataclasses.fields(Files)}
    return Fx(**shared, root=root, tree=tree, weights=weights, cfg=cfg)


def fake_load_data(spec: str):
    """``kdkit precompute``'s and ``cache check``'s dataset: 20 images, no download."""
    name = spec.partition(":")[0]
    if name != "fashion-mnist":
        raise KDError(f"unknown dataset {name!r}; available: ['fashion-mnist']")
    return dataset(), MEAN, STD


def work_started(*args, **kwargs):
    raise WorkStarted


def work_copy(fx: Fx, src: Path, name: str) -> Path:
    """A copy of ``src`` (a file or a folder) at ``root/work/name``."""
    dst = fx.root / "work" / name
    dst.parent.mkdir(exist_ok=True)
    if src.is_dir():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def flipped(fx: Fx) -> Path:
    """The student's checkpoint with the top exponent bit of 100 float32 weights flipped, its
    other fields (and its checksum) kept."""
    dst = fx.root / "work" / "flipped.pt"
    dst.parent.mkdir(exist_ok=True)
    state = torch.load(fx.ckpt, weights_only=True)
    weight = state["student"]["fc.weight"] if "fc.weight" in state["student"] else None
    if weight is None:
        weight = next(v for v in state["student"].values() if v.is_floating_point())
    bits = weight.view(torch.int32).reshape(-1)
    bits[:100] ^= 1 << 30
    torch.save(state, dst)
    return dst


def resaved(fx: Fx, name: str, **changes) -> Path:
    """A well-formed checkpoint (valid checksum) with changed contents."""
    from kdkit.load import save_checkpoint

    state = {"student": student().state_dict(), "student_spec": STUDENT,
             "input_shape": [1, SIZE, SIZE], **changes}  # fmt: skip
    return save_checkpoint(fx.root / "work" / name, state)
