"""What a new user sees first: a training loop that reports itself, a CLI that starts fast,
``--print-config`` catching what is knowable without data."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_FIT = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import kdkit
ds = TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,)))
net = lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
d = kdkit.Distiller(net(), net(), kdkit.SoftTargetKL(1.0))
kdkit.Trainer(d, DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8), epochs=2).fit()
"""


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_fit_prints_one_line_per_epoch_without_logging_set_up():
    run = _python(_FIT)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]  # counted like the bar
    assert "val_top1" in lines[0] and "img/s" in lines[0]
    assert "epoch 1/2" in run.stderr  # the progress bar


def _cache_dir(tmp_path: Path) -> Path:
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from kdkit.cache import precompute

    data = TensorDataset(torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,)))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    return Path(precompute(teacher, data, tmp_path / "cache", progress=False))


def test_help_init_and_cache_info_do_not_import_torch(tmp_path):
    """Measured (wall, one process at a time): `kdkit cache info` 3.3 s -> 0.06 s; `--help`
    and `init` were already 0.05 s. What keeps them there: torch is never imported."""
    cache = _cache_dir(tmp_path)
    code = f"""
import sys
from kdkit.cli import main
for argv in (["--help"], ["init", "-o", "-"], ["cache", "info", {str(cache)!r}]):
    assert main(argv) == 0, argv
heavy = sorted(m for m in ("torch", "numpy", "torchvision") if m in sys.modules)
assert not heavy, heavy
"""
    run = _python(code)
    assert run.returncode == 0, run.stderr
    assert "size on disk" in run.stdout


def test_cache_info_into_a_closed_pipe_exits_quietly(tmp_path):
    """`kdkit cache info DIR | head -1` where head has gone: no "Broken pipe" error."""
    cache = _cache_dir(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already exited: every write is EPIPE
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "kdkit", "cache", "info", str(cache)],
            stdout=write_end, stderr=subprocess.PIPE, env=env, timeout=60, text=True,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert run.returncode == 0 and run.stderr == "", run.stderr


def test_print_config_catches_what_this_machine_can_tell(tmp_path, capsys):
    import importlib.util

    import torch

    from kdkit.cli import main

    out = tmp_path / "my.yaml"
    assert main(["init", "fmnist_kd", "-o", str(out)]) == 0
    argv = ["train", str(out), "--print-config", "--set", "teacher.model=kdkit:fmnist_teacher"]
    assert main(argv) == 0
    capsys.readouterr()
    cases = []
    if importlib.util.find_spec("timm") is not None:
        cases.append((["student.model=timm:resnet18x"], "did you mean 'timm:resnet18'"))
    if not torch.cuda.is_available():
        cases += [
            (["train.device=cuda"], "no CUDA device is visible here"),
            (["train.precision=fp16"], "fp16 mixed precision needs a CUDA device"),
        ]
    for sets, message in cases:
        assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
