"""LM distillation quality over seeds: the demo's corpus, cached teacher and student, through
``kdkit train`` (``task: lm``); mean +- std of val and test perplexity per recipe.

The corpus split, tokenizer and teacher are the demo's (seed 0, trained once and cached);
each seed changes the student's init and the batch order. The forward-KL temperature is chosen
on val, and test is read once per run at its best val epoch.

    OMP_NUM_THREADS=2 python benchmarks/bench_lm_quality.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from kdkit.run.lm_demo import (
    LMDemoConfig,
    _llama_folder,
    _run,
    _teacher_test_ppl,
    _test_ppl,
    _write_splits,
)

RECIPES = {
    "scratch": {},
    "fkl T1": {"divergence": "fkl", "temperature": 1.0},
    "fkl T2": {"divergence": "fkl", "temperature": 2.0},
    "jsd": {"divergence": "jsd", "beta": 0.5},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench-lm-quality")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from kdkit.run import lm_demo

    base = LMDemoConfig(out_dir=args.out, progress=False)
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    files = _write_splits(base, out / "data")[:3]
    lm_demo.run_lm_demo(dataclasses.replace(base, divergences=(), out_dir=str(out / "demo")))
    teacher = next(Path(base.cache_dir).glob("*/teacher/config.json")).parent
    tok = AutoTokenizer.from_pretrained(str(teacher), local_files_only=True)
    student = _llama_folder(out / "student-init", tok, base.student, base.max_length)
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in RECIPES}
    for seed in args.seeds:
        cfg = dataclasses.replace(base, seed=seed)
        for name, distill in RECIPES.items():
            run_name = f"s{seed}-{name.replace(' ', '')}"
            result, _ = _run(
                cfg,
                run_name,
                student,
                None if name == "scratch" else teacher,
                files,
                epochs=base.student_epochs,
                **distill,
            )
            test = _test_ppl(result.run_dir, files[2])["ppl"]
            rows[name].append((result.best_top1, test))
            print(
                f"seed {seed} {name:8} val ppl {result.best_top1:.2f} test ppl {test:.2f}",
                flush=True,
            )
    t_ppl = _teacher_test_ppl(teacher, files[2], base)
    scratch = statistics.mean(t for _, t in rows["scratch"])
    print(f"\nteacher test ppl {t_ppl:.2f}; torch {torch.__version__}; seeds {args.seeds}\n")
    print("| recipe | val ppl | test ppl | gap closed (test) |")
    print("|---|---:|---:|---:|")
    for name, vals in rows.items():
        v = [a for a, _ in vals]
        t = [b for _, b in vals]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        gap = (
            "-"
            if name == "scratch"
            else f"{(scratch - statistics.mean(t)) / (scratch - t_ppl):.0%}"
        )
        print(
            f"| {name} | {statistics.mean(v):.2f} ± {sd(v):.2f} | "
            f"{statistics.mean(t):.2f} ± {sd(t):.2f} | {gap} |"
        )


if __name__ == "__main__":
    main()
