"""Hostile outputs (issues 10 and 23): nothing good is ever destroyed.

Outputs that are the command's inputs, outputs that are not regular files (FIFOs, device
nodes), run directories trained over without resume, two runs in one run directory, and the
checkpoint writer itself (a full disk, the umask, a killed writer's temporary files). Rows and
verdicts: tests/_hostile/.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _hostile import Case, Fx, judge_row, net, params, run_config, trainer, write_yaml

import kdkit
from kdkit.errors import KDError
from kdkit.load import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _lm_config(fx: Fx) -> Path:
    """A ``task: lm`` config that validates (a config.json folder, a text file); the rows
    using it are refused before anything is built, so no weights are needed."""
    root = fx.root / "lm"
    if (root / "lm.yaml").is_file():
        return root / "lm.yaml"
    folder = root / "lm_student"
    folder.mkdir(parents=True)
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
def _trainer_over_run(fx: Fx, keep: str) -> None:
    d = fx.root / "work" / f"lib_{keep}"
    shutil.rmtree(d, ignore_errors=True)
    trainer(d).fit()
    shutil.copy(d / "last.pt", d / "best.pt")  # no val_loader: no best.pt of its own
    for name in ("last.pt", "best.pt", "metrics.csv"):
        if name != keep and (d / name).exists():
            (d / name).unlink()
    trainer(d).fit()


def _trainer_resume_continues(fx: Fx) -> bool:
    d = fx.root / "work" / "lib_resume"
    shutil.rmtree(d, ignore_errors=True)
    trainer(d).fit()
    t = trainer(d, epochs=2)
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
    trainer(d).fit()


def _lock_freed_by_kill9(fx: Fx) -> bool:
    d = fx.root / "work" / "lib_kill9"
    holder = _Holder(d)
    with pytest.raises(KDError, match="in use by process"):
        trainer(d).fit()
    holder.kill()
    trainer(d).fit()
    return (d / "last.pt").is_file()


def _atomic_write_to(fx: Fx, make) -> None:
    from kdkit._io import atomic_write_text

    atomic_write_text(make(fx), "x")


def _save_checkpoint_to_fifo(fx: Fx) -> None:
    from kdkit.load import save_checkpoint

    save_checkpoint(_fifo(fx, "ckpt_fifo.pt"), {"student": {}})


def _full_disk(fx: Fx):
    """A write that fails with ENOSPC must leave the previous checkpoint intact."""
    from kdkit import _io

    path = fx.root / "work" / "disk" / "last.pt"
    save_checkpoint(path, {"student": {"w": torch.ones(2)}, "epoch": 1})
    before = path.read_bytes()
    real = torch.save

    def full(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "save", full)
    try:
        save_checkpoint(path, {"student": {"w": torch.zeros(2)}, "epoch": 2})
    except KDError as err:
        assert "intact" in str(err)  # a clear message, and true:
        assert path.read_bytes() == before
        assert not [p for p in path.parent.iterdir() if _io.TMP_MARKER in p.name]
        raise
    finally:
        mp.undo()


def _umask_checkpoint(fx: Fx):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(fx.root / "work" / "mode.pt", {"student": {"w": torch.ones(1)}})
    finally:
        os.umask(old)
    return stat.S_IMODE(path.stat().st_mode) == 0o644


def _stale_temps_cleaned(fx: Fx):
    d = fx.root / "work" / "stale"
    d.mkdir(parents=True, exist_ok=True)
    legacy = d / ".last.pt.abc123.tmp"  # kdkit 0.1's mkstemp name
    current = d / ".last.pt.kdkit-tmp-999999999"  # a killed writer (no such pid)
    legacy.write_bytes(b"x" * 100)
    current.write_bytes(b"x" * 100)
    save_checkpoint(d / "last.pt", {"student": {"w": torch.ones(1)}})
    return not legacy.exists() and not current.exists()


def _metrics_new_column(fx: Fx):
    d = fx.root / "work" / "m_col"
    balancer = kdkit.LossBalancer(start_epoch=1)
    trainer(d, teacher=net(seed=2), epochs=2, balancer=balancer).fit()
    rows = list(csv.DictReader((d / "metrics.csv").open()))
    header = next(csv.reader((d / "metrics.csv").open()))
    return (
        "loss_output" in header
        and rows[0]["loss_output"] in ("", None)
        and float(rows[1]["loss_output"]) >= 0
        and [int(r["epoch"]) for r in rows]
        == [1, 2]  # counted from 1, as in the logs and the report
        and all(r["lr"] not in ("", None) for r in rows)
    )


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
    Case("lm-train-over-a-run", lambda fx: ["train", _lm_config(fx), "--run-dir", _copy_run(fx, "r4", drop=("config.yaml",))],
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
    Case("lm-train-on-a-dir-in-use", lambda fx: ["train", _lm_config(fx), "--run-dir", _locked_dir(fx, "l3", run=False)],
         r"in use by process \d+", cli=True, post=_release),
    Case("trainer-fit-on-a-dir-in-use", _trainer_in_locked_dir, r"in use by process \d+", post=_release),
    Case("lock-freed-by-kill-9", _lock_freed_by_kill9, expect="correct"),
    Case("train-run-dir-is-a-file", lambda fx: _train_args(fx, fx.weights), "is an existing file", cli=True),
    # the checkpoint writer, and a run's files
    Case("checkpoint-dir-is-a-file", lambda fx: trainer(fx.a_file), "is an existing file|not a directory"),
    Case("checkpoint-dir-not-writable", lambda fx: trainer("/proc/kdkit-nope"), "cannot write"),
    Case("full-disk-keeps-last-checkpoint", _full_disk, "intact"),
    Case("checkpoint-permissions-follow-umask", _umask_checkpoint, expect="correct"),
    Case("stale-temps-removed-on-next-write", _stale_temps_cleaned, expect="correct"),
    Case("metrics-new-loss-column-at-start-epoch", _metrics_new_column, expect="correct"),
]  # fmt: skip


def _train_teacher_in_run(fx: Fx) -> list:
    run = _copy_run(fx, "t_in")
    cfg = run_config(fx.tree, run / "best.pt")  # the teacher's weights: the run's own best.pt
    cfg["teacher"] = {"model": str(run / "best.pt")}
    return ["train", write_yaml(fx.root / "work" / "t_in.yaml", cfg), "--run-dir", run, "--resume"]


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_outputs(case: Case, hostile, capsys):
    judge_row(case, hostile, capsys)


def test_failed_build_leaves_no_run_dir(hostile, capsys):
    """The lock is taken before the build; a run that wrote nothing leaves no directory."""
    from kdkit.cli import main

    cfg = run_config(hostile.tree, hostile.weights)
    cfg["student"]["kwargs"] = {"num_classes": 2, "in_channels": 3, "widths": "oops"}
    path = write_yaml(hostile.root / "work" / "bad.yaml", cfg)
    run = hostile.root / "work" / "never"
    try:
        main(["train", str(path), "--run-dir", str(run)])
    except Exception:  # noqa: BLE001 - only the trace matters here
        pass
    capsys.readouterr()
    assert not run.exists()
