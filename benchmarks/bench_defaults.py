"""kdkit's defaults against the peers, the student's own ceiling and two bounds (issues 25, 39).

One process, one thread count (``--threads``; run it once per count: OpenMP and ONNX Runtime
take their thread count once per process), the demo's trained teacher and student, batch 128,
the same raw batches for every row (drawn once from ``configs/fmnist_kd.yaml``'s loader: 1k
labels + 59k unlabeled, label -1), the demo's views (pad-2 crop + flip) applied inside every
row's timed step by kdkit's batched input pipeline (the peers get it for free: a per-sample
torchvision pipeline would be slower), rows interleaved over ``--rounds``, medians reported.

Rows (``id``):
  tutorial       the PyTorch KD tutorial's loop: eager fp32 teacher under no_grad, KL(T=1)*T^2
                 and cross-entropy at weight 0.5 each, AdamW (the demo's lr / decay)
  modelopt       NVIDIA ModelOpt ``mtd.convert`` + ``LogitsDistillationLoss`` +
                 ``StaticLossBalancer(0.5)``, ``compute_kd_loss`` (pip install
                 nvidia-modelopt; skipped when it does not import)
  timm           timm's ``LogitDistillationTask`` (task_loss_weight 0.5)
  kdkit-default  ``kdkit train configs/fmnist_kd.yaml`` with no speed keys: its Trainer from
                 ``kdkit.run.job.build_run``, ``teacher.backend: auto``,
                 ``train.channels_last: auto`` and ``train.overlap: auto`` chosen on the first
                 batch, every round anew; the batches run through the Trainer's epoch loop
                 (``Overlap.batches`` + ``train_step``), so an overlapped teacher overlaps
  kdkit-api      the Python API as README's quick start writes it: ``kdkit.make_teacher(
                 module, backend="auto", calibration=train)``, ``Distiller``, ``Trainer`` with
                 its defaults (the bench's views and normalisation as its InputPipeline), the
                 first-batch choices made as ``fit()`` makes them (``trainer.plan()``)
  kdkit-cached   kdkit's Trainer on a ``kdkit.cache`` of one view per image (``teacher.model:
                 cache:DIR``, ``data.views.num_views: 1``): kdkit's machinery with the
                 teacher's logits read from memory, so ceiling - cached = kdkit's overhead
                 and cached - default = the live teacher's inference
  ceiling        the student's own step with the teacher's logits already in memory (the
                 same views, loss and optimizer; no teacher), in the memory format
                 kdkit-default chose in that round: what no KD tool can beat
  teacher        the forward alone of the teacher kdkit-default chose (the fastest that passed
                 the gates), on the prepared views
  ceiling-1t, teacher-1t  (``--threads`` > 1 only) the same two at one thread, for the work
                 bound

The two bounds of issue 39, from the same run: the **sequential bound** (the student's step
then the teacher's forward, one after the other: ``1 / (1/ceiling + 1/teacher)``) and the
**work bound** (``N`` threads divided by the core-seconds per image of the student's step and of
the teacher's forward, each at its most efficient thread count, 1 or N: the most any split of
the cores can give).

    python benchmarks/bench_defaults.py --threads 1 --json runs/bench_defaults-t1.json
    python benchmarks/bench_defaults.py --threads 2 --json runs/bench_defaults-t2.json
    python benchmarks/bench_defaults.py --table runs/bench_defaults-t1.json runs/bench_defaults-t2.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _bounds import on_threads, sequential_bound, work_bound
from torch import nn

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fmnist_kd.yaml"
T, ALPHA, LR, WD = 1.0, 0.5, 3e-3, 5e-4
ROWS = (
    "tutorial", "modelopt", "timm", "kdkit-default", "kdkit-api", "kdkit-cached", "ceiling",
    "teacher", "ceiling-1t", "teacher-1t",
)  # fmt: skip


def say(msg: str) -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"[{time.strftime('%H:%M:%S')} load {load}] {msg}", flush=True)


class Skip(Exception):
    """A row this machine cannot run (a peer not installed)."""


def labeled_ce(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the labeled rows (label -1: unlabeled); 0 for a batch without any."""
    return F.cross_entropy(s, y, ignore_index=-1) if bool((y >= 0).any()) else s.sum() * 0


