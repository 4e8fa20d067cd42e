"""kdkit against TRL on the same rows, each run in a fresh process: wall time, peak RSS, tokens/s.

Off-policy: kdkit ``task: lm`` (jsd, beta 0.5, online teacher) against TRL's
``GKDTrainer(lmbda=0, beta=0.5)``. On-policy: kdkit ``distill.on_policy`` (lambda 1, at most 32
new tokens, sampling temperature 1) against ``GKDTrainer(lmbda=1, max_new_tokens=32,
temperature=1)`` and against TRL's ``DistillationTrainer`` (the stable on-policy trainer: the
user turns as prompts, ``max_completion_length=32``, beta 0.5, fp32, no gradient checkpointing;
its ``tokens`` are the same rows' for the rate). The same teacher (the ``kdkit demo lm``
teacher when it is cached, else a random Llama of its shape), the same student (a random
Llama, hidden 64, 2 layers), the same 64 chat rows (prompt: 100 characters of the Python docs
/ stdlib, reply: the next 200), rendered by the same chat template, max_length 128 cut at
the end on both sides (TRL's truncation; ``data.truncation: right`` in kdkit), batch 16, AdamW
lr 1e-3, 2 epochs, one thread. Rounds interleave the five runs; the first round warms the disk cache and is dropped.

``wall s``: the process, start to exit (imports, model loading, tokenizing, training);
``train s``: the training call alone; ``tokens/s``: the rows' tokens x epochs over ``train s``
(on-policy runs train on their own samples: the same rows' prompts, other completions).

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_trl.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_LENGTH, BATCH, EPOCHS, NEW = 128, 16, 2, 32
RUNS = ("kdkit-off", "trl-off", "kdkit-on", "trl-on", "trl-distill")


def examples(n: int = 64) -> list[dict]:
    doc = Path("/usr/share/doc/python3.11/html/_sources/tutorial/classes.rst.txt")
    text = doc.read_text() if doc.is_file() else Path(json.__file__).read_text()
    text = (text * 4)[: 300 * n]
    return [
        {"messages": [{"role": "user", "content": text[i * 300 : i * 300 + 100]},
                      {"role": "assistant", "content": text[i * 300 + 100 : (i + 1) * 300]}]}
        for i in range(n)
    ]  # fmt: skip


def setup(work: Path) -> None:
    """The tokenizer, teacher and student folders and the rows, written once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdkit.lm.tokenizer import train_bpe_tokenizer

    cached = next(Path.home().glob(".cache/kdkit/lm-demo/*/teacher"), None)
    data = examples()
    (work / "chat.jsonl").write_text("".join(json.dumps(e) + "\n" for e in data))
    if cached is not None:
        os.symlink(cached, work / "teacher")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    else:
        texts = [m["content"] for e in data for m in e["messages"]]
        tok_dir = train_bpe_tokenizer(texts * 4, 2048, work / "tok")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    shape = {"vocab_size": len(tok), "max_position_embeddings": MAX_LENGTH,
             "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
             "bos_token_id": tok.bos_token_id, "tie_word_embeddings": False}  # fmt: skip
    torch.manual_seed(0)
    if cached is None:
        teacher = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=512,
                                               num_hidden_layers=4, num_attention_heads=4,
                                               num_key_value_heads=4, **shape))  # fmt: skip
        teacher.save_pretrained(work / "teacher")
        tok.save_pretrained(work / "teacher")
    student = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=256,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=2, **shape))  # fmt: skip
    student.save_pretrained(work / "student")
    tok.save_pretrained(work / "student")


def run_kdkit(work: Path, on_policy: bool) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from kdkit import Trainer
    from kdkit.lm import Aligner, LMTask, OnPolicy, TokenInputs, load_lm_dataset
    from kdkit.lm.models import load_lm

    student, tok = load_lm(f"hf:{work / 'student'}")
    teacher, _ = load_lm(f"hf:{work / 'teacher'}")
    ds = load_lm_dataset([work / "chat.jsonl"], tok, format="chat", loss_on="assistant",
                         max_length=MAX_LENGTH, truncation="right")  # fmt: skip
    aligner = Aligner(tok.pad_token_id, MAX_LENGTH)
    op = OnPolicy(1.0, NEW, 1.0, eos_token_id=tok.eos_token_id, aligner=aligner)
    task = LMTask(student, teacher, divergence="jsd", beta=0.5, on_policy=op if on_policy else None)
    loader = DataLoader(ds, batch_size=BATCH, collate_fn=aligner, shuffle=False)
    trainer = Trainer(task, loader, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                      inputs=TokenInputs("cpu"), epochs=EPOCHS, progress=False, device="cpu")  # fmt: skip
    start = time.perf_counter()
    trainer.fit()
    return {"train_s": time.perf_counter() - start, "tokens": sum(len(r) for r in ds.rows)}


