"""Online distillation with an int8 teacher (issue 14): speed, student accuracy, gate numbers.

The demo's recipe (kdkit/demo.py: fmnist_teacher -> fmnist_student, 1k labels + 59k
unlabeled, pad-2 crop + flip views shared by teacher and student, SoftTargetKL at the demo's
T, AdamW one-cycle, batch 128) with four teachers:

  eager    TorchTeacher, fp32
  ort      OnnxTeacher, fp32 (the demo's default)
  int8     OnnxTeacher(precision="int8"): ORT static quantization, 512 calibration images
           drawn through the run's views and normalisation, behind the fidelity gate
  cached   CachedTeacher replaying one precomputed view per sample (no teacher in the step)

1. Gate: the int8 teacher's agreement and KL with fp32 on the held-out probe, and both
   teachers' test top-1.
2. Teacher alone: img/s at batch 256 per backend.
3. Training-loop throughput: ``--steps`` Trainer.train_step calls per mode after a warm-up,
   modes interleaved for ``--rounds`` rounds (so load changes hit all modes alike), for each
   thread count in ``--threads``; img/s by wall clock and by this process's CPU time, and the
   ratio to the eager-teacher loop of the same round.
4. Accuracy: the student distilled from the ort (fp32) and int8 teachers, ``--kd-epochs``
   epochs, one run per seed (each seed calibrates its own int8 teacher on its own views).
   Eager computes the same function as ort (max logit difference printed in section 1), and
   cached replay is another recipe (fixed views; see docs/benchmarks.md's cache section), so
   neither is retrained here.

    python benchmarks/bench_int8_teacher.py --threads 1 2 --seeds 0 1 2 \
        --out docs/_int8_teacher.md --json runs/bench_int8.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from kdkit.balance import LossBalancer
from kdkit.cache import CachedTeacher, precompute
from kdkit.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FastLoader,
    ViewSampler,
    concat,
    load_fashion_mnist,
    prepare_input,
    split_labeled,
)
from kdkit.data.pipeline import InputPipeline
from kdkit.demo import INPUT_SHAPE, DemoConfig, demo_teacher, demo_views, train_model
from kdkit.distiller import Distiller
from kdkit.losses import SoftTargetKL
from kdkit.models import fmnist_student
from kdkit.teachers import OnnxTeacher, TorchTeacher
from kdkit.teachers.fidelity import compare_logits
from kdkit.teachers.quantize import Calibration, FidelityGate
from kdkit.train.trainer import Trainer

NORM = {"mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}


def say(msg: str) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"[{time.strftime('%H:%M:%S')} load {load}] {msg}", flush=True)


def kd_set(train, cfg: DemoConfig):
    labeled, unlabeled = split_labeled(train, cfg.n_labeled, seed=cfg.seed)
    return concat(labeled, unlabeled)


def int8_teacher(model, data, cfg: DemoConfig, threads: int | None) -> OnnxTeacher:
    calibration = Calibration(
        data, samples=512, probe=1000, views=demo_views(cfg), seed=cfg.seed, **NORM
    )
    return OnnxTeacher(
        model,
        input_shape=INPUT_SHAPE,
        precision="int8",
        calibration=calibration,
        gate=FidelityGate(temperature=cfg.temperature),
        threads=threads,
    )


def test_logits(teacher, test) -> torch.Tensor:
    x = prepare_input(test.images, None, None, None, *NORM.values(), "cpu")
    return torch.cat([teacher(x[i : i + 1000]).logits for i in range(0, len(x), 1000)])


def gate_section(model, data, test, cfg) -> dict:
    start = time.perf_counter()
    int8 = int8_teacher(model, data, cfg, threads=1)
    build_s = time.perf_counter() - start
    eager, ort = (
        test_logits(TorchTeacher(model), test),
        test_logits(OnnxTeacher(model, input_shape=INPUT_SHAPE, threads=1), test),
    )
    q = test_logits(int8, test)
    top1 = lambda logits: 100.0 * float((logits.argmax(1) == test.labels).float().mean())  # noqa: E731
    return {
        "gate": asdict(int8.fidelity),
        "int8_built": int8.int8.built,
        "int8_build_or_load_s": build_s,
        "int8_path": str(int8.path),
        "test_top1": {"eager": top1(eager), "ort": top1(ort), "int8": top1(q)},
        "test_vs_fp32": asdict(compare_logits(ort, q, cfg.temperature)),
        "eager_vs_ort_max_abs_diff": float((eager - ort).abs().max()),
    }


def teacher_alone(teachers: dict, batch: int = 256, calls: int = 7) -> dict:
    x = torch.randn((batch, *INPUT_SHAPE))
    out = {}
    for name, t in teachers.items():
        t(x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            t(x)
            times.append(time.perf_counter() - start)
        out[name] = batch / statistics.median(times)
    return out


def make_trainer(teacher, data, cfg: DemoConfig, views) -> Trainer:
    torch.manual_seed(cfg.seed)
    student = fmnist_student()
    loader = FastLoader(data, cfg.batch_size, shuffle=True, seed=cfg.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    distiller = Distiller(
        student, teacher, SoftTargetKL(temperature=cfg.temperature), LossBalancer()
    )
    torch.manual_seed(cfg.seed)  # seeded again once the models are built, as in the recorded runs
    return Trainer(
        distiller,
        loader,
        None,
        optimizer=opt,
        epochs=1,
        inputs=InputPipeline(views, **NORM, dataset=loader.dataset),
        device="cpu",
        progress=False,
    )


def loop_rate(teacher, data, cfg, views, warmup: int, steps: int) -> dict:
    trainer = make_trainer(teacher, data, cfg, views)
    batches = list(itertools.islice(iter(trainer.train_loader), warmup + steps))
    for b in batches[:warmup]:
        trainer.train_step(b)
    n = sum(len(b[0]) for b in batches[warmup:])
    wall, cpu = time.perf_counter(), time.process_time()
    for b in batches[warmup:]:
        trainer.train_step(b)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_img_per_s": n / wall, "cpu_img_per_s": n / cpu}


def throughput_section(model, data, cfg, threads: int, rounds: int, steps: int, work: Path) -> dict:
    warmup = 3
    sub = data.subset(torch.arange((warmup + steps) * cfg.batch_size))
    replay = ViewSampler(seed=cfg.seed, num_views=1, crop="pad", pad=2, size=28, flip_p=0.5)
    ort = OnnxTeacher(model, input_shape=INPUT_SHAPE, threads=threads)
    cache = precompute(
        ort, sub, work / f"cache-t{threads}", views=replay, progress=False, overwrite=True, **NORM
    )
    modes = {
        "eager": (lambda: TorchTeacher(model), demo_views(cfg)),
        "ort": (lambda: ort, demo_views(cfg)),
        "int8": (lambda: int8_teacher(model, data, cfg, threads), demo_views(cfg)),
        "cached": (lambda: CachedTeacher(cache), replay),
    }
    runs = {m: [] for m in modes}
    for r in range(rounds):
        for mode, (make, views) in modes.items():
            runs[mode].append(loop_rate(make(), sub, cfg, views, warmup, steps))
        eager = runs["eager"][-1]["wall_img_per_s"]
        say(
            f"threads={threads} round {r}: "
            + ", ".join(
                f"{m} {v[-1]['wall_img_per_s']:.0f} ({v[-1]['wall_img_per_s'] / eager:.2f}x)"
                for m, v in runs.items()
            )
        )
    summary = {}
    for mode, rs in runs.items():
        ratios = [
            rs[i]["wall_img_per_s"] / runs["eager"][i]["wall_img_per_s"] for i in range(rounds)
        ]
        cpu_ratios = [
            rs[i]["cpu_img_per_s"] / runs["eager"][i]["cpu_img_per_s"] for i in range(rounds)
        ]
        summary[mode] = {
            "wall_img_per_s": statistics.median(r["wall_img_per_s"] for r in rs),
            "cpu_img_per_s": statistics.median(r["cpu_img_per_s"] for r in rs),
            "ratio_wall": statistics.median(ratios),
            "ratio_cpu": statistics.median(cpu_ratios),
        }
    return {"threads": threads, "steps": steps, "rounds": rounds, "summary": summary, "runs": runs}


def accuracy_section(model, train, test, cfg, seeds, epochs: int) -> dict:
    runs = []
    for seed in seeds:
        scfg = replace(cfg, seed=seed)
        data = kd_set(train, scfg)
        for mode in ("ort", "int8"):
            if mode == "ort":
                teacher = OnnxTeacher(model, input_shape=INPUT_SHAPE, threads=1)
            else:
                teacher = int8_teacher(model, data, scfg, threads=1)
            torch.manual_seed(seed)
            start = time.perf_counter()
            history, top1 = train_model(fmnist_student(), data, test, epochs, scfg, teacher)
            row = {
                "mode": mode,
                "seed": seed,
                "test_top1": top1,
                "time_s": time.perf_counter() - start,
            }
            row["img_per_s"] = [h.get("img_per_s") for h in history]
            if mode == "int8":
                row["gate"] = asdict(teacher.fidelity)
            runs.append(row)
            say(f"accuracy seed {seed} {mode}: {top1:.2f}% in {row['time_s']:.0f} s")
    summary = {}
    for mode in ("ort", "int8"):
        tops = [r["test_top1"] for r in runs if r["mode"] == mode]
        summary[mode] = {
            "mean": statistics.mean(tops),
            "std": statistics.stdev(tops) if len(tops) > 1 else 0.0,
            "runs": tops,
        }
    return {"epochs": epochs, "summary": summary, "runs": runs}


def markdown(res: dict) -> str:
    g = res["gate_section"]
    lines = [
        f"gate (probe of {g['gate']['n_probe']} held-out training images, run's views and "
        f"normalisation): top-1 agreement {g['gate']['top1_agreement']:.2%}, mean KL "
        f"{g['gate']['mean_kl']:.2e} at T={g['gate']['temperature']:g}; test set: fp32 "
        f"{g['test_top1']['ort']:.2f}%, int8 {g['test_top1']['int8']:.2f}%, agreement "
        f"{g['test_vs_fp32']['top1_agreement']:.2%}; eager vs ort max |logit diff| "
        f"{g['eager_vs_ort_max_abs_diff']:.2e}",
        "",
        "| threads | mode | teacher alone, batch 256 (img/s) | KD loop img/s (wall) | vs eager (wall) "
        "| KD loop img/s (CPU time) | vs eager (CPU time) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for t in res["throughput"]:
        alone = res["teacher_alone"][str(t["threads"])]
        for mode, s in t["summary"].items():
            a = f"{alone[mode]:,.0f}" if mode in alone else "-"
            lines.append(
                f"| {t['threads']} | {mode} | {a} | {s['wall_img_per_s']:,.0f} | {s['ratio_wall']:.2f}x "
                f"| {s['cpu_img_per_s']:,.0f} | {s['ratio_cpu']:.2f}x |"
            )
    acc = res.get("accuracy")
    if acc:
        lines += [
            "",
            f"| teacher | student test top-1, {acc['epochs']} KD epochs (mean ± std) | per seed |",
            "|---|---:|---|",
        ]
        for mode, s in acc["summary"].items():
            per = ", ".join(f"{v:.2f}" for v in s["runs"])
            lines.append(f"| {mode} | {s['mean']:.2f} ± {s['std']:.2f} | {per} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kd-epochs", type=int, default=DemoConfig.kd_epochs)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="timed train steps per mode and round")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    cfg = DemoConfig(progress=False)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    model = demo_teacher(cfg).model.eval()
    data = kd_set(train, cfg)
    res: dict = {
        "cpu": os.cpu_count(),
        "load_start": os.getloadavg(),
        "args": vars(args) | {"out": str(args.out), "json": str(args.json)},
    }
    res["gate_section"] = gate_section(model, data, test, cfg)
    say(f"gate: {res['gate_section']}")
    res["teacher_alone"], res["throughput"] = {}, []
    # 1 thread first, then accuracy, then the other thread counts: under load, multi-thread
    # runs are the slow and noisy part, so they go last and results are written as they come
    order = sorted(args.threads, key=lambda t: t != 1)
    with tempfile.TemporaryDirectory(prefix="kdkit-int8-bench-") as work:
        for i, t in enumerate(order):
            torch.set_num_threads(t)
            teachers = {
                "eager": TorchTeacher(model),
                "ort": OnnxTeacher(model, input_shape=INPUT_SHAPE, threads=t),
                "int8": int8_teacher(model, data, cfg, t),
            }
            res["teacher_alone"][str(t)] = teacher_alone(teachers)
            say(f"threads={t} teacher alone: {res['teacher_alone'][str(t)]}")
            res["throughput"].append(
                throughput_section(model, data, cfg, t, args.rounds, args.steps, Path(work))
            )
            torch.set_num_threads(1)
            if i == 0 and not args.skip_accuracy:
                res["accuracy"] = accuracy_section(
                    model, train, test, cfg, args.seeds, args.kd_epochs
                )
            write(res, args)
    res["load_end"] = os.getloadavg()
    print(write(res, args))


def write(res: dict, args: argparse.Namespace) -> str:
    table = markdown(res)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return table


if __name__ == "__main__":
    main()
