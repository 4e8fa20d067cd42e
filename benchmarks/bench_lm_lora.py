"""A LoRA student (``student.peft``) against the full student on the LM demo: test perplexity,
trained parameters, optimizer state and peak RSS, each run in a fresh process.

Needs ``kdkit demo lm --quick --out OUT`` first: its teacher (cached under ~/.cache/kdkit) and
its scratch student (``OUT/scratch``, exported here as the base model: LoRA adapts a trained
model, so the base must know the language). Both rows then distil from the teacher with the
demo's recipe (forward KL, T 1, AdamW, cosine schedule, one epoch, the demo's train / val /
test text): ``full`` trains every weight, ``lora`` adapters of rank ``--rank`` on every linear
layer but the head; seeds 0, 1, 2 (the order of the batches), median (min-max).

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_lora.py --demo OUT --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def config(demo: Path, work: Path, name: str, seed: int, rank: int, lr: float) -> Path:
    teacher = next(Path.home().glob(".cache/kdkit/lm-demo/*/teacher"))
    student = {"model": f"hf:{work / 'base'}"}
    if name == "lora":
        student["peft"] = {"r": rank, "alpha": 2 * rank, "target_modules": "all-linear"}
    data = demo / "data"
    raw = {
        "task": "lm", "name": name, "student": student, "teacher": {"model": f"hf:{teacher}"},
        "data": {"text_files": [str(data / "train.txt")], "val": {"text_files": [str(data / "val.txt")]},
                 "max_length": 128, "batch_size": 16},
        "distill": {"divergence": "fkl"},
        "train": {"epochs": 1, "seed": seed, "progress": False, "max_grad_norm": 1.0,
                  "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": 0.01},
                  "scheduler": {"name": "CosineAnnealingLR", "interval": "step"}},
        "run_dir": str(work / f"{name}-{seed}"),
    }  # fmt: skip
    path = work / f"{name}-{seed}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


_WRAP = (
    "import resource, sys\n"
    "from kdkit.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def run(argv: list[str]) -> float:
    """``kdkit ARGV`` in a fresh process; its own peak RSS in MB."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _WRAP, *argv], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    kb = next(x for x in out.splitlines() if x.startswith("PEAK_RSS_KB")).split()[1]
    return int(kb) / 1024


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="the out folder of kdkit demo lm --quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="the demo's learning rate")
    p.add_argument("--lora-lr", type=float, help="the LoRA rows' (default: --lr)")
    args = p.parse_args()
    demo = Path(args.demo)
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    run(["export", str(demo / "scratch"), "--hf", str(work / "base")])
    rows: dict[str, list[dict]] = {"lora": [], "full": []}
    for seed in args.seeds:
        for name in rows:
            lr = args.lora_lr if name == "lora" and args.lora_lr else args.lr
            cfg = config(demo, work, name, seed, args.rank, lr)
            rss = run(["train", str(cfg)])
            out = subprocess.run(
                [sys.executable, "-m", "kdkit", "eval", str(work / f"{name}-{seed}"), "--json",
                 "--data", f"text_files={demo / 'data' / 'test.txt'}"],
                capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            ).stdout  # fmt: skip
            ppl = json.loads(out)["student"]["ppl"]
            ckpt = torch.load(work / f"{name}-{seed}" / "last.pt", weights_only=True)
            opt = ckpt["optimizer"]["state"]
            opt_bytes = sum(t.numel() * t.element_size() for s in opt.values()
                            for t in s.values() if torch.is_tensor(t) and t.dim())  # fmt: skip
            trained = sum(t.numel() for s in opt.values() for k, t in s.items() if k == "exp_avg")
            row = {"seed": seed, "test_ppl": ppl, "peak_rss_mb": rss, "trained_params": trained,
                   "optimizer_bytes": opt_bytes}  # fmt: skip
            rows[name].append(row)
            print(f"{name}: {json.dumps(row)}", flush=True)
    lora_lr = args.lora_lr or args.lr
    print(f"\nrank {args.rank}, lr {args.lr:g} (LoRA {lora_lr:g}), seeds {args.seeds}; "
          "median (min-max)\n")  # fmt: skip
    print("| student | trained params | optimizer state | test ppl | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in rows.items():
        ppl = [r["test_ppl"] for r in rs]
        rss = [r["peak_rss_mb"] for r in rs]
        print(f"| {name} | {rs[0]['trained_params']:,} | {rs[0]['optimizer_bytes'] / 2**10:,.0f} KiB | "
              f"{statistics.median(ppl):.2f} ({min(ppl):.2f}-{max(ppl):.2f}) | "
              f"{statistics.median(rss):.0f} ({min(rss):.0f}-{max(rss):.0f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
