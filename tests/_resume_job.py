"""Helper for test_trainer: train a tiny distillation; optionally SIGKILL itself mid-epoch.

usage: python _resume_job.py CHECKPOINT_DIR OUT_WEIGHTS KILL_AT_STEP RESUME [OVERLAP]

OVERLAP: the Trainer's ``overlap`` (default ``auto``: off on this one thread; ``1+1``: the
teacher on its own thread beside the student's).
"""

import os
import signal
import sys

import torch
from torch import nn

torch.set_num_threads(1)

from kdkit import Distiller, SoftTargetKL, Trainer  # noqa: E402
from kdkit.data import ArrayDataset, FastLoader  # noqa: E402
from kdkit.data.pipeline import InputPipeline  # noqa: E402
from kdkit.data.views import ViewSampler  # noqa: E402


def net(width, dropout=0.0):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * width, 4),
    )


def main():
    ckpt_dir, out, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    overlap = sys.argv[5] if len(sys.argv) > 5 else "auto"
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 1, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (96,), generator=g)
    labels[::3] = -1  # a third unlabeled
    data = ArrayDataset(images, labels)
    torch.manual_seed(1)
    teacher, student = net(8), net(4, dropout=0.3)

    def killer(trainer, out):
        if trainer.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(
        Distiller(student, teacher, SoftTargetKL(temperature=2.0)),
        FastLoader(data, 16, seed=3),
        optimizer=lambda p: torch.optim.SGD(p, **{"lr": 0.05, "momentum": 0.9}),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
        epochs=3,
        checkpoint_dir=ckpt_dir,
        checkpoint_every=4,
        inputs=InputPipeline(ViewSampler(seed=5, crop="pad", pad=2, size=12), (0.5,), (0.25,)),
        device="cpu",
        progress=False,
        callbacks=[killer],
        overlap=overlap,
    )
    trainer.fit(resume=resume)
    torch.save(student.state_dict(), out)


if __name__ == "__main__":
    main()
