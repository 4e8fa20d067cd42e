"""LM distillation quality over seeds: the demo's corpus, cached teacher and student, through
``kdkit train`` (``task: lm``); mean +- std of val and test perplexity per recipe.

The corpus split, tokenizer and teacher are the demo's (seed 0, trained once and cached);
each seed changes the student's init and the batch order. The forward-KL temperature is chosen
on val, and test is read once per run at its best val epoch.

    OMP_NUM_THREADS=2 python benchmarks/bench_lm_quality.py --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/bench_lm_quality.py --cache   # students from top-k caches

With ``--cache`` the demo teacher is captured once per k (``kdkit lm capture`` over the train
and val text) and students are trained from those caches with each tail policy, beside the live
teacher (forward KL, T=1), test perplexity read once per run at the best val epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from kdkit.run.lm_demo import (
    LMDemoConfig,
    llama_folder,
    student_test_ppl,
    teacher_test_scores,
    train_demo_run,
    write_splits,
)

RECIPES = {
    "scratch": {},
    "fkl T1": {"divergence": "fkl", "temperature": 1.0},
    "fkl T2": {"divergence": "fkl", "temperature": 2.0},
    "jsd": {"divergence": "jsd", "beta": 0.5},
}


#: ``--cache``: students trained from top-k captures of the same teacher (issue 20), beside
#: the live teacher; forward KL at T=1 (the recipe chosen on val above). "k32 drop" etc. run
#: with the first seed only (``--policy-seeds``).
CACHE_RECIPES = {
    "scratch": {},
    "live fkl": {"divergence": "fkl"},
    "cache k8 bucket": {"divergence": "fkl", "tail": "bucket", "k": 8},
    "cache k32 bucket": {"divergence": "fkl", "tail": "bucket", "k": 32},
    "cache k128 bucket": {"divergence": "fkl", "tail": "bucket", "k": 128},
    "cache k32 renorm": {"divergence": "fkl", "tail": "renorm", "k": 32, "one_seed": True},
    "cache k32 uniform": {"divergence": "fkl", "tail": "uniform", "k": 32, "one_seed": True},
    "cache k32 drop": {"divergence": "fkl", "tail": "drop", "k": 32, "one_seed": True},
    "cache k32 label": {"divergence": "fkl", "tail": "label", "k": 32},
}


def _captures(base, teacher: Path, files, out: Path) -> dict[int, str]:
    """One top-k capture of the demo teacher over its train + val text per k."""
    from kdkit.config import load_config, resolve_paths
    from kdkit.run.lm_job import capture_run

    train, val, _ = files
    raw = {
        "task": "lm",
        "student": {"model": f"hf:{teacher}"},
        "teacher": {"model": f"hf:{teacher}"},
        "data": {
            "text_files": [str(train)],
            "val": {"text_files": [str(val)]},
            "max_length": base.max_length,
            "batch_size": base.batch_size,
        },
    }
    cfg = resolve_paths(load_config(data=raw))
    found = {}
    for k in sorted({r["k"] for r in CACHE_RECIPES.values() if "k" in r}):
        m = capture_run(cfg, out / f"cache-k{k}", topk=k, progress=False)
        print(f"captured k={k}: {m['bytes_per_token']:.1f} B/token", flush=True)
        found[k] = f"cache:{out / f'cache-k{k}'}"
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench-lm-quality")
    p.add_argument("--cache", action="store_true", help="students from top-k captures instead")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from kdkit.run import lm_demo

    base = LMDemoConfig(out_dir=args.out, progress=False)
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    files = write_splits(base, out / "data")[:3]
    lm_demo.run_lm_demo(dataclasses.replace(base, divergences=(), out_dir=str(out / "demo")))
    teacher = lm_demo.demo_teacher_dir(base)  # this config's teacher, not any cached one
    tok = AutoTokenizer.from_pretrained(str(teacher), local_files_only=True)
    student = llama_folder(out / "student-init", tok, base.student, base.max_length)
    recipes = CACHE_RECIPES if args.cache else RECIPES
    caches = _captures(base, teacher, files, out) if args.cache else {}
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in recipes}
    for seed in args.seeds:
        cfg = dataclasses.replace(base, seed=seed)
        for name, recipe in recipes.items():
            distill = {k: v for k, v in recipe.items() if k not in ("k", "one_seed")}
            if recipe.get("one_seed") and seed != args.seeds[0]:
                continue
            source = caches[recipe["k"]] if "k" in recipe else teacher
            run_name = f"s{seed}-{name.replace(' ', '')}"
            result, _ = train_demo_run(
                cfg,
                run_name,
                student,
                None if name == "scratch" else source,
                files,
                epochs=base.student_epochs,
                **distill,
            )
            test = student_test_ppl(result.run_dir, files[2])["ppl"]
            rows[name].append((result.best_top1, test))
            print(
                f"seed {seed} {name:8} val ppl {result.best_top1:.2f} test ppl {test:.2f}",
                flush=True,
            )
    t_ppl = teacher_test_scores(teacher, files[2], base)["ppl"]
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
