"""Patient and consistent teaching on Fashion-MNIST (Beyer et al. 2022, arXiv:2106.05237).

The demo's teacher (kdkit.models.fmnist_teacher, trained on all 60k labels, cached under
~/.cache/kdkit/demo) distills the demo's student on 1k labels + 54k unlabeled images: the
train split minus a 5k validation split (stratified, seed 123). Every choice is made on that
validation split; each run also evaluates its last epoch on the test split once, and the
table reports test only for the row chosen on validation.

The teacher sees exactly the student's view: pad-2 crop + flip from a ViewSampler with K=60
fixed views per sample (seed 0, shared by every run; a run's seed sets its label split, init
and order), and with ``mix`` the same mixup/CutMix partner and weight. Rows without ``feat``
or ``ens`` replay the teacher from a cache of those 60 views (kdkit.cache), so a 60-epoch
run shows every sample a fresh view each epoch at student-only cost; ``feat``/``ens`` rows
run live teachers on the same views.

Rows (``--rows``): dash-separated tokens, the loss first.
  soft | dkd          Hinton soft targets / decoupled KD (DKD: a1-b8-T4 unless given)
  sup                 no teacher: the student supervised on every label of the 55k training
                      images (the row that says whether distillation was worth it)
  T<t>, a<x>, b<x>    temperature, DKD's alpha (target) and beta (non-target) weights
  mix                 mixup (alpha 1) / CutMix (alpha 1), half of the samples each
  all                 the teacher plus every label of the 55k training images (does the
                      teacher still add anything when labels are plentiful?)
  feat                + a FitNets pair: student features.2 -> teacher stages.2 (MSE, weight 0.5)
  ens                 teacher = mean probabilities of the demo teacher and a second one
                      (same recipe, seed 1; trained once and cached like the demo's)
  w<e>                distillation weight ramped up over e epochs (LossBalancer)
  e<n>                epochs (one-cycle schedule over all of them)

    python benchmarks/bench_patient.py --precompute plain     # 60 views x 60k, once
    python benchmarks/bench_patient.py --precompute mix       # 60 mixed views x 55k, once
    python benchmarks/bench_patient.py --rows soft-T1-e20 soft-T1-mix-e20 --seeds 0 1 2
    python benchmarks/bench_patient.py --table                # reads runs/bench_patient.jsonl
    python benchmarks/bench_patient.py --teachers             # both teachers + ensemble, test

``--teacher FILE`` distills another teacher (a kdkit checkpoint of ``fmnist_teacher``, e.g. the
strong one of ``bench_teacher_recipe.py``); its caches are kept apart by the file's hash, and
``--views K`` caches K views (an n-epoch run uses views 0..n-1 of each sample, so K = n
covers it):

    python benchmarks/bench_patient.py --teacher T.pt --views 20 --precompute plain
    python benchmarks/bench_patient.py --teacher T.pt --views 20 --rows sup-e20 soft-T1-e20 \
        dkd-e20 soft-T1-feat-e20 --log runs/bench_patient_strong.jsonl

Single-threaded (``torch.set_num_threads(1)``): run at most one process per core. Results
are appended as JSON lines to ``--log`` (one per run, so a cut-short study keeps what it
measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.optim.lr_scheduler import OneCycleLR

from kdkit._io import sha256_file
from kdkit.cache import CachedTeacher, precompute
from kdkit.compat.modelopt import from_config
from kdkit.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FastLoader,
    concat,
    holdout,
    load_fashion_mnist,
    split_labeled,
)
from kdkit.data.pipeline import InputPipeline
from kdkit.data.views import ViewSampler
from kdkit.demo import DemoConfig, demo_teacher, fast_teacher
from kdkit.distiller import Distiller
from kdkit.models import fmnist_student
from kdkit.run.evaluate import evaluate_logits
from kdkit.teachers import EnsembleTeacher, TorchTeacher
from kdkit.train.trainer import Trainer

LOG = Path("runs/bench_patient.jsonl")
CACHE_ROOT = Path("runs/bench_patient")
NUM_VIEWS = 60
VIEW_SEED = 0
TEACHER_TAG = "demo"  # --teacher: the file's hash, so caches of two teachers never mix
FEATURE_PAIR = {"student": "features.2", "teacher": "stages.2", "loss": "feature_mse"}


def parse_row(row: str) -> dict:
    """``soft-T1-mix-e20`` -> soft targets, T 1, mixing on, 20 epochs (see module doc)."""
    parts = row.split("-")
    spec = {"loss": parts[0], "mix": False, "feat": False, "ens": False, "all": False}
    spec.update(epochs=2, warmup=0.0, temperature=None, alpha=1.0, beta=8.0)
    numbers = {"T": "temperature", "a": "alpha", "b": "beta", "w": "warmup", "e": "epochs"}
    for p in parts[1:]:
        if p in ("mix", "feat", "ens", "all"):
            spec[p] = True
        elif p[:1] in numbers and p[1:].replace(".", "", 1).isdigit():
            key = numbers[p[0]]
            spec[key] = int(p[1:]) if key == "epochs" else float(p[1:])
        else:
            raise SystemExit(f"unknown row part {p!r} in {row!r}")
    if spec["loss"] not in ("soft", "dkd", "sup"):
        raise SystemExit(f"unknown loss in {row!r}")
    if spec["temperature"] is None:
        spec["temperature"] = 4.0 if spec["loss"] == "dkd" else 1.0
    return spec


def views(mix: bool) -> ViewSampler:
    alpha = 1.0 if mix else 0.0
    return ViewSampler(
        seed=VIEW_SEED,
        num_views=NUM_VIEWS,
        crop="pad",
        pad=2,
        size=28,
        flip_p=0.5,
        mixup=alpha,
        cutmix=alpha,
    )


def cache_dir(mix: bool) -> Path:
    tag = "" if TEACHER_TAG == "demo" else f"{TEACHER_TAG}-"
    return CACHE_ROOT / f"cache-{tag}{'mix' if mix else 'plain'}-K{NUM_VIEWS}"


def build_cache(mix: bool, full_train, train, teacher) -> Path:
    """The teacher's logits for every view: a plain cache covers the whole train split (any
    subset replays from it); a mixing cache must hold exactly the run's partner pool."""
    out = cache_dir(mix)
    precompute(
        teacher,
        train if mix else full_train,
        out,
        views=views(mix),
        batch_size=1000,
        dtype="fp32",
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        device="cpu",
        progress=False,
    )
    return out