def kd_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The tutorial's loss: KL at temperature T (x T^2) + cross-entropy on the labeled rows."""
    soft = F.kl_div(
        F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True
    )
    return ALPHA * soft * T * T + (1 - ALPHA) * labeled_ce(s, y)


class Bench:
    """The teacher, the student's initial weights, the batches and the peers' input."""

    def __init__(self, teacher_path: str, n_batches: int) -> None:
        from kdkit import load_model
        from kdkit.data.pipeline import InputPipeline

        self.teacher_path = str(Path(teacher_path).resolve())
        self.tmp = Path(tempfile.mkdtemp(prefix="kdkit-bench-defaults-"))
        trainer, _, _ = self.kdkit_run(
            {"teacher.backend": "torch", "train.channels_last": "false", "train.overlap": "false"}
        )
        self.loader = trainer.train_loader
        self.batches = list(itertools.islice(iter(trainer.train_loader), n_batches))
        self.student0 = copy.deepcopy(trainer.task.student).cpu()
        self.teacher = load_model(self.teacher_path)[0].eval()
        p = trainer.inputs
        self.plain = InputPipeline(p.sampler, p.mean, p.std)  # the peers' input: contiguous
        with torch.no_grad():  # the ceiling's logits: the teacher on exactly these views, once
            self.logits = {id(b): self.teacher(self.plain(b, 0).x) for b in self.batches}
        self.choices: dict[str, list[str]] = {"kdkit-default": [], "kdkit-api": []}
        self.cache: Path | None = None
        self.cl = False
        self.chosen_teacher = None

    def kdkit_run(self, sets: dict[str, str]):
        from kdkit.config import load_resolved
        from kdkit.run.job import build_run

        overrides = [f"teacher.model={self.teacher_path}", "train.progress=false"]
        overrides += [f"{k}={v}" for k, v in sets.items()]
        run_dir = tempfile.mkdtemp(dir=self.tmp)
        return build_run(load_resolved(CONFIG, overrides, run_dir=run_dir))

    def student(self) -> nn.Module:
        return copy.deepcopy(self.student0)

    def inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.plain(batch, 0)
        return m.x, m.labels

    @staticmethod
    def each(step: Callable) -> Callable:
        """A loop over raw batches from a per-batch step."""

        def loop(batches: list) -> None:
            for b in batches:
                step(b)

        return loop

    @staticmethod
    def trainer_loop(trainer) -> Callable:
        """The batches through the Trainer's own epoch loop (an overlapped teacher overlaps)."""

        def loop(batches: list) -> None:
            prepare = lambda b: trainer.inputs(b, 0)  # noqa: E731
            auto = trainer.precision.autocast
            for b, inputs in trainer.overlap.batches(batches, prepare, trainer.task, auto):
                trainer.train_step(b, inputs)

        return loop

    # -- the rows: each returns a loop over a list of raw batches -------------------------
    def tutorial(self) -> Callable:
        student, teacher = self.student(), self.teacher
        opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WD)

        def step(batch) -> None:
            x, y = self.inputs(batch)
            with torch.no_grad():
                t = teacher(x)
            loss = kd_loss(student(x), t, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return self.each(step)

    def modelopt(self) -> Callable:
        try:
            with contextlib.redirect_stderr(None):
                import modelopt.torch.distill as mtd
        except Exception as err:  # noqa: BLE001 - any import failure skips the peer
            raise Skip(f"modelopt does not import ({err})") from None
        config = {
            "teacher_model": copy.deepcopy(self.teacher),
            "criterion": mtd.LogitsDistillationLoss(temperature=T),
            "loss_balancer": mtd.StaticLossBalancer(kd_loss_weight=ALPHA),
        }
        model = mtd.convert(self.student(), mode=[("kd_loss", config)])
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)

        def step(batch) -> None:
            x, y = self.inputs(batch)
            out = model(x)
            loss = model.compute_kd_loss(student_loss=labeled_ce(out, y))
            opt.zero_grad()
            loss.backward()
            opt.step()

        return self.each(step)

    def timm(self) -> Callable:
        try:
            from timm.task import LogitDistillationTask
        except ImportError as err:
            raise Skip(f"timm does not import ({err})") from None
        from _gpu_kd_steps import TimmStudent

        task = LogitDistillationTask(
            TimmStudent(self.student(), 10),
            copy.deepcopy(self.teacher),
            criterion=nn.CrossEntropyLoss(ignore_index=-1),
            temperature=T,
            task_loss_weight=1 - ALPHA,
            device=torch.device("cpu"),
            verbose=False,
        )
        opt = torch.optim.AdamW(task.trainable_module.parameters(), lr=LR, weight_decay=WD)

        def step(batch) -> None:
            x, y = self.inputs(batch)
            out = task(x, y)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()

        return self.each(step)

    def kdkit_default(self) -> Callable:
        start = time.perf_counter()
        trainer, _, choices = self.kdkit_run({})
        self.cl = bool(trainer.inputs.channels_last)
        self.chosen_teacher = trainer.task.teacher
        line = "; ".join(c.line() for c in choices)
        self.choices["kdkit-default"].append(f"{line} [build {time.perf_counter() - start:.1f} s]")
        return self.trainer_loop(trainer)

    def kdkit_api(self) -> Callable:
        """README's quick start, with the bench's views (``Trainer`` defaults otherwise)."""
        import kdkit
        from kdkit.data import load_fashion_mnist
        from kdkit.data.pipeline import InputPipeline

        start = time.perf_counter()
        train = load_fashion_mnist("train")
        module, _ = kdkit.load_model(self.teacher_path)
        teacher = kdkit.make_teacher(module, backend="auto", calibration=train)
        d = kdkit.Distiller(self.student(), teacher, kdkit.SoftTargetKL(temperature=T))
        p = self.plain
        inputs = InputPipeline(p.sampler, p.mean, p.std, dataset=self.loader.dataset)
        trainer = kdkit.Trainer(d, self.loader, inputs=inputs, epochs=1, progress=False)
        choices = trainer.plan()  # what fit() does before its first step
        line = "; ".join(c.line() for c in choices)
        self.choices["kdkit-api"].append(f"{line} [build {time.perf_counter() - start:.1f} s]")
        return self.trainer_loop(trainer)

    def kdkit_cached(self) -> Callable:
        one_view = {"data.views.num_views": "1"}
        if self.cache is None:  # once: the teacher over the train split, one view each
            from kdkit.cache import precompute

            trainer, _, _ = self.kdkit_run(
                {"teacher.backend": "onnx", "train.channels_last": "false", **one_view}
            )
            p = trainer.inputs
            self.cache = precompute(
                trainer.task.teacher,
                trainer.train_loader.dataset,
                self.tmp / "cache",
                views=p.sampler,
                batch_size=1000,
                dtype="fp32",
                mean=p.mean,
                std=p.std,
                device="cpu",
                progress=False,
            )
        trainer, _, _ = self.kdkit_run({"teacher.model": f"cache:{self.cache}", **one_view})
        return self.trainer_loop(trainer)

    def ceiling(self, threads: int | None = None) -> Callable:
        """The student's step alone, against the teacher's logits for exactly these views
        (``self.logits``, computed before any clock: the views depend on the batch's indices
        and the epoch)."""
        from kdkit.data.pipeline import InputPipeline

        p = self.plain
        pipe = InputPipeline(p.sampler, p.mean, p.std, channels_last=self.cl)
        student = self.student().to(
            memory_format=torch.channels_last if self.cl else torch.contiguous_format
        )
        opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WD)

        def step(batch) -> None:
            m = pipe(batch, 0)
            loss = kd_loss(student(m.x), self.logits[id(batch)], m.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return on_threads(self.each(step), threads)

    def teacher_forward(self, threads: int | None = None) -> Callable:
        """The forward alone of the teacher kdkit-default chose, on the prepared views."""
        teacher = self.chosen_teacher
        xs = {id(b): self.plain(b, 0).x for b in self.batches}
        return on_threads(self.each(lambda b: teacher(xs[id(b)])), threads)


def timed(loop: Callable, batches: list, warmup: int) -> float:
    loop(batches[:warmup])
    n = sum(len(b[0]) if isinstance(b, (tuple, list)) else len(b) for b in batches[warmup:])
    start = time.perf_counter()
    loop(batches[warmup:])
    return n / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    bench = Bench(args.teacher, args.warmup + args.steps)
    makers = {
        "tutorial": bench.tutorial,
        "modelopt": bench.modelopt,
        "timm": bench.timm,
        "kdkit-default": bench.kdkit_default,
        "kdkit-api": bench.kdkit_api,
        "kdkit-cached": bench.kdkit_cached,
        "ceiling": bench.ceiling,  # after kdkit-default: its memory format
        "teacher": bench.teacher_forward,  # after kdkit-default: its teacher
    }
    if args.threads > 1:
        makers["ceiling-1t"] = lambda: bench.ceiling(1)
        makers["teacher-1t"] = lambda: bench.teacher_forward(1)
    rates: dict[str, list[float]] = {r: [] for r in makers}
    skipped: dict[str, str] = {}
    loads = []
    for r in range(args.rounds):
        for name, make in makers.items():
            if name in skipped:
                continue
            try:
                loop = make()
            except Skip as err:
                skipped[name] = str(err)
                say(f"{name}: skipped ({err})")
                continue
            rates[name].append(timed(loop, bench.batches, args.warmup))
        loads.append(os.getloadavg()[0])
        say(
            f"threads={args.threads} round {r}: "
            + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items() if v)
        )
    return {
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
        "batch": len(bench.batches[0][0]),
        "rates": rates,
        "skipped": skipped,
        "choices": bench.choices,
        "load_1min": loads,
        "cpu": cpu_name(),
        "torch": torch.__version__,
    }


