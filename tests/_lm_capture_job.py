"""A ``kdkit lm capture`` that pauses after each shard, so a test can SIGKILL it between (or
during) shard writes: ``python _lm_capture_job.py CONFIG OUT`` (``$SHARD_PAUSE``: the pause in
seconds, 0.3 by default)."""

import importlib
import os
import sys
import time

import torch

from kdkit.cli import main

torch.set_num_threads(1)
# the module (kdkit.lm.cache.capture is also the name of its function in the package)
capture_module = importlib.import_module("kdkit.lm.cache.capture")
_write = capture_module._write_shard


def _slow_write(path, arrays):
    _write(path, arrays)
    time.sleep(float(os.environ.get("SHARD_PAUSE", "0.3")))


capture_module._write_shard = _slow_write
argv = ["lm", "capture", sys.argv[1], "--out", sys.argv[2], "--topk", "8", "--shard-rows", "16"]
sys.exit(main([*argv, "--no-progress"]))