def _tokens(tok: object, chats: list[list[dict]]) -> int:
    """The rows' tokens as both sides train on them: chat template, cut at ``MAX_LENGTH``."""
    texts = [tok.apply_chat_template(m, tokenize=False) for m in chats]
    return sum(min(len(tok(t, add_special_tokens=False)["input_ids"]), MAX_LENGTH) for t in texts)


def run_trl(work: Path, on_policy: bool) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(str(work / "student"), local_files_only=True)
    student = AutoModelForCausalLM.from_pretrained(str(work / "student"), local_files_only=True)
    teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher"), local_files_only=True)
    data = load_dataset("json", data_files=str(work / "chat.jsonl"), split="train")
    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(
            output_dir=out, per_device_train_batch_size=BATCH, lmbda=1.0 if on_policy else 0.0,
            beta=0.5, max_new_tokens=NEW, temperature=1.0, num_train_epochs=EPOCHS,
            logging_steps=10_000, report_to=[], use_cpu=True, save_strategy="no",
            max_length=MAX_LENGTH, learning_rate=1e-3, disable_tqdm=True,
            dataloader_num_workers=0, seed=0,
        )  # fmt: skip
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                             train_dataset=data, processing_class=tok)  # fmt: skip
        tokens = _tokens(tok, data["messages"])
        start = time.perf_counter()
        trainer.train()
        return {"train_s": time.perf_counter() - start, "tokens": tokens}


def run_trl_distill(work: Path) -> dict:
    """TRL's on-policy ``DistillationTrainer`` (the stable API): the rows' user turns as
    prompts, 32 sampled tokens each, generalized JSD beta 0.5; fp32, no gradient checkpointing
    (its defaults are bf16 and checkpointing, which a CPU run of kdkit does not do either)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    tok = AutoTokenizer.from_pretrained(str(work / "student"), local_files_only=True)
    student = AutoModelForCausalLM.from_pretrained(str(work / "student"), local_files_only=True)
    teacher = AutoModelForCausalLM.from_pretrained(str(work / "teacher"), local_files_only=True)
    data = load_dataset("json", data_files=str(work / "chat.jsonl"), split="train")
    tokens = _tokens(tok, data["messages"])
    data = data.map(lambda r: {"prompt": r["messages"][:1]}, remove_columns=["messages"])
    with tempfile.TemporaryDirectory() as out:
        args = DistillationConfig(
            output_dir=out, per_device_train_batch_size=BATCH, beta=0.5,
            max_completion_length=NEW, temperature=1.0, num_train_epochs=EPOCHS,
            logging_steps=10_000, report_to=[], use_cpu=True, save_strategy="no",
            learning_rate=1e-3, disable_tqdm=True, bf16=False, gradient_checkpointing=False,
            dataloader_num_workers=0, seed=0, shuffle_dataset=False,
        )  # fmt: skip
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=data, processing_class=tok)  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        return {"train_s": time.perf_counter() - start, "tokens": tokens}


def one(name: str, work: Path) -> None:
    import torch

    torch.set_num_threads(1)
    side, mode = name.split("-")
    if mode == "distill":
        result = run_trl_distill(work)
    else:
        result = (run_kdkit if side == "kdkit" else run_trl)(work, mode == "on")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(args.one, Path(args.work))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-lm-trl-"))
    setup(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in RUNS:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--one", name, "--work", str(work)],
                                  env=env, capture_output=True, text=True, check=False)  # fmt: skip
            wall = time.perf_counter() - start
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            row = {**json.loads(line[7:]), "wall_s": wall}
            print(f"round {r} {name}: {json.dumps(row)}", flush=True)
            if r:
                results[name].append(row)
    print(f"\n{args.rounds} rounds, median (min-max); one thread; work folder {work}\n")
    print("| run | wall s | train s | peak RSS MB | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in results.items():

        def cell(key: str, fmt: str, rows: list[dict] = rows) -> str:
            v = [x[key] for x in rows]
            return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}-{max(v):{fmt}})"

        rate = [x["tokens"] * EPOCHS / x["train_s"] for x in rows]
        print(f"| {name} | {cell('wall_s', '.1f')} | {cell('train_s', '.1f')} | "
              f"{cell('peak_rss_mb', '.0f')} | {statistics.median(rate):,.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
