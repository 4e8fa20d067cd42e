"""``kdkit demo``: the Jetson tutorial's experiment on Fashion-MNIST, on a CPU, as configs.

1. train a ResNet-style teacher on all 60k labels (or reuse the one cached under
   ``~/.cache/kdkit/demo`` by an earlier run with the same recipe: fingerprinted);
2. train a small student from scratch on 1,000 labels;
3. train the same student supervised on all 60,000 labels, for as many epochs as step 4: the
   row that says whether distillation beat simply labelling everything;
4. distill the same student on the same 1,000 labels + the 59,000 other images unlabeled
   (function matching: the teacher sees exactly the student's augmented view);
5. report test accuracy, parameters, CPU latency and throughput, as Markdown and a plot.

Every row is a ``task: classify`` config run through the same front door as ``kdkit train``
(:func:`kdkit.run.train_run`, as ``kdkit demo lm`` runs its rows), into ``OUT/teacher``,
``OUT/scratch``, ``OUT/supervised`` and ``OUT/kd``: each row's ``config.yaml`` reruns it with
``kdkit train CONFIG --run-dir NEW``. The rows share one recipe (AdamW, OneCycleLR stepped per
batch, pad-2 crop + flip views, the test split as val) and differ only in data, teacher and
epochs. The report gives each row's last epoch: val is the test split here, so no epoch is
chosen on it. Hyper-parameters are fixed, not tuned on the test set (see benchmarks/ for the
validation-split sweeps that chose them).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from kdkit._io import atomic_write_json, check_output_path, sha256_bytes
from kdkit.errors import KDError
from kdkit.run.recipes.base import RunResult

__all__ = [
    "INPUT_SHAPE",
    "ROWS",
    "STUDENT_SPEC",
    "TEACHER_SPEC",
    "DemoConfig",
    "DemoRow",
    "demo_teacher",
    "demo_views",
    "row_config",
    "run_demo",
    "spec_state",
    "teacher_files",
    "teacher_recipe_fingerprint",
]

log = logging.getLogger(__name__)

#: 2: the teacher is a ``kdkit train`` run (its run directory cached beside its checkpoint)
RECIPE_VERSION = 2
INPUT_SHAPE = (1, 28, 28)
TEACHER_SPEC = {"model": "kdkit:fmnist_teacher", "kwargs": {}}
STUDENT_SPEC = {"model": "kdkit:fmnist_student", "kwargs": {}}
#: the run directories under the demo's out_dir, one per row of the report
ROWS = ("teacher", "scratch", "supervised", "kd")


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


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


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
    #: the teacher is cached under CACHE_DIR/demo (``$XDG_CACHE_HOME/kdkit``, else ~/.cache/kdkit)
    cache_dir: str = field(default_factory=lambda: str(_user_cache() / "kdkit"))
    retrain: bool = False
    progress: bool = True
    #: the KD row's ``teacher.backend``. "onnx": ONNX Runtime fp32 (2-2.4x eager PyTorch on this
    #: CPU, see docs/benchmarks.md: darklight's idea of an accelerated teacher; PyTorch, with a
    #: warning, when onnxruntime is missing). Not "auto", kdkit train's default: there the int8
    #: teacher is a candidate too (calibrated on training images), 1.6x faster than fp32 ORT
    #: here but with other soft targets: KD 90.10% against 90.29% (seed 0), and the report's
    #: teacher row would not be the teacher the student learned from. "torch": eager.
    teacher_backend: str = "onnx"
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
class DemoRow:
    """One line of the report: a finished run, what it is called and trained on, and its last
    weights (the report times them)."""

    name: str
    data: str
    run: RunResult
    model: nn.Module = field(repr=False)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.run.history

    @property
    def test_top1(self) -> float:
        """The last epoch's top-1 on the test split (the demo's val: no epoch is chosen on it)."""
        return self.run.history[-1]["val_top1"]


def _views(cfg: DemoConfig) -> dict[str, Any] | None:
    return {"crop": "pad", "pad": 2, "flip": True} if cfg.augment else None


def demo_views(cfg: DemoConfig, size: int = 28):
    """The demo's views (pad-2 shifts and flips) through ``kdkit train``'s one builder."""
    from kdkit.config import ViewsConfig
    from kdkit.run.data import build_views

    views = _views(cfg)
    return None if views is None else build_views(ViewsConfig(**views), cfg.seed, size)


def row_config(
    cfg: DemoConfig,
    name: str,
    run_dir: str | Path,
    *,
    epochs: int,
    model: str = STUDENT_SPEC["model"],
    labeled: int | None = None,
    teacher: str | Path | None = None,
) -> dict[str, Any]:
    """One row of the demo as ``kdkit train`` config data (its run's ``config.yaml``, less
    what kdkit fills in): the demo's recipe, on ``labeled`` labels of Fashion-MNIST's training
    split (all of them when None), distilled from ``teacher`` (a checkpoint) when given."""
    data: dict[str, Any] = {
        "train": {"fashion_mnist": "train"},
        "val": {"fashion_mnist": "test"},  # the demo reports test accuracy
        "batch_size": cfg.batch_size,
        "val_batch_size": 1000,
        "views": _views(cfg),
        "seed": cfg.seed,  # which labels data.labeled keeps
    }
    if labeled is not None:
        data["labeled"] = labeled  # without a teacher: those images alone
    row: dict[str, Any] = {"task": "classify", "name": f"demo-{name}"}
    if teacher is not None:
        row["teacher"] = {"model": str(teacher), "backend": _backend(cfg.teacher_backend)}
        row["distill"] = {"pairs": [{"loss": "soft_kl", "args": {"temperature": cfg.temperature}}]}
    return {
        **row,
        "student": {"model": model},
        "data": data,
        "train": {
            "epochs": epochs,
            "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            "scheduler": {"name": "OneCycleLR", "interval": "step"},  # max_lr = lr
            "seed": cfg.seed,
            "device": "cpu",
            "channels_last": cfg.channels_last,
            "progress": cfg.progress,
        },
        "run_dir": str(Path(run_dir).resolve()),
    }


def _backend(wanted: str) -> str:
    if wanted == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        log.warning("teacher: onnxruntime is not installed (pip install 'kdkit[onnx]'); "
                    "running it in PyTorch instead")  # fmt: skip
        return "torch"
    return wanted


def _teacher_row(cfg: DemoConfig, run_dir: str | Path) -> dict[str, Any]:
    return row_config(
        cfg, "teacher", run_dir, epochs=cfg.teacher_epochs, model=TEACHER_SPEC["model"]
    )


def teacher_recipe_fingerprint(cfg: DemoConfig, data_fp: str) -> str:
    """The cache key of the demo's teacher: its config (less where it runs and whether it
    prints) and the fingerprint of the training data it reads."""
    recipe = _teacher_row(cfg, ".")
    recipe.pop("run_dir")
    recipe["train"].pop("progress")
    payload = {"version": RECIPE_VERSION, "config": recipe, "data": data_fp}
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())[:16]


def _train(data: dict[str, Any], *, resume: bool = False) -> RunResult:
    """A row's config data, resolved and validated once, through kdkit train's front door."""
    from kdkit.config import parse_config, resolve_paths, validate
    from kdkit.run import train_run

    return train_run(validate(resolve_paths(parse_config(data=data))), resume=resume)


def _last_weights(run: RunResult) -> nn.Module:
    """The student a run ended with (``last.pt``: the report and ``student.pt`` take the last
    epoch, as the table does)."""
    from kdkit.load import load_model

    return load_model(Path(run.run_dir) / "last.pt", role="student")[0]


def teacher_files(cfg: DemoConfig) -> tuple[Path, Path]:
    """Where the demo's teacher is cached: ``CACHE/demo/teacher-FP.pt`` and the run directory
    ``CACHE/demo/teacher-FP``, FP its :func:`teacher_recipe_fingerprint`."""
    from kdkit.data import load_fashion_mnist

    fp = teacher_recipe_fingerprint(cfg, load_fashion_mnist("train").fingerprint())
    root = Path(cfg.cache_dir) / "demo"
    return root / f"teacher-{fp}.pt", root / f"teacher-{fp}"


def demo_teacher(cfg: DemoConfig) -> DemoRow:
    """The demo's teacher, trained once into ``CACHE/demo/teacher-FP`` (a run directory; a run
    killed there continues on the next call) beside ``teacher-FP.pt`` (its last weights, test
    top-1 and history, written last), or reused from there; ``cfg.retrain`` trains it again."""
    from kdkit.data import load_fashion_mnist
    from kdkit.load import load_model, save_checkpoint

    train = load_fashion_mnist("train")
    checkpoint, run_dir = teacher_files(cfg)
    if cfg.retrain or not (checkpoint.is_file() and (run_dir / "config.yaml").is_file()):
        checkpoint.unlink(missing_ok=True)
        if cfg.retrain and run_dir.exists():
            shutil.rmtree(run_dir)
        resume = (run_dir / "config.yaml").is_file()  # a killed run: continue it
        log.info("teacher: training %d epochs on %d labels", cfg.teacher_epochs, len(train))
        run = _train(_teacher_row(cfg, run_dir), resume=resume)
        top1 = run.history[-1]["val_top1"]
        state = spec_state(_last_weights(run), TEACHER_SPEC, "teacher", test_top1=top1)
        save_checkpoint(checkpoint, {**state, "history": run.history})
    model, meta = load_model(checkpoint, role="teacher")
    log.info("teacher: %s (test top-1 %.2f%%)", checkpoint, meta["test_top1"])
    history = list(meta["history"])
    run = RunResult(run_dir, history, max(h["val_top1"] for h in history), None)
    return DemoRow("teacher", f"{len(train):,} labels", run, model)


def _fresh_row_dir(path: Path) -> Path:
    """``path`` emptied for a row: removed when it is one of the demo's run directories (its
    ``config.yaml`` names it ``demo-ROW``), refused when it holds anything else."""
    from kdkit.config import read_yaml

    if path.exists():
        config = path / "config.yaml"
        raw = read_yaml(config) if config.is_file() else None
        name = raw.get("name") if isinstance(raw, dict) else None
        if name != f"demo-{path.name}" and (not path.is_dir() or any(path.iterdir())):
            raise KDError(
                f"{path} exists and is not a run directory of kdkit demo; move it away or "
                "pass another --out"
            )
        shutil.rmtree(path)
    return path


def run_demo(cfg: DemoConfig) -> Path:
    """Run the whole demo; returns the path of the Markdown report."""
    import torch

    from kdkit.data import load_fashion_mnist
    from kdkit.load import save_checkpoint
    from kdkit.report import write_report
    from kdkit.train.rundir import LOCK_NAME

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = check_output_path(cfg.out_dir, what="the demo's out_dir", directory=True)
    check_output_path(cfg.cache_dir, what="the demo's cache_dir", directory=True)
    n_train = len(load_fashion_mnist("train"))
    if cfg.n_labeled > n_train:
        raise KDError(f"n_labeled is {cfg.n_labeled} but the training set has {n_train} images")
    for name in ROWS:  # before any work: a folder the demo does not own stops it here
        _fresh_row_dir(out / name)
    teacher = demo_teacher(cfg)
    shutil.copytree(  # the teacher's row beside the others (its config.yaml names the cache)
        teacher.run.run_dir, out / "teacher", ignore=shutil.ignore_patterns(LOCK_NAME)
    )
    teacher.run = replace(teacher.run, run_dir=out / "teacher")
    n_lab, n_unl = cfg.n_labeled, n_train - cfg.n_labeled
    teacher_file, _ = teacher_files(cfg)
    rows = [teacher]
    for name, label, data, extra in (
        ("scratch", "student, scratch", f"{n_lab:,} labels",
         {"epochs": cfg.scratch_epochs, "labeled": n_lab}),
        # the same schedule as KD's, every label: the honest upper row
        ("supervised", "student, supervised", f"{n_train:,} labels",
         {"epochs": cfg.kd_epochs}),
        ("kd", "student, KD", f"{n_lab:,} labels + {n_unl:,} unlabeled",
         {"epochs": cfg.kd_epochs, "labeled": n_lab, "teacher": teacher_file}),
    ):  # fmt: skip
        log.info("%s: %d epochs on %s", label, extra["epochs"], data)
        run = _train(row_config(cfg, name, out / name, **extra))
        rows.append(DemoRow(label, data, run, _last_weights(run)))
    kd = rows[-1]
    atomic_write_json(out / "config.json", asdict(cfg))
    save_checkpoint(out / "student.pt", spec_state(kd.model, STUDENT_SPEC, test_top1=kd.test_top1))
    save_checkpoint(out / "teacher.pt", spec_state(teacher.model, TEACHER_SPEC, role="teacher"))
    again = f"kdkit train {out / 'kd' / 'config.yaml'} --run-dir runs/kd-again"
    rerun = (
        f"Each row is a `kdkit train` run directory ({', '.join(ROWS)} under {out}); rerun one "
        f"with its config:\n\n    {again}\n"
    )
    return write_report(rows, out, notes=[rerun])
