"""Helper for test_cli_train: run `kdkit train ARGS...` and SIGKILL it after step K.

usage: python _train_kill_job.py K train CONFIG [--run-dir DIR ...]
"""

import os
import signal
import sys

import torch

torch.set_num_threads(1)

from kdkit.cli import main  # noqa: E402
from kdkit.train import Trainer  # noqa: E402


def kill_after(step: int) -> None:
    original = Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.callbacks.append(
            lambda trainer, out: trainer.step == step and os.kill(os.getpid(), signal.SIGKILL)
        )

    Trainer.__init__ = init


if __name__ == "__main__":
    kill_after(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
