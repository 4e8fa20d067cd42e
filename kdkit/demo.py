"""``kdkit demo``: the Jetson tutorial's experiment on Fashion-MNIST, on a CPU.

1. train a ResNet-style teacher on all 60k labels (or reuse the one cached under
   ``~/.cache/kdkit`` by an earlier run with the same recipe: fingerprinted);
2. train a small student from scratch on 1,000 labels;
3. train the same student supervised on all 60,000 labels, for as many epochs as step 4: the
   row that says whether distillation beat simply labelling everything;
4. distill the same student on the same 1,000 labels + the 59,000 other images unlabeled
   (function matching: the teacher sees exactly the student's augmented view);
5. report test accuracy, parameters, CPU latency and throughput, as Markdown and a plot.

Hyper-parameters are fixed here, not tuned on the test set (see benchmarks/ for the
validation-split sweeps that chose them).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit._io import atomic_write_json, check_output_path, sha256_bytes
from kdkit.balance import LossBalancer
from kdkit.distiller import Distiller
from kdkit.errors import KDError
from kdkit.teachers.base import Teacher
from kdkit.train.checkpoint import load_checkpoint, save_checkpoint
from kdkit.train.trainer import Trainer

__all__ = [
    "DemoConfig",
    "RunResult",
    "demo_teacher",
    "demo_views",
    "run_demo",
    "spec_state",
    "teacher_recipe_fingerprint",
    "train_model",
]

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
INPUT_SHAPE = (1, 28, 28)
TEACHER_SPEC = {"model": "kdkit:fmnist_teacher", "kwargs": {}}
STUDENT_SPEC = {"model": "kdkit:fmnist_student", "kwargs": {}}


def spec_state(
    model: nn.Module, spec: dict[str, Any], role: str = "student", **extra: Any
) -> dict[str, Any]:
    """A checkpoint payload that ``kdkit export`` / ``kdkit.load_model`` can rebuild; the
    weights sit under ``role`` ("student" or "teacher"), the spec under ``<role>_spec``."""
    return {
        "role": role,
        role: model.state_dict(),
        f"{role}_spec": spec,
        "input_shape": list(INPUT_SHAPE),
        **extra,
    }


@dataclass(frozen=True)
class DemoConfig:
    """Every knob of the demo; ``quick()`` is the ~3-minute variant."""

    teacher_epochs: int = 4
    scratch_epochs: int = 40
    kd_epochs: int = 6
    n_labeled: int = 1000
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    #: chosen on a 5k validation split carved from train (2 epochs of KD, 1k labels + 54k
    #: unlabeled): T=1 88.14%, T=2 87.98%, T=4 87.18%; never on the test set.
    temperature: float = 1.0
    seed: int = 0
    augment: bool = True
    out_dir: str = "runs/demo"
    cache_dir: str = str(Path.home() / ".cache" / "kdkit")
    retrain: bool = False
    progress: bool = True
    #: "auto" (kdkit train's default too) times eager PyTorch and ONNX Runtime on a batch and
    #: keeps the faster (ORT was 2-2.4x eager on this CPU, see docs/benchmarks.md: darklight's
    #: idea of an accelerated teacher); "onnx" / "torch" force one.
    teacher_backend: str = "auto"
    #: the student's memory format: "auto" (kdkit train's default) times its step both ways
    #: on the first batch; True / False force one
    channels_last: bool | str = "auto"

    def __post_init__(self) -> None:
        counts = {
            "teacher_epochs": self.teacher_epochs,
            "scratch_epochs": self.scratch_epochs,
            "kd_epochs": self.kd_epochs,
            "n_labeled": self.n_labeled,
            "batch_size": self.batch_size,
        }
        bad = {k: v for k, v in counts.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise KDError(f"demo options must be integers >= 1, got {bad}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise KDError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise KDError(f"lr must be a finite number > 0, got {self.lr}")
        if self.channels_last not in ("auto", True, False):
            raise KDError(
                f"channels_last must be 'auto', true or false, got {self.channels_last!r}"
            )
        if self.teacher_backend not in ("auto", "onnx", "torch"):
            raise KDError(
                f"teacher_backend must be 'auto', 'onnx' or 'torch', got {self.teacher_backend!r}"
            )

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        return cls(**{"teacher_epochs": 1, "scratch_epochs": 15, "kd_epochs": 1, **overrides})


@dataclass
class RunResult:
    """One trained model of the report."""

    name: str
    data: str
    model: nn.Module = field(repr=False)
    test_top1: float
    history: list[dict[str, Any]]
    train_time_s: float


def demo_views(cfg: DemoConfig, size: int = 28):
    """The demo's views (pad-2 shifts and flips) through ``kdkit train``'s one builder."""
    from kdkit.config import ViewsConfig
    from kdkit.run.data import build_views

    if not cfg.augment:
        return None
    return build_views(ViewsConfig(crop="pad", pad=2, flip=True), cfg.seed, size)


def train_model(
    model: nn.Module,
    train_set: Any,
    test_set: Any,
    epochs: int,
    cfg: DemoConfig,
    teacher: nn.Module | Teacher | None = None,
    checkpoint_dir: Path | None = None,
    criterion: nn.Module | None = None,
    spec: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Train ``model`` (supervised, or distilled from ``teacher``) with the demo's recipe.

    Returns the per-epoch history and the final test top-1. The same loop, optimizer and
    schedule serve every row of the report, so the comparison is only about the teacher.
    ``criterion`` defaults to Hinton soft targets at ``cfg.temperature``.
    """
    from kdkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FastLoader
    from kdkit.losses import SoftTargetKL

    if teacher is not None and criterion is None:
        criterion = SoftTargetKL(temperature=cfg.temperature)
    distiller = Distiller(model, teacher, criterion, LossBalancer())
    train_loader = FastLoader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed)
    test_loader = FastLoader(test_set, 1000, shuffle=False)
    steps = epochs * len(train_loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps)
    trainer = Trainer(
        distiller,
        train_loader,
        test_loader,
        channels_last=_channels_last(model, train_loader, cfg),
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_interval="step",
        epochs=epochs,
        seed=cfg.seed,
        views=demo_views(cfg),
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        device="cpu",
        checkpoint_dir=checkpoint_dir,
        progress=cfg.progress,
        student_spec=spec,
        input_shape=INPUT_SHAPE,
    )
    history = trainer.fit(resume="auto" if checkpoint_dir is not None else False)
    return history, history[-1]["val_top1"]


