"""The device a run trains on: this rank's under torchrun, else ``train.device`` or the default.

Every task's builder asks here first: under torchrun it joins the process group (so it must
run before any model is built), and on ranks other than 0 it quiets kdkit's logging, since
rank 0 alone prints and writes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kdkit.train import distributed

__all__ = ["run_device"]


def run_device(train: Any) -> torch.device:
    """This process's device for a run whose ``train:`` section is ``train``."""
    device = distributed.init()  # torchrun: joins the group; alone: the default device
    if not distributed.is_main():  # rank 0 alone prints (and writes)
        logging.getLogger("kdkit").setLevel(logging.ERROR)
    if train.device is not None and not distributed.is_distributed():
        device = torch.device(train.device)
    return device
