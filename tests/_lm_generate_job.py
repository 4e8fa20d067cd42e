"""A ``kdkit lm generate`` that pauses after each shard, so a test can SIGKILL it between (or
during) commits: ``python _lm_generate_job.py CONFIG PROMPTS OUT [FLAG ...]`` (``$SHARD_PAUSE``:
the pause in seconds, 0.3 by default)."""

import importlib
import os
import sys
import time

import torch

from kdkit.cli import main

torch.set_num_threads(1)
generated = importlib.import_module("kdkit.lm.cache.generated")
_write = generated.write_shard


def _slow_write(path, arrays):
    _write(path, arrays)
    time.sleep(float(os.environ.get("SHARD_PAUSE", "0.3")))


generated.write_shard = _slow_write
config, prompts, out, *flags = sys.argv[1:]
argv = ["lm", "generate", config, "--prompts", prompts, "--out", out, *flags]
sys.exit(main([*argv, "--no-progress"]))
