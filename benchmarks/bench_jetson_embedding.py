"""The Jetson tutorial's "logits or embeddings?" experiment, on Fashion-MNIST.

No CLIP weights can be fetched here, so the tutorial's structure is rebuilt with a teacher we
train: the demo's ResNet-style teacher (kdkit/demo.py, cached under ~/.cache/kdkit/demo),
cut at its penultimate layer, plays OpenCLIP's image encoder. Every row goes through
:class:`kdkit.teachers.ClipTeacher` (its probe is fitted by
``kdkit.run.clip_probe.fit_probe``) and kdkit's Trainer.

  1 probe-teacher   the frozen teacher embedding (256-d) + a linear probe on 1k labels
  2 kd-logits       student distilled from row 1's logits, 1k labeled + 59k unlabeled
  3 emb-mse         student whose fc outputs a 256-d embedding, trained to match the
  3 emb-cosine      teacher's (MSE, or cosine) on the 60k images with labels hidden, then
                    its own linear probe on the same 1k labels
  4 scratch         the same student trained on the 1k labels alone

``--select`` first picks the probe learning rate and the KD temperature on a 5k validation
split carved from train (seed 0, short runs), never on test, then runs the test table with
the picked values. The encoder runs in ONNX Runtime (as in the demo); one thread.

    OMP_NUM_THREADS=1 python benchmarks/bench_jetson_embedding.py --select --seeds 0 1 2 \\
        --out docs/_jetson_embedding.md
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
from bench_fmnist_kd import fmt  # mean ± std over seeds, one format for every table
from torch import nn

from kdkit.balance import LossBalancer
from kdkit.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FastLoader,
    concat,
    holdout,
    load_fashion_mnist,
    split_labeled,
)
from kdkit.data.pipeline import InputPipeline
from kdkit.demo import INPUT_SHAPE, DemoConfig, demo_teacher, demo_views
from kdkit.distiller import Distiller
from kdkit.losses import CosineEmbedding, FeatureMSE, SoftTargetKL
from kdkit.models import fmnist_student
from kdkit.run.clip_probe import embed, fit_probe
from kdkit.teachers import ClipTeacher, OnnxTeacher
from kdkit.train.trainer import Trainer

ROWS = ("probe-teacher", "kd-logits", "emb-mse", "emb-cosine", "scratch")
NORM = {"mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}


class Penultimate(nn.Module):
    """The demo teacher up to its global pool: a (N, 256) image embedding."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.pool(self.net.stages(self.net.stem(x)))


class Encoder(nn.Module):
    """``encode_image`` for ClipTeacher: the module itself, or an ONNX Runtime copy of it."""

    def __init__(self, visual: nn.Module, onnx: bool = False) -> None:
        super().__init__()
        self.visual = visual
        self._ort = OnnxTeacher(visual, input_shape=INPUT_SHAPE, threads=1) if onnx else None

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self._ort(x).logits if self._ort is not None else self.visual(x)


def fit(model, train_set, epochs: int, cfg: DemoConfig, teacher=None, criterion=None) -> None:
    """The demo's recipe (AdamW, one-cycle, pad-2 + flip views, batch 128), no per-epoch eval."""
    if teacher is not None and criterion is None:
        criterion = SoftTargetKL(temperature=cfg.temperature)
    distiller = Distiller(model, teacher, criterion, LossBalancer())
    loader = FastLoader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed)
    optimizer = torch.optim.AdamW(distiller.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=epochs * len(loader))
    torch.manual_seed(cfg.seed)  # seeded again once the models are built, as in the recorded runs
    Trainer(
        distiller,
        loader,
        optimizer=optimizer,
        scheduler=sched,
        scheduler_interval="step",
        epochs=epochs,
        inputs=InputPipeline(demo_views(cfg), **NORM, dataset=loader.dataset),
        device="cpu",
        progress=False,
    ).fit()
    distiller.close()