def bounds(res: dict) -> tuple[float, float]:
    """(sequential bound, work bound) in img/s from one result's medians (``_bounds.py``)."""
    med = {k: statistics.median(v) for k, v in res["rates"].items() if v}
    n = res["threads"]

    def rates(row: str) -> dict[int, float]:
        return {n: med[row], **({1: med[f"{row}-1t"]} if f"{row}-1t" in med else {})}

    seq = sequential_bound(med["ceiling"], med["teacher"])
    return seq, work_bound(n, rates("ceiling"), rates("teacher"))


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def markdown(results: list[dict]) -> str:
    lines = [
        "| threads | row | img/s (median) | x tutorial | % of ceiling | % of sequential bound "
        "| % of work bound | per round |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        med = {k: statistics.median(v) for k, v in res["rates"].items() if v}
        base, ceil = med["tutorial"], med.get("ceiling")
        seq, work = bounds(res)
        for name in ROWS:
            if name in res["skipped"]:
                lines.append(
                    f"| {res['threads']} | {name} | skipped: {res['skipped'][name]} | | | | | |"
                )
                continue
            if name not in med:
                continue
            pct = f"{100 * med[name] / ceil:.0f}%" if ceil else ""
            rounds = " / ".join(f"{v:,.0f}" for v in res["rates"][name])
            shares = ["", "", ""]  # the teacher's forward alone is no training step
            if not name.startswith("teacher"):
                shares = [pct, f"{100 * med[name] / seq:.0f}%", f"{100 * med[name] / work:.0f}%"]
            lines.append(
                f"| {res['threads']} | {name} | {med[name]:,.0f} | {med[name] / base:.2f}x "
                f"| {' | '.join(shares)} | {rounds} |"
            )
        lines.append(
            f"| {res['threads']} | sequential bound | {seq:,.0f} | {seq / base:.2f}x | | 100% | | |"
        )
        lines.append(
            f"| {res['threads']} | work bound | {work:,.0f} | {work / base:.2f}x | | | 100% | |"
        )
    for res in results:
        lines.append(f"\n{res['threads']} thread(s), load {res['load_1min']}, {res['cpu']}:")
        for row, lines_ in res.get("choices", {}).items():
            lines += [f"- {row}: {c}" for c in lines_]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher", default="runs/demo/teacher.pt", help="from `kdkit demo`")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="timed steps per row and round")
    p.add_argument("--json", type=Path)
    p.add_argument("--table", type=Path, nargs="+", help="print the table of saved --json files")
    args = p.parse_args()
    if args.table:
        print(markdown([json.loads(f.read_text()) for f in args.table]))
        return
    res = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    print(markdown([res]))


if __name__ == "__main__":
    main()
