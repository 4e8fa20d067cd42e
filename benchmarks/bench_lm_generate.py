"""Generate once, distil twice (issue 37): sequence-level KD, token-level KD from the generated
cache, and both, against token-level KD on the corpus itself with the same token budget; and
what one teacher pass saves against generation followed by a separate capture.

The LM demo's quick setting (``LMDemoConfig.quick``): its corpus, BPE tokenizer (2048), teacher
Llama (128 hidden, 4 layers; trained and cached by ``kdkit demo lm --quick``, run it once
first), student (64 hidden, 2 layers) and training recipe (AdamW 3e-3, cosine, 1 epoch).
Prompts: the first 32-64 tokens (uniform, seeded) of held-out documents, the blocks separated by
a blank line of the corpus beyond the window the teacher trained on (at least 96 tokens each).
For each seed (the generation seed and the student's):

- ``kdkit lm generate`` (T 1, top-p 1, one sample per prompt, 64 new tokens at most, completions
  that hit the limit kept: this corpus has no short documents) writes ``prompt_completion`` data
  and the top-32 cache at ``distill.temperature`` 1;
- students, all ``loss_on: completion`` on the generated rows: **sft** (no teacher, cross-entropy
  on the teacher's text), **kd** (``cache:OUT``, forward KL, ``ce_weight`` 0), **both**
  (``ce_weight`` 0.5); and on the corpus itself, a prefix of the train split holding the same
  number of trained tokens: **corpus-kd** (today's token-level KD, the live teacher) and
  **corpus-ce** (no teacher), at the same batch (half the optimizer steps: a corpus row trains
  all its tokens, a generated row its completion only) and, ``-steps``, at the batch that gives
  as many steps as the generated rows;
- scored on the demo's test split (real text, packed rows of 128): perplexity, and top-1
  agreement and KL with the live teacher.

Cost (the first seed): ``kdkit lm generate`` (sampling and the targets in one pass, files
included) against the same prompts sampled without targets (``kdkit.lm.onpolicy
.sample_completions``, kdkit's plain sampling loop, the same batches) plus ``kdkit lm capture``
of the generated data (the separate pass): wall and CPU seconds (the fastest of ``--rounds``),
and the teacher's forward FLOPs.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -W ignore benchmarks/bench_lm_generate.py \
        --seeds 0 1 2 --prompts 1500
    # more students on the same generations; the cost alone
    ... --seeds 0 1 2 --prompts 1500 --keep --only corpus-kd-steps corpus-ce-steps
    ... --prompts 500 --rounds 2 --cost-only --out runs/bench-lm-generate-cost
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kdkit.config import load_config, resolve_paths
from kdkit.run.lm_demo import (
    LMDemoConfig,
    demo_corpus,
    demo_teacher_dir,
    llama_folder,
    write_splits,
)

RECIPES = ("corpus-kd", "corpus-ce", "corpus-kd-steps", "corpus-ce-steps", "sft", "kd", "both")


def _teacher(cfg: LMDemoConfig) -> Path:
    """The quick demo's teacher, where ``kdkit demo lm --quick`` trains and caches it."""
    teacher = demo_teacher_dir(cfg)
    if not (teacher / "config.json").is_file():
        raise SystemExit("no quick demo teacher: run `kdkit demo lm --quick` once first")
    return teacher


def _prompts(cfg: LMDemoConfig, tok: Any, n: int, path: Path) -> Path:
    """``n`` prompts: the first 32-64 tokens of held-out blocks (the text past the window
    :func:`write_splits` takes, in its order), decoded to text."""
    docs = []
    for f in demo_corpus()[0]:
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    random.Random(cfg.seed).shuffle(docs)
    held_out = "\n\n".join(docs)[cfg.chars :]
    rng, out = random.Random(1234), []
    for block in held_out.split("\n\n"):
        ids = tok(block.strip())["input_ids"]
        if len(ids) >= 96:
            out.append({"prompt": tok.decode(ids[: rng.randint(32, 64)])})
        if len(out) == n:
            break
    path.write_text("".join(json.dumps(p) + "\n" for p in out), encoding="utf-8")
    return path


def _config(cfg: LMDemoConfig, name: str, out: Path, student: Path, teacher: str | None,
            data: dict, distill: dict, seed: int) -> dict:  # fmt: skip
    return {
        "task": "lm", "name": name, "student": {"model": f"hf-config:{student}"},
        "teacher": None if teacher is None else {"model": teacher},
        "data": {"max_length": cfg.max_length, "batch_size": cfg.batch_size, **data},
        "distill": {"divergence": "fkl", "temperature": 1.0, **distill},
        "train": {"epochs": 1, "seed": seed, "progress": False, "max_grad_norm": 1.0,
                  "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": 0.01},
                  "scheduler": {"name": "CosineAnnealingLR", "interval": "step"}},
        "run_dir": str(out / name),
    }  # fmt: skip


