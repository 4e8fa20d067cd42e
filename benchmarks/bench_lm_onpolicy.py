"""On-policy distillation (GKD, ``distill.on_policy``) on a prompt-completion set made from real
text: ``lambda`` 0 / 0.5 / 1 against the scratch student, through ``kdkit train``.

The set: lines of the demo corpus (the Python docs' reST sources, or the stdlib's sources where
``python3.11-doc`` is missing), each cut at the space nearest its middle into prompt (first
half) and completion (second half); shuffled (seed 0), split 80/10/10 train / val / test. A
byte-level BPE tokenizer and a teacher Llama trained here (cross-entropy on the completions),
then a smaller student per recipe, best epoch by val perplexity. Scores on the test prompts:

- ``test ppl``: the student's perplexity of the *reference* completions (teacher-forced);
- ``KL on own samples``: forward KL(teacher || student) on completions the student samples
  itself (T 1, the same seed for every row) - the distribution on-policy training targets;
- ``teacher ppl of samples``: how likely the teacher finds those samples.

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_onpolicy.py --pairs 8000 --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/bench_lm_onpolicy.py --pairs 8000 --seeds 0 1 2 \
        --divergence jsd      # GKD's generalized JSD (beta 0.5); the teacher is reused
    OMP_NUM_THREADS=1 python benchmarks/bench_lm_onpolicy.py --pairs 8000 --seeds 0 1 2 \
        --warm-start          # GKD's setting: on-policy from an already distilled student
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import torch

from kdkit.config import load_config, resolve_paths
from kdkit.lm.align import Aligner
from kdkit.run.lm_demo import demo_corpus, llama_folder

MAX_LENGTH = 64
LAMBDAS = (0.0, 0.5, 1.0)


def _recipes(divergence: str) -> dict[str, tuple[str, float | None]]:
    """name: (run name, on_policy lambda; None = the scratch student, no teacher)."""
    kd = {f"{divergence}, lambda {lam:g}": (f"{divergence}-l{lam:g}", lam) for lam in LAMBDAS}
    return {"scratch (CE)": ("scratch", None), **kd}


def _pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    files, _ = demo_corpus()
    lines: set[str] = set()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        lines.update(x.strip() for x in text.splitlines() if 48 <= len(x.strip()) <= 120)
    chosen = sorted(lines)
    random.Random(seed).shuffle(chosen)
    pairs = []
    for line in chosen[:n]:
        mid = len(line) // 2
        cut = min(
            (i for i, c in enumerate(line) if c == " "), key=lambda i: abs(i - mid), default=mid
        )
        if len(line) // 4 <= cut <= 3 * len(line) // 4:  # both halves real text
            pairs.append({"prompt": line[:cut], "completion": line[cut:]})
    return pairs


def _write(pairs: list[dict[str, str]], path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return path


def _train(
    name,
    out,
    student,
    teacher,
    files,
    epochs,
    lr,
    seed,
    on_policy=None,
    loss_on="completion",
    divergence="fkl",
):
    from kdkit.run import train_run

    distill = {"divergence": divergence}
    if on_policy is not None:
        distill["on_policy"] = {"lambda": on_policy, "max_new_tokens": 32, "temperature": 1.0}
    data = {
        "task": "lm",
        "name": name,
        "student": {"model": student if ":" in str(student) else f"hf-config:{student}"},
        "teacher": None if teacher is None else {"model": f"hf:{teacher}"},
        "data": {
            "text_files": [str(files[0])],
            "val": {"text_files": [str(files[1])]},
            "format": "prompt_completion",
            "loss_on": loss_on,
            "pack": False,
            "max_length": MAX_LENGTH,
            "batch_size": 16,
        },
        "distill": distill,
        "train": {
            "epochs": epochs,
            "seed": seed,
            "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": 0.01},
            "scheduler": {"name": "CosineAnnealingLR", "interval": "step"},
            "max_grad_norm": 1.0,
            "progress": False,
        },
        "run_dir": str(out / name),
    }
    start = time.perf_counter()
    result = train_run(resolve_paths(load_config(data=data)))
    return result, time.perf_counter() - start


def _test_batches(test: Path, tokenizer) -> tuple[list, Aligner]:
    from kdkit.lm import load_lm_dataset

    data = load_lm_dataset(
        [str(test)],
        tokenizer,
        format="prompt_completion",
        loss_on="completion",
        max_length=MAX_LENGTH,
        pack=False,
    )
    aligner = Aligner(pad_id=tokenizer.pad_token_id or 0, max_length=MAX_LENGTH)
    return [aligner(data.rows[i : i + 16]) for i in range(0, len(data.rows), 16)], aligner


def _scores(model, teacher, tokenizer, test: Path) -> dict[str, float]:
    """Test ppl of the reference completions, and the teacher's view of the completions
    ``model`` samples itself on the test prompts (T 1, the same seed for every row)."""
    from kdkit.lm import LMTask, OnPolicy

    batches, aligner = _test_batches(test, tokenizer)
    ppl = LMTask(model, None).evaluate(batches)["ppl"]
    sampler = OnPolicy(1.0, 32, 1.0, eos_token_id=tokenizer.eos_token_id, aligner=aligner)
    torch.manual_seed(1234)
    samples = [sampler(model, b) for b in batches]
    kl = 0.0 if model is teacher else LMTask(model, teacher).evaluate(samples)["kl"]
    by_teacher = LMTask(teacher, None).evaluate(samples)["ppl"]
    return {"test_ppl": ppl, "kl_own": kl, "t_ppl": by_teacher}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--pairs", type=int, default=6000)
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--divergence", default="fkl", help="of the KD rows (jsd: beta 0.5)")
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="GKD's setting: each seed's lambda-0 student (the first KD row) trains one more "
        "epoch at each lambda (lr 1e-3); these rows replace the from-scratch ones",
    )
    p.add_argument("--out", default="runs/bench-lm-onpolicy")
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from kdkit.lm import load_lm
    from kdkit.lm.tokenizer import train_bpe_tokenizer
    from kdkit.run.lm_tools import export_hf, load_lm_student

    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    pairs = _pairs(args.pairs)
    a, b = int(len(pairs) * 0.8), int(len(pairs) * 0.9)
    files = [
        _write(x, out / "data" / f"{n}.jsonl")
        for n, x in (("train", pairs[:a]), ("val", pairs[a:b]), ("test", pairs[b:]))
    ]
    _, source = demo_corpus()
    tok_dir = train_bpe_tokenizer(
        ["\n".join(p["prompt"] + p["completion"] for p in pairs[:a])], 1024, out / "tok"
    )
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    teacher_dir = out / "teacher"
    start = time.perf_counter()
    if not (teacher_dir / "config.json").is_file():
        init = llama_folder(out / "teacher-init", tok, (128, 2, 4), MAX_LENGTH)
        result, _ = _train(
            "teacher-run", out, init, None, files, args.teacher_epochs, 3e-3, 0, loss_on="all"
        )
        export_hf(result.run_dir, teacher_dir)
    teacher_s = time.perf_counter() - start
    student = llama_folder(out / "student-init", tok, (64, 2, 2), MAX_LENGTH)
    teacher, _ = load_lm(f"hf:{teacher_dir}")
    t_scores = _scores(teacher, teacher, tok, files[2])
    recipes = _recipes(args.divergence)
    if args.warm_start:  # the base the warm rows start from
        recipes = {k: v for k, v in recipes.items() if v[1] == 0.0}
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in recipes}
    for seed in args.seeds:
        for name, (slug, lam) in recipes.items():
            shutil.rmtree(out / f"s{seed}-{slug}", ignore_errors=True)  # this script's own runs
            result, wall = _train(
                f"s{seed}-{slug}",
                out,
                student,
                None if lam is None else teacher_dir,
                files,
                args.epochs,
                3e-3,
                seed,
                on_policy=lam,
                divergence=args.divergence,
            )
            if args.warm_start and lam == 0.0 and not slug.startswith("warm"):
                warm = out / f"s{seed}-warm-init"
                shutil.rmtree(warm, ignore_errors=True)
                export_hf(result.run_dir, warm)
                for wlam in LAMBDAS:
                    wname = f"warm {args.divergence}, lambda {wlam:g} (from lambda 0)"
                    shutil.rmtree(out / f"s{seed}-warm-l{wlam:g}", ignore_errors=True)
                    res, wwall = _train(
                        f"s{seed}-warm-l{wlam:g}",
                        out,
                        f"hf:{warm}",
                        teacher_dir,
                        files,
                        1,
                        1e-3,
                        seed,
                        on_policy=wlam,
                        divergence=args.divergence,
                    )
                    wmodel, _, _ = load_lm_student(res.run_dir)
                    rows.setdefault(wname, []).append(
                        {**_scores(wmodel, teacher, tok, files[2]), "wall": wwall}
                    )
                    print(f"seed {seed} {wname} {rows[wname][-1]}", flush=True)
            model, _, _ = load_lm_student(result.run_dir)
            scores = {**_scores(model, teacher, tok, files[2]), "wall": wall}
            rows[name].append(scores)
            print(
                f"seed {seed} {name:16} " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()),
                flush=True,
            )
    print(
        f"\nsource: {source}; {len(pairs)} pairs ({a} train); teacher {teacher_s:.0f} s; "
        f"torch {torch.__version__}; seeds {args.seeds}\n"
    )
    print("| recipe | test ppl | KL on own samples | teacher ppl of samples | wall s |")
    print("|---|---:|---:|---:|---:|")
    t = t_scores
    print(f"| teacher | {t['test_ppl']:.2f} | - | {t['t_ppl']:.2f} | {teacher_s:.0f} |")
    for name, vals in rows.items():
        cells = [_cell(vals, "test_ppl"), _cell(vals, "kl_own", ".3f"), _cell(vals, "t_ppl")]
        print(f"| {name} | " + " | ".join(cells) + f" | {_cell(vals, 'wall', '.0f')} |")


def _cell(vals: list[dict[str, float]], key: str, fmt: str = ".2f") -> str:
    xs = [v[key] for v in vals]
    sd = f" ± {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else ""
    return f"{statistics.mean(xs):{fmt}}{sd}"


if __name__ == "__main__":
    main()