def criterion(spec: dict) -> list[dict]:
    if spec["loss"] == "dkd":
        args = {k: spec[k] for k in ("temperature", "alpha", "beta")}
        pairs = [{"loss": "dkd", "args": args}]
    else:
        pairs = [{"loss": "soft_kl", "args": {"temperature": spec["temperature"]}}]
    if spec["feat"]:
        pairs.append({**FEATURE_PAIR, "args": {"adapter": "auto"}, "weight": 0.5})
    return pairs


def make_teacher(spec: dict, teachers: dict):
    if spec["feat"]:  # feature pairs need the teacher's layers: eager PyTorch
        return TorchTeacher(teachers["demo"].model)
    if spec["ens"]:
        return EnsembleTeacher([fast_teacher(t.model, DemoConfig()) for t in teachers.values()])
    return CachedTeacher(cache_dir(spec["mix"]), expect_views=views(spec["mix"]))


def run(row: str, seed: int, cfg: DemoConfig, data: dict, teachers: dict) -> dict:
    spec = parse_row(row)
    cfg = replace(cfg, seed=seed)
    labeled, unlabeled = split_labeled(data["train"], cfg.n_labeled, seed=seed)
    torch.manual_seed(seed)
    model = fmnist_student()
    if spec["loss"] == "sup":  # every label, no teacher: the same loop, views and schedule
        distiller, train_set = Distiller(model, None, None), data["train"]
    else:
        balancer = {"student_weight": 0.5, "distill_weight": 0.5, "warmup_epochs": spec["warmup"]}
        distiller = from_config(  # the YAML-shaped dict, as kdkit train gives it
            model,
            {
                "teacher_model": make_teacher(spec, teachers),
                "criterion": criterion(spec),
                "loss_balancer": balancer,
            },
        )
        train_set = data["train"] if spec["all"] else concat(labeled, unlabeled)
    loader = FastLoader(train_set, cfg.batch_size, shuffle=True, seed=seed)
    steps = spec["epochs"] * len(loader)
    okwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    torch.manual_seed(seed)  # seeded again once the models are built, as in the recorded runs
    distiller.student.to(memory_format=torch.channels_last)
    inputs = InputPipeline(
        views(spec["mix"]),
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        channels_last=True,
        dataset=loader.dataset,
    )
    trainer = Trainer(
        distiller,
        loader,
        FastLoader(data["val"], 1000, shuffle=False),
        optimizer=lambda p: torch.optim.AdamW(p, **okwargs),
        scheduler=lambda opt: OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps),
        scheduler_interval="step",
        epochs=spec["epochs"],
        inputs=inputs,
        device="cpu",
        progress=False,
    )
    start = time.perf_counter()
    history = trainer.fit(resume=False)
    elapsed = time.perf_counter() - start
    test = trainer.evaluate(FastLoader(data["test"], 1000, shuffle=False))
    return {
        "row": row,
        "seed": seed,
        "top1": [h["val_top1"] for h in history],
        "test_top1": test["top1"],
        "time_s": elapsed,
        # a sup row has no teacher, so it records none
        "teacher_test_top1": None if spec["loss"] == "sup" else teachers["demo"].test_top1,
    }


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(log: Path) -> str:
    runs = defaultdict(list)
    for line in log.read_text().splitlines():
        r = json.loads(line)
        runs[r["row"]].append(r)
    lines = [
        "| row | seeds | val top-1, last epoch | test top-1 | time per run (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row, rs in runs.items():
        last = [r["top1"][-1] for r in rs]
        test = [r["test_top1"] for r in rs]
        secs = statistics.mean(r["time_s"] for r in rs)
        lines.append(f"| {row} | {len(rs)} | {fmt(last)} | {fmt(test)} | {secs:.0f} |")
    return "\n".join(lines)


def teacher_accuracies(teachers: dict, test) -> dict[str, float]:
    """Test top-1 of each teacher and of their ensemble (what the ``ens`` rows distill)."""
    members = {name: fast_teacher(t.model, DemoConfig()) for name, t in teachers.items()}
    members["ensemble"] = EnsembleTeacher(list(members.values()))
    loader = FastLoader(test, 1000, shuffle=False)
    top1 = {}
    for name, t in members.items():
        scores = evaluate_logits(
            lambda x, t=t: t(x).logits, loader, FASHION_MNIST_MEAN, FASHION_MNIST_STD, "cpu"
        )
        top1[name] = round(scores["top1"], 2)
    return top1


def load_teacher(path: Path) -> SimpleNamespace:
    """A saved ``fmnist_teacher`` checkpoint (``bench_teacher_recipe.py`` writes them), with
    ``model`` and ``test_top1`` as :func:`kdkit.demo.demo_teacher`'s row has them."""
    from kdkit import load_model

    model, meta = load_model(str(path))  # meta: the file's plain values, test_top1 among them
    top1 = float(meta.get("test_top1", float("nan")))
    return SimpleNamespace(model=model.eval(), test_top1=top1)


def main() -> None:
    global NUM_VIEWS, TEACHER_TAG  # --views / --teacher: read by views() and cache_dir()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["soft-T1-e2", "soft-T1-mix-e2"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precompute", choices=("plain", "mix"), help="build a teacher cache, exit")
    p.add_argument("--log", type=Path, default=LOG)
    p.add_argument("--table", action="store_true", help="print the table of --log and exit")
    p.add_argument("--teachers", action="store_true", help="print the teachers' test top-1")
    p.add_argument("--teacher", type=Path, help="distill this fmnist_teacher checkpoint")
    p.add_argument("--views", type=int, default=NUM_VIEWS, help="views per sample in the cache")
    args = p.parse_args()
    NUM_VIEWS = args.views
    if args.table:
        print(table(args.log))
        return
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    cfg = DemoConfig(progress=False)
    full_train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    train, val = holdout(full_train, 5000, seed=123)
    if args.teacher:
        teachers = {"demo": load_teacher(args.teacher)}
        TEACHER_TAG = sha256_file(args.teacher)[:12]
    else:
        teachers = {"demo": demo_teacher(cfg)}  # the demo's (all 60k labels)
    if args.precompute:
        live = fast_teacher(teachers["demo"].model, cfg)
        start = time.perf_counter()
        out = build_cache(args.precompute == "mix", full_train, train, live)
        print(f"{out}: {time.perf_counter() - start:.0f} s", flush=True)
        return
    if args.teachers or any(parse_row(r)["ens"] for r in args.rows):
        teachers["seed1"] = demo_teacher(replace(cfg, seed=1))
    if args.teachers:
        print(json.dumps(teacher_accuracies(teachers, test)))
        return
    data = {"train": train, "val": val, "test": test}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        for seed in args.seeds:
            r = run(row, seed, cfg, data, teachers)
            r.update(load=os.getloadavg()[0])
            with args.log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
