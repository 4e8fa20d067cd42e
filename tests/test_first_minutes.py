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