def _trained_tokens(cfg_dict: dict, tok: Any) -> int:
    return sum(int(r.trainable[1:].sum()) for r in _rows(cfg_dict, tok))


def _rows(cfg_dict: dict, tok: Any) -> list:
    """The training rows ``kdkit train`` builds from the config (its val split left out)."""
    from kdkit.run.lm_job import lm_datasets

    c = resolve_paths(load_config(data={**cfg_dict, "teacher": None}))
    return list(lm_datasets(c, tok, None)[0].rows)


def _corpus_prefix(train: Path, tok: Any, budget: int, path: Path, gen: dict) -> Path:
    """The first characters of the training split holding ``budget`` trained tokens (within
    1%); refused when the whole split holds fewer (then the recipes would not be compared on
    the same budget: give fewer prompts)."""
    text = train.read_text(encoding="utf-8")
    chars = int(budget * len(text) / len(tok(text)["input_ids"]))
    for _ in range(6):  # a few corrections: packing loses a token per row
        path.write_text(text[:chars], encoding="utf-8")
        got = _trained_tokens({**gen, "data": {**gen["data"], "text_files": [str(path)],
                                               "format": "text", "loss_on": "all", "pack": True,
                                               "val": None}}, tok)  # fmt: skip
        if abs(got - budget) <= budget // 100:
            return path
        if chars >= len(text) and got < budget:
            raise SystemExit(f"the corpus' train split holds {got:,} trained tokens, fewer than "
                             f"the generated data's {budget:,}: give fewer --prompts")  # fmt: skip
        chars = min(len(text), int(chars * budget / max(got, 1)))
    raise SystemExit(f"no prefix of the train split holds {budget:,} trained tokens (got {got:,})")


def _scores(run_dir: Path, teacher: Any, test_batches: list) -> dict[str, float]:
    from kdkit.lm import LMTask
    from kdkit.run.lm_tools import load_lm_student

    student, _, _ = load_lm_student(run_dir)
    s = LMTask(student, teacher, probe=False).evaluate(iter(test_batches))
    return {"ppl": s["ppl"], "agree": s["agree"], "kl": s["kl"]}


def _flops(teacher: Any, prompt: int, generated: int, rows: int) -> dict[str, float]:
    """Teacher forward FLOPs, 2 per weight per token, the head counted where it is applied.
    One pass: every prompt and generated token fed once, the head at every generated position
    and one more per row. Two: sampling (the last generated token is not fed; the head at each
    generated position) + a capture (every row's tokens again with the appended EOS, the head
    at its trained positions: the completion and the EOS)."""
    from kdkit.lm.models import output_head

    head = output_head(teacher).weight.numel()
    body = sum(p.numel() for p in teacher.parameters()) - head
    body -= teacher.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    one = 2 * body * (prompt + generated) + 2 * head * (generated + rows)
    sampling = 2 * body * (prompt + generated - rows) + 2 * head * generated
    capture = 2 * body * (prompt + generated + rows) + 2 * head * (generated + rows)
    return {"one_pass_gflop": one / 1e9, "two_pass_gflop": (sampling + capture) / 1e9}


