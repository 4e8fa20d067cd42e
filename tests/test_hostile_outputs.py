"""Hostile outputs (issue 23): nothing good is ever destroyed.

Outputs that are the command's inputs, outputs that are not regular files (FIFOs, device
nodes), run directories trained over without resume, and two runs in one run directory. Rows
and verdicts as in ``tests/test_hostile.py`` (see ``tests/_hostile_rows.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _hostile_rows import (
    Case,
    image_tree,
    judge_row,
    params,
    run_config,
    teacher_weights,
    write_tally,
    write_yaml,
)

import kdkit
from kdkit.data import ArrayDataset, FastLoader
from kdkit.errors import KDError

pytestmark = pytest.mark.usefixtures("one_thread")
VERDICTS: dict[str, str] = {}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Fx:
    root: Path
    tree: Path
    weights: Path
    run: Path  # a finished kdkit train run (do not modify: copy it)
    lm_config: Path | None


def _lm_config(root: Path) -> Path | None:
    """A ``task: lm`` config that validates (a config.json folder, a text file); the rows
    using it are refused before anything is built, so no weights are needed."""
    folder = root / "lm_student"
    folder.mkdir()
    tiny = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "vocab_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 32}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(tiny))  # tiny, should it ever be built
    (root / "lm.txt").write_text("hello world\n" * 20)
    cfg = {
        "task": "lm",
        "name": "lm",
        "student": {"model": f"hf-config:{folder}"},
        "data": {"text_files": [str(root / "lm.txt")]},
        "train": {"epochs": 1, "device": "cpu", "progress": False},
    }
    return write_yaml(root / "lm.yaml", cfg)


@pytest.fixture(scope="module")
def fx(tmp_path_factory, one_thread):
    from kdkit.cli import main

    root = tmp_path_factory.mktemp("hostile_outputs")
    tree = image_tree(root / "images")
    weights = teacher_weights(root / "teacher.pt")
    cfg = write_yaml(root / "kd.yaml", run_config(tree, weights))
    run = root / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    yield Fx(root, tree, weights, run, _lm_config(root))
    mp.undo()
    write_tally(VERDICTS)


def _copy_run(fx: Fx, name: str, drop: tuple[str, ...] = ()) -> Path:
    dst = fx.root / "work" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(fx.run, dst)
    for n in drop:
        (dst / n).unlink()
    return dst


def _intact(path_of) -> callable:
    """post: ``loss`` when the file named by ``path_of(fx)`` changed or vanished."""

    def post(fx: Fx) -> str | None:
        path = path_of(fx)
        ref = fx.run / path.name
        return None if path.is_file() and path.read_bytes() == ref.read_bytes() else "loss"

    return post


def _fifo(fx: Fx, name: str) -> Path:
    path = fx.root / "work" / name
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        os.mkfifo(path)
    return path


def _device_node(fx: Fx, name: str) -> Path:
    """A character device like /dev/null (1, 3), made here so the real one is never at risk."""
    path = fx.root / "work" / name
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def _still(kind, name: str):
    def post(fx: Fx) -> str | None:
        mode = os.lstat(fx.root / "work" / name).st_mode
        return None if kind(mode) else "loss"

    return post


_root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")


def _train_args(fx: Fx, run_dir: Path, *extra) -> list:
    cfg = write_yaml(fx.root / "work" / "kd.yaml", run_config(fx.tree, fx.weights))
    return ["train", cfg, "--run-dir", run_dir, *extra]


# -- the library: Trainer(checkpoint_dir=...) ----------------------------------------------
def _blobs():
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(
        torch.randint(0, 255, (16, 1, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 2, (16,), generator=g),
    )


def _trainer(checkpoint_dir, **kw):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    return kdkit.Trainer(
        kdkit.Distiller(net, None),
        FastLoader(_blobs(), 8, seed=0),
        epochs=kw.pop("epochs", 1),
        checkpoint_dir=checkpoint_dir,
        device="cpu",
        progress=False,
        **kw,
    )


def _trainer_over_run(fx: Fx, keep: str) -> None:
    d = fx.root / "work" / f"lib_{keep}"
    shutil.rmtree(d, ignore_errors=True)
    _trainer(d).fit()
    shutil.copy(d / "last.pt", d / "best.pt")  # no val_loader: no best.pt of its own
    for name in ("last.pt", "best.pt", "metrics.csv"):
        if name != keep and (d / name).exists():
            (d / name).unlink()
    _trainer(d).fit()


def _trainer_resume_continues(fx: Fx) -> bool:
    d = fx.root / "work" / "lib_resume"
    shutil.rmtree(d, ignore_errors=True)
    _trainer(d).fit()
    t = _trainer(d, epochs=2)
    t.fit(resume=True)
    return t.epoch == 2 and len(t.history) == 2


class _Holder:
    """Another process holding a run directory's lock (kdkit's own lock, taken there)."""

    def __init__(self, directory: Path) -> None:
        code = (  # the protocol of kdkit.train.rundir.run_lock, spelled out
            "import fcntl, os, sys, time\n"
            "fd = os.open(os.path.join(sys.argv[1], '.kdkit.lock'), os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n"
        )
        directory.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, env=env
        )
        assert self.proc.stdout.readline().strip() == b"locked"

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: the OS drops the flock
        self.proc.wait()


def _locked_dir(fx: Fx, name: str, run: bool = True) -> Path:
    d = _copy_run(fx, name) if run else fx.root / "work" / name
    d.mkdir(parents=True, exist_ok=True)
    fx.__dict__.setdefault("holders", []).append(_Holder(d))
    return d


def _release(fx: Fx) -> str | None:
    for holder in fx.__dict__.pop("holders", []):
        holder.kill()
    return None


def _trainer_in_locked_dir(fx: Fx) -> None:
    d = _locked_dir(fx, "lib_locked", run=False)
    _trainer(d).fit()


def _lock_freed_by_kill9(fx: Fx) -> bool:
    d = fx.root / "work" / "lib_kill9"
    holder = _Holder(d)
    with pytest.raises(KDError, match="in use by process"):
        _trainer(d).fit()
    holder.kill()
    _trainer(d).fit()
    return (d / "last.pt").is_file()


def _atomic_write_to(fx: Fx, make) -> None:
    from kdkit._io import atomic_write_text

    atomic_write_text(make(fx), "x")


def _save_checkpoint_to_fifo(fx: Fx) -> None:
    from kdkit.load import save_checkpoint

    save_checkpoint(_fifo(fx, "ckpt_fifo.pt"), {"student": {}})


CASES: list[Case] = [
    # outputs that are inputs
    Case("export-onnx-over-its-own-checkpoint", lambda fx: ["export", _copy_run(fx, "e1") / "best.pt", "--onnx", fx.root / "work" / "e1" / "best.pt"],
         "one of this command's inputs", cli=True, post=_intact(lambda fx: fx.root / "work" / "e1" / "best.pt")),
    Case("export-onnx-over-run-last-pt", lambda fx: ["export", _copy_run(fx, "e2"), "--onnx", fx.root / "work" / "e2" / "last.pt"],
         "one of this command's inputs", cli=True, post=_intact(lambda fx: fx.root / "work" / "e2" / "last.pt")),
    Case("export-onnx-over-run-config", lambda fx: ["export", _copy_run(fx, "e3") / "best.pt", "--onnx", fx.root / "work" / "e3" / "config.yaml"],
         "one of this command's inputs", cli=True, post=_intact(lambda fx: fx.root / "work" / "e3" / "config.yaml")),
    Case("export-hf-into-the-run-dir", lambda fx: ["export", _copy_run(fx, "e4"), "--hf", fx.root / "work" / "e4"],
         "one of this command's inputs", cli=True),
    Case("precompute-out-is-the-teacher", lambda fx: ["precompute", "--teacher", fx.run, "--out", fx.run, "--device", "cpu"],
         "one of this command's inputs|is an existing file", cli=True, post=_intact(lambda fx: fx.run / "best.pt")),
    Case("train-resume-teacher-is-the-runs-best-pt", lambda fx: _train_teacher_in_run(fx), "input of this run", cli=True,
         post=_intact(lambda fx: fx.root / "work" / "t_in" / "best.pt")),
    # outputs that are not regular files
    Case("export-onnx-is-a-fifo", lambda fx: ["export", fx.run, "--onnx", _fifo(fx, "out.onnx")], "FIFO", cli=True,
         post=_still(stat.S_ISFIFO, "out.onnx")),
    Case("export-onnx-is-a-device-node", lambda fx: ["export", fx.run, "--onnx", _device_node(fx, "null.onnx")], "device node",
         cli=True, post=_still(stat.S_ISCHR, "null.onnx"), marks=[_root_only]),
    Case("atomic-write-to-device-node", lambda fx: _atomic_write_to(fx, lambda fx: _device_node(fx, "null.txt")), "device node",
         post=_still(stat.S_ISCHR, "null.txt"), marks=[_root_only]),
    Case("atomic-write-to-fifo", lambda fx: _atomic_write_to(fx, lambda fx: _fifo(fx, "out.txt")), "FIFO",
         post=_still(stat.S_ISFIFO, "out.txt")),
    Case("checkpoint-save-to-fifo", _save_checkpoint_to_fifo, "FIFO", post=_still(stat.S_ISFIFO, "ckpt_fifo.pt")),
    Case("init-output-is-a-fifo", lambda fx: ["init", "fmnist_kd", "-o", _fifo(fx, "init.yaml"), "--force"], "FIFO", cli=True),
    # runs trained over without resume
    Case("train-over-run-with-best-pt-only", lambda fx: _train_args(fx, _copy_run(fx, "r1", drop=("config.yaml", "last.pt"))),
         "already holds a run.*best.pt.*--resume", cli=True, post=_intact(lambda fx: fx.root / "work" / "r1" / "best.pt")),
    Case("train-over-run-with-metrics-only", lambda fx: _train_args(fx, _copy_run(fx, "r2", drop=("config.yaml", "last.pt", "best.pt"))),
         "already holds a run.*metrics.csv", cli=True, post=_intact(lambda fx: fx.root / "work" / "r2" / "metrics.csv")),
    Case("train-over-run-with-report-only", lambda fx: _train_args(fx, _copy_run(fx, "r3", drop=("config.yaml", "last.pt", "best.pt", "metrics.csv"))),
         "already holds a run.*report.md", cli=True),
    Case("lm-train-over-a-run", lambda fx: ["train", fx.lm_config, "--run-dir", _copy_run(fx, "r4", drop=("config.yaml",))],
         "already holds a run", cli=True),
    Case("trainer-over-dir-with-best-pt", lambda fx: _trainer_over_run(fx, "best.pt"), "already holds a run.*resume=True"),
    Case("trainer-over-dir-with-last-pt", lambda fx: _trainer_over_run(fx, "last.pt"), "already holds a run.*resume=True"),
    Case("trainer-over-dir-with-metrics", lambda fx: _trainer_over_run(fx, "metrics.csv"), "already holds a run"),
    Case("trainer-resume-continues", _trainer_resume_continues, expect="correct"),
    # one run per run directory
    Case("train-resume-on-a-dir-in-use", lambda fx: _train_args(fx, _locked_dir(fx, "l1"), "--resume"), r"in use by process \d+",
         cli=True, post=_release),
    Case("train-new-run-on-a-dir-in-use", lambda fx: _train_args(fx, _locked_dir(fx, "l2", run=False)), r"in use by process \d+",
         cli=True, post=_release),
    Case("lm-train-on-a-dir-in-use", lambda fx: ["train", fx.lm_config, "--run-dir", _locked_dir(fx, "l3", run=False)],
         r"in use by process \d+", cli=True, post=_release),
    Case("trainer-fit-on-a-dir-in-use", _trainer_in_locked_dir, r"in use by process \d+", post=_release),
    Case("lock-freed-by-kill-9", _lock_freed_by_kill9, expect="correct"),
    Case("train-run-dir-is-a-file", lambda fx: _train_args(fx, fx.weights), "is an existing file", cli=True),
]  # fmt: skip


def _train_teacher_in_run(fx: Fx) -> list:
    run = _copy_run(fx, "t_in")
    cfg = run_config(fx.tree, run / "best.pt")  # the teacher's weights: the run's own best.pt
    cfg["teacher"] = {"model": str(run / "best.pt")}
    return ["train", write_yaml(fx.root / "work" / "t_in.yaml", cfg), "--run-dir", run, "--resume"]


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_outputs(case: Case, fx, capsys):
    judge_row(case, fx, capsys, VERDICTS)


def test_failed_build_leaves_no_run_dir(fx, capsys):
    """The lock is taken before the build; a run that wrote nothing leaves no directory."""
    from kdkit.cli import main

    cfg = run_config(fx.tree, fx.weights)
    cfg["student"]["kwargs"] = {"num_classes": 2, "in_channels": 3, "widths": "oops"}
    path = write_yaml(fx.root / "work" / "bad.yaml", cfg)
    run = fx.root / "work" / "never"
    try:
        main(["train", str(path), "--run-dir", str(run)])
    except Exception:  # noqa: BLE001 - only the trace matters here
        pass
    capsys.readouterr()
    assert not run.exists()