def _channels_last(model: nn.Module, loader: Any, cfg: DemoConfig) -> bool:
    """``cfg.channels_last``, with ``auto`` decided as ``kdkit train`` does: the student's
    step timed in both memory formats on the first batch (:mod:`kdkit.run.autotune`)."""
    if cfg.channels_last != "auto":
        return bool(cfg.channels_last)
    from kdkit.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from kdkit.data.pipeline import InputPipeline
    from kdkit.run.autotune import choose_channels_last, first_input

    pipeline = InputPipeline(demo_views(cfg), FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    x = first_input(loader, pipeline).x
    return bool(choose_channels_last(model, x, recorded=None).value)


def teacher_recipe_fingerprint(cfg: DemoConfig, data_fp: str) -> str:
    recipe = {
        "version": RECIPE_VERSION,
        "arch": "fmnist_teacher",
        "epochs": cfg.teacher_epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
        "augment": cfg.augment,
        "data": data_fp,
    }
    return sha256_bytes(json.dumps(recipe, sort_keys=True).encode())[:16]


def demo_teacher(cfg: DemoConfig, train_set: Any, test_set: Any) -> RunResult:
    """Train the teacher, or load it from the fingerprinted cache."""
    from kdkit.models import fmnist_teacher

    fp = teacher_recipe_fingerprint(cfg, train_set.fingerprint())
    cached = Path(cfg.cache_dir) / "demo" / f"teacher-{fp}.pt"
    model = fmnist_teacher()
    if cached.exists() and not cfg.retrain:
        state = load_checkpoint(cached)
        # role "teacher" since format version 2; older files kept the weights under "student"
        model.load_state_dict(state.get("teacher", state.get("student")))
        log.info("teacher: reusing %s (test top-1 %.2f%%)", cached, state["test_top1"])
        data = f"{len(train_set):,} labels"
        return RunResult("teacher", data, model, state["test_top1"], state["history"], 0.0)
    log.info("teacher: training %d epochs on %d labels", cfg.teacher_epochs, len(train_set))
    torch.manual_seed(cfg.seed)
    model = fmnist_teacher()
    start = time.perf_counter()
    run_dir = cached.with_suffix(".run")
    history, top1 = train_model(model, train_set, test_set, cfg.teacher_epochs, cfg, None, run_dir)
    elapsed = time.perf_counter() - start
    state = {"teacher": model.state_dict(), "test_top1": top1, "history": history}
    save_checkpoint(cached, state, role="teacher")
    return RunResult("teacher", f"{len(train_set):,} labels", model, top1, history, elapsed)


def _student(name: str, data: str, train_set, test_set, epochs, cfg, teacher=None) -> RunResult:
    from kdkit.models import fmnist_student

    log.info("%s: %d epochs on %s", name, epochs, data)
    torch.manual_seed(cfg.seed)
    model = fmnist_student()
    start = time.perf_counter()
    history, top1 = train_model(model, train_set, test_set, epochs, cfg, teacher)
    return RunResult(name, data, model, top1, history, time.perf_counter() - start)


def fast_teacher(model: nn.Module, cfg: DemoConfig) -> Teacher:
    """The trained teacher behind the fastest backend this machine has: ``auto`` times them
    on a batch of the demo's size (:mod:`kdkit.teachers.autotune`), ``onnx`` is ORT (else
    eager, with a warning), ``torch`` eager."""
    from kdkit.teachers import OnnxTeacher, TorchTeacher, make_teacher

    if cfg.teacher_backend == "auto":
        return make_teacher(
            model, backend="auto", input_shape=INPUT_SHAPE, batch_size=cfg.batch_size
        )
    if cfg.teacher_backend == "onnx":
        try:
            return OnnxTeacher(model, input_shape=INPUT_SHAPE)
        except KDError as err:  # onnxruntime not installed: say so, keep going
            log.warning("teacher: %s; running it in PyTorch instead", err)
    return TorchTeacher(model)


def run_demo(cfg: DemoConfig) -> Path:
    """Run the whole demo; returns the path of the Markdown report."""
    from kdkit.data import concat, load_fashion_mnist, split_labeled
    from kdkit.report import write_report

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = check_output_path(cfg.out_dir, what="the demo's out_dir", directory=True)
    check_output_path(cfg.cache_dir, what="the demo's cache_dir", directory=True)
    train_set, test_set = load_fashion_mnist("train"), load_fashion_mnist("test")
    teacher = demo_teacher(cfg, train_set, test_set)
    labeled, unlabeled = split_labeled(train_set, cfg.n_labeled, seed=cfg.seed)
    n_lab, n_unl = len(labeled), len(unlabeled)
    scratch = _student(
        "student, scratch", f"{n_lab:,} labels", labeled, test_set, cfg.scratch_epochs, cfg
    )
    supervised = _student(  # the same schedule as KD's, every label: the honest upper row
        "student, supervised", f"{len(train_set):,} labels", train_set, test_set, cfg.kd_epochs, cfg
    )
    kd = _student(
        "student, KD",
        f"{n_lab:,} labels + {n_unl:,} unlabeled",
        concat(labeled, unlabeled),
        test_set,
        cfg.kd_epochs,
        cfg,
        teacher=fast_teacher(teacher.model, cfg),
    )
    atomic_write_json(out / "config.json", asdict(cfg))
    save_checkpoint(out / "student.pt", spec_state(kd.model, STUDENT_SPEC, test_top1=kd.test_top1))
    save_checkpoint(out / "teacher.pt", spec_state(teacher.model, TEACHER_SPEC, role="teacher"))
    return write_report([teacher, scratch, supervised, kd], out)