def _timed(fn: Any) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds and this process' CPU seconds (one thread: the work done,
    much less moved than the wall by other jobs on the machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _cost(gen_cfg: Path, prompts: Path, out: Path, tok: Any, batch: int, rounds: int) -> dict:
    """One pass (``kdkit lm generate``: sampling and targets) against two (the teacher loaded
    and sampling alone, then ``kdkit lm capture`` of the written data), each from a cold start
    of the teacher; and the same generation without the tokenization check. Each phase's
    fastest of ``rounds`` (the phases alternate), wall and CPU seconds."""
    from kdkit.config import load_resolved
    from kdkit.lm.models import load_lm
    from kdkit.lm.onpolicy import sample_completions
    from kdkit.run.lm_generate import generate_config, generate_run
    from kdkit.run.lm_job import capture_run

    cfg = generate_config(gen_cfg, [], prompts)
    options = {"max_new_tokens": 64, "keep_unfinished": True, "seed": 0, "progress": False,
               "device": "cpu", "batch_size": batch}  # fmt: skip
    lines = [json.loads(x) for x in prompts.read_text().splitlines()]
    ids = [torch.as_tensor(tok(x["prompt"])["input_ids"]) for x in lines]

    def sampling() -> Any:
        torch.manual_seed(0)
        teacher, _ = load_lm(cfg.teacher.model)
        for i in range(0, len(ids), batch):
            sample_completions(teacher.eval(), ids[i : i + batch], 64, 1.0,
                               [tok.eos_token_id], tok.pad_token_id, "cpu")  # fmt: skip
        return teacher

    phases = {
        "one_pass": lambda: generate_run(cfg, prompts, out, options),
        "any_tokenization": lambda: generate_run(
            cfg, prompts, out.parent / "gen-any", {**options, "any_tokenization": True}
        ),
        "sampling": sampling,
        "capture": lambda: capture_run(  # of the data the one pass wrote
            load_resolved(gen_cfg, [f'data.text_files=["{out}/data/*.jsonl"]', "data.val=null"]),
            out.parent / "capture",
            topk=32,
            temperature=1.0,
            progress=False,
        ),  # fmt: skip
    }
    #: what each phase writes, removed before it runs (a finished folder would be resumed)
    folders = {"one_pass": out, "any_tokenization": out.parent / "gen-any",
               "capture": out.parent / "capture"}  # fmt: skip
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in phases}
    results: dict[str, Any] = {}
    for _ in range(rounds):
        for name, fn in phases.items():
            if name in folders:
                shutil.rmtree(folders[name], ignore_errors=True)
            results[name], wall, cpu = _timed(fn)
            times[name].append((wall, cpu))
    cost: dict[str, Any] = {}
    for name, pairs in times.items():
        cost[f"{name}_s"] = min(w for w, _ in pairs)
        cost[f"{name}_cpu_s"] = min(c for _, c in pairs)
    for unit in ("_s", "_cpu_s"):
        cost[f"two_pass{unit}"] = cost[f"sampling{unit}"] + cost[f"capture{unit}"]
    manifest, teacher = results["one_pass"], results["sampling"]
    c, any_c = manifest["generate"]["counts"], results["any_tokenization"]["generate"]["counts"]
    prompt_tokens = sum(len(x) for x in ids)
    return {**cost, "rounds": rounds, "generated_tokens": c["generated_tokens"],
            "prompt_tokens": prompt_tokens, "rows": manifest["num_rows"],
            "redrawn": c["redrawn"], "rescored": c["rescored"], "any_rescored": any_c["rescored"],
            **_flops(teacher, prompt_tokens, c["generated_tokens"], manifest["num_rows"])}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--prompts", type=int, default=1500, help="more than the quick corpus' "
                   "train split can match in trained tokens is refused")  # fmt: skip
    p.add_argument("--gen-batch", type=int, default=64, help="sequences per teacher batch")
    p.add_argument("--out", default="runs/bench-lm-generate")
    p.add_argument("--rounds", type=int, default=1, help="timings: the fastest of N rounds")
    p.add_argument("--cost-only", action="store_true", help="the first seed's cost, no students")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep --out: a finished generation is "
        "reused (then the first seed's cost is not measured)",
    )
    p.add_argument("--only", nargs="+", choices=RECIPES, default=list(RECIPES),
                   help="the students to train")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from kdkit.cli import main as kdkit
    from kdkit.config import LMDataConfig, LMModelConfig, LMRunConfig
    from kdkit.lm.models import load_lm
    from kdkit.run import train_run
    from kdkit.run.lm_job import build_lm_data

    out = Path(args.out)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    cfg = LMDemoConfig.quick(out_dir=str(out), progress=False)
    files = write_splits(cfg, out / "data")[:3]
    teacher_dir = _teacher(cfg)
    tok = AutoTokenizer.from_pretrained(str(teacher_dir), local_files_only=True)
    teacher, _ = load_lm(f"hf:{teacher_dir}")
    prompts = _prompts(cfg, tok, args.prompts, out / "data" / "prompts.jsonl")
    student = llama_folder(out / "student-init", tok, cfg.student, cfg.max_length)
    test_cfg = LMRunConfig(student=LMModelConfig(model=f"hf:{teacher_dir}"),
                           data=LMDataConfig(text_files=(str(files[2]),), max_length=cfg.max_length,
                                             batch_size=cfg.batch_size))  # fmt: skip
    test_batches = list(build_lm_data(test_cfg, tok, cfg.max_length).train_loader)
    from kdkit.lm import LMTask

    teacher_ppl = LMTask(teacher, None, probe=False).evaluate(iter(test_batches))["ppl"]
    results: dict[str, Any] = {"teacher_ppl": teacher_ppl, "seeds": {}}
    gen_data = {"text_files": [str(out / "gen-s{seed}" / "data" / "*.jsonl")],
                "format": "prompt_completion", "loss_on": "completion", "pack": False,
                "val": {"split": 0.05}}  # fmt: skip
    for seed in args.seeds:
        gen_out = out / f"gen-s{seed}"
        gen = _config(cfg, "gen", out / f"s{seed}", student, f"hf:{teacher_dir}",
                      {**gen_data, "text_files": [str(gen_out / "data" / "*.jsonl")]}, {}, seed)  # fmt: skip
        gen_cfg = out / f"gen-s{seed}.yaml"
        gen_cfg.write_text(json.dumps(gen))
        row: dict[str, Any] = {}
        if seed == args.seeds[0] and not args.keep:
            row["cost"] = _cost(gen_cfg, prompts, gen_out, tok, args.gen_batch, args.rounds)
            if args.cost_only:
                (out / "cost.json").write_text(json.dumps(row["cost"], indent=1))
                print(json.dumps(row["cost"]))
                return
        else:
            argv = ["lm", "generate", str(gen_cfg), "--prompts", str(prompts), "--out",
                    str(gen_out), "--max-new-tokens", "64", "--keep-unfinished", "--seed",
                    str(seed), "--no-progress", "--device", "cpu",
                    "--batch-size", str(args.gen_batch)]  # fmt: skip
            assert kdkit(argv) == 0
        budget = round(_trained_tokens(gen, tok) * 0.95)  # the rows left after val.split
        corpus = _corpus_prefix(files[0], tok, budget, out / f"corpus-s{seed}.txt", gen)
        cdata = {"text_files": [str(corpus)], "val": {"text_files": [str(files[1])]}}
        # "-steps": the corpus in as many optimizer steps as the generated rows (they are
        # shorter: a prompt is context, not trained), a smaller batch of the same tokens
        packed = _rows(
            {
                **gen,
                "data": {
                    **gen["data"],
                    **cdata,
                    "format": "text",
                    "loss_on": "all",
                    "pack": True,
                    "val": None,
                },
            },
            tok,
        )
        steps_batch = max(1, round(cfg.batch_size * len(packed) / len(_rows(gen, tok))))
        sdata = {**cdata, "batch_size": steps_batch}
        runs = {
            "corpus-kd": (f"hf:{teacher_dir}", cdata, {}),
            "corpus-ce": (None, cdata, {}),
            "corpus-kd-steps": (f"hf:{teacher_dir}", sdata, {}),
            "corpus-ce-steps": (None, sdata, {}),
            "sft": (None, gen["data"], {}),
            "kd": (f"cache:{gen_out}", gen["data"], {}),
            "both": (f"cache:{gen_out}", gen["data"], {"ce_weight": 0.5}),
        }  # fmt: skip
        row["tokens"] = {"budget": budget, "steps_batch": steps_batch}
        for name in args.only:
            t, data, distill = runs[name]
            c = _config(cfg, name, out / f"s{seed}", student, t, data, distill, seed)
            if name == "sft":
                c["student"]["tokenizer"] = str(gen_out / "tokenizer")
            if name.startswith("corpus"):
                c["data"] = {**c["data"], "pack": True}
                row["tokens"][name] = _trained_tokens(c, tok)
            start = time.perf_counter()
            result = train_run(resolve_paths(load_config(data=c)))
            wall = time.perf_counter() - start
            row[name] = {**_scores(result.run_dir, teacher, test_batches), "train_s": wall}
            print(seed, name, row[name], flush=True)
        results["seeds"][seed] = row
        (out / f"results-{'-'.join(args.only)}.json").write_text(json.dumps(results, indent=1))
    print(_table(results))