@torch.no_grad()
def top1(model: nn.Module, data) -> float:
    model.eval()
    correct = 0
    for x, y, _ in FastLoader(data, 1000, shuffle=False):
        x = (x.float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
        correct += int((model(x).argmax(1) == y).sum())
    return 100.0 * correct / len(data)


def probe_top1(teacher: ClipTeacher, data) -> float:
    emb, labels = embed(teacher, data, **NORM)
    return 100.0 * float((teacher.head(emb).argmax(1) == labels).float().mean())


def probe(encoder: nn.Module, labeled, lr: float, epochs: int, seed: int) -> ClipTeacher:
    t = ClipTeacher.linear_probe(encoder, FASHION_MNIST_CLASSES)
    fit_probe(t, labeled, epochs=epochs, lr=lr, seed=seed, device="cpu", **NORM)
    return t


def run_seed(seed: int, cfg: DemoConfig, data: dict, enc: nn.Module, hp: dict, rows) -> dict:
    """One seed of every row: the seed picks the 1k labels and the student's init."""
    cfg = replace(cfg, seed=seed)
    labeled, unlabeled = split_labeled(data["train"], cfg.n_labeled, seed=seed)
    out: dict[str, tuple[float, float, tuple[float, float]]] = {}

    def timed(name: str, fn) -> None:
        load0, start = os.getloadavg()[0], time.perf_counter()
        acc = fn()
        out[name] = (acc, time.perf_counter() - start, (load0, os.getloadavg()[0]))
        print(
            f"seed {seed} {name}: {acc:.2f}% in {out[name][1]:.0f} s, load "
            f"{load0:.1f}->{os.getloadavg()[0]:.1f}",
            flush=True,
        )

    teachers: list[ClipTeacher] = []

    def probe_teacher() -> float:  # fitted once per seed, timed with its evaluation
        teachers.append(probe(enc, labeled, hp["probe_lr"], hp["probe_epochs"], seed))
        return probe_top1(teachers[0], data["eval"])

    timed("probe-teacher", probe_teacher)
    teacher = teachers[0]
    if "kd-logits" in rows:

        def kd() -> float:
            torch.manual_seed(seed)
            student = fmnist_student()
            fit(
                student,
                concat(labeled, unlabeled),
                hp["kd_epochs"],
                replace(cfg, temperature=hp["temperature"]),
                teacher,
            )
            return top1(student, data["eval"])

        timed("kd-logits", kd)
    for name, loss in (("emb-mse", FeatureMSE), ("emb-cosine", CosineEmbedding)):
        if name not in rows:
            continue

        def emb(loss=loss) -> float:
            torch.manual_seed(seed)
            student = fmnist_student(num_classes=256)  # its fc outputs the embedding
            fit(
                student,
                data["train"].without_labels(),
                hp["kd_epochs"],
                cfg,
                teacher,
                {("fc", "embedding"): loss()},
            )
            mine = probe(
                Encoder(student), labeled, hp["student_probe_lr"], hp["probe_epochs"], seed
            )
            return probe_top1(mine, data["eval"])

        timed(name, emb)
    if "scratch" in rows:

        def scratch() -> float:
            torch.manual_seed(seed)
            student = fmnist_student()
            fit(student, labeled, hp["scratch_epochs"], cfg)
            return top1(student, data["eval"])

        timed("scratch", scratch)
    return out


def select(cfg: DemoConfig, train, enc: nn.Module, hp: dict, grid: list[float]) -> dict:
    """Pick probe lr, student-probe lr and T on a 5k validation split carved from train (seed
    0; the KD and embedding runs: 1 epoch on the 1k labels + ``select_unlabeled`` images)."""
    fit_set, val = holdout(train, 5000, seed=123)
    labeled, unlabeled = split_labeled(fit_set, cfg.n_labeled, seed=0)
    unlabeled = unlabeled.subset(torch.arange(min(hp["select_unlabeled"], len(unlabeled))))
    scores = {lr: probe_top1(probe(enc, labeled, lr, hp["probe_epochs"], 0), val) for lr in grid}
    print("select probe lr (val top-1):", scores, flush=True)
    hp = {**hp, "probe_lr": max(scores, key=scores.get)}
    teacher = probe(enc, labeled, hp["probe_lr"], hp["probe_epochs"], 0)
    t_scores = {}
    for t in hp["temperatures"]:
        torch.manual_seed(0)
        student = fmnist_student()
        fit(student, concat(labeled, unlabeled), 1, replace(cfg, temperature=t), teacher)
        t_scores[t] = top1(student, val)
    print("select T (1 KD epoch, val top-1):", t_scores, flush=True)
    torch.manual_seed(0)
    student = fmnist_student(num_classes=256)
    fit(
        student,
        concat(labeled, unlabeled).without_labels(),
        1,
        cfg,
        teacher,
        {("fc", "embedding"): FeatureMSE()},
    )
    s_scores = {
        lr: probe_top1(probe(Encoder(student), labeled, lr, hp["probe_epochs"], 0), val)
        for lr in grid
    }
    print("select student probe lr (1 MSE epoch, val top-1):", s_scores, flush=True)
    return {
        **hp,
        "temperature": max(t_scores, key=t_scores.get),
        "student_probe_lr": max(s_scores, key=s_scores.get),
        "selection": {"probe_lr": scores, "temperature": t_scores, "student_probe_lr": s_scores},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--select", action="store_true", help="pick hyper-parameters on validation")
    p.add_argument("--kd-epochs", type=int, default=3)
    p.add_argument("--scratch-epochs", type=int, default=DemoConfig.scratch_epochs)
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--probe-lr", type=float, default=1e-2)
    p.add_argument("--student-probe-lr", type=float, default=1e-2)
    p.add_argument("--temperature", type=float, default=DemoConfig.temperature)
    p.add_argument(
        "--select-unlabeled",
        type=int,
        default=20000,
        help="unlabeled images in the selection runs (1 epoch each)",
    )
    p.add_argument("--grid", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1])
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    cfg = DemoConfig(progress=False)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    trained = demo_teacher(cfg)  # the demo's cached teacher (trains it if missing)
    enc = Encoder(Penultimate(trained.model).eval(), onnx=True)
    hp: dict[str, Any] = {
        "probe_lr": args.probe_lr,
        "student_probe_lr": args.student_probe_lr,
        "probe_epochs": args.probe_epochs,
        "kd_epochs": args.kd_epochs,
        "scratch_epochs": args.scratch_epochs,
        "temperature": args.temperature,
        "temperatures": [1.0, 4.0],
        "select_unlabeled": args.select_unlabeled,
    }
    start = time.perf_counter()
    if args.select:
        hp = select(cfg, train, enc, hp, args.grid)
    print("hyper-parameters:", {k: v for k, v in hp.items() if k != "selection"}, flush=True)
    data = {"train": train, "eval": test}
    runs = [run_seed(s, cfg, data, enc, hp, args.rows) for s in args.seeds]
    lines = [
        "| row | test top-1 (%) | time per seed (s) | load avg (1 min) |",
        "|---|---:|---:|---:|",
        f"| demo teacher, its own fc (60k labels) | {trained.test_top1:.2f} | | |",
    ]
    for row in args.rows:
        accs = [r[row][0] for r in runs]
        secs = statistics.mean(r[row][1] for r in runs)
        loads = [x for r in runs for x in r[row][2]]
        lines.append(f"| {row} | {fmt(accs)} | {secs:.0f} | {min(loads):.1f}-{max(loads):.1f} |")
    total = time.perf_counter() - start
    table = "\n".join(lines) + f"\n\nhyper-parameters: {hp}\nwall time: {total:.0f} s\n"
    print(table, flush=True)
    if args.out:
        from kdkit._io import atomic_write_text

        atomic_write_text(args.out, table)


if __name__ == "__main__":
    main()