def _table(results: dict[str, Any]) -> str:
    rows = list(results["seeds"].values())

    def stat(name: str, key: str) -> str:
        values = [r[name][key] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    names = [n for n in RECIPES if n in rows[0]]
    base = statistics.mean(r[names[0]]["ppl"] for r in rows)
    lines = [f"| recipe | test ppl | vs {names[0]} | agreement (%) | KL | train (s) |",
             "|---|---:|---:|---:|---:|---:|",
             f"| teacher | {results['teacher_ppl']:.2f} | | 100 | 0 | |"]  # fmt: skip
    for name in names:
        ppl = statistics.mean(r[name]["ppl"] for r in rows)
        lines.append(f"| {name} | {stat(name, 'ppl')} | {ppl / base:.3f} | {stat(name, 'agree')} "
                     f"| {stat(name, 'kl')} | {statistics.mean(r[name]['train_s'] for r in rows):.0f} |")  # fmt: skip
    cost = rows[0].get("cost")
    if cost:
        lines += ["", json.dumps(cost), "one pass / two passes: "
                  f"wall {cost['one_pass_s'] / cost['two_pass_s']:.3f}, "
                  f"CPU {cost['one_pass_cpu_s'] / cost['two_pass_cpu_s']:.3f}, "
                  f"FLOPs {cost['one_pass_gflop'] / cost['two_pass_gflop']:.3f}"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
