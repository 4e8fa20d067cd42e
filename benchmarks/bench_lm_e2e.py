"""End-to-end tokens/s of a KD step: kdkit's ``task: lm`` loop against TRL's
``GKDTrainer(lmbda=0)`` (supervised / off-policy GKD, generalized JSD beta 0.5, online
teacher), the student's own step and the teacher's forward; the same teacher, student, chat
examples and batch size, interleaved rounds, one thread count per process (``--threads``).

Every row trains on the same 64 chat examples (prompt: a slice of the Python docs,
completion: the text after it), rendered by the same tokenizer's chat template, batch 16,
max_length 128, AdamW lr 1e-3, ``--epochs`` passes. tokens/s counts the examples' tokens
(the same number for every row) over the wall time of the training steps; the first round
warms up and is dropped. Rows:

  student        the student's own step: its logits, cross-entropy on the completion tokens,
                 AdamW (no teacher, no kdkit)
  scratch        kdkit's ``teacher: null`` (``LMTask(student, None)``): cross-entropy alone
  teacher        the teacher's forward alone (its final hidden states, what kdkit reads)
  cached         kdkit from a top-32 ``kdkit lm capture`` of the same teacher (captured once
                 before the rounds; its time printed apart)
  online         kdkit, live teacher, ``train.overlap: auto`` (its choice made before the clock,
                 as ``kdkit train``'s builder makes it)
  online-seq     the same, ``overlap: false`` (the teacher before the student)
  trl            TRL ``GKDTrainer(lmbda=0, beta=0.5)``
  student-1t, teacher-1t  (``--threads`` > 1) the same two at one thread, for the work bound

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_e2e.py --threads 1 --rounds 3 --epochs 2
    OMP_NUM_THREADS=2 python benchmarks/bench_lm_e2e.py --threads 2 --rounds 3 --epochs 2

The teacher is the LM demo's (``kdkit demo lm``), else a random-init Llama of its shape with a
tokenizer trained here on the demo's text (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _bounds import on_threads, sequential_bound, work_bound

DOC = "/usr/share/doc/python3.11/html/_sources/tutorial/classes.rst.txt"


def examples(n: int = 64) -> list[dict]:
    path = Path(DOC)
    text = path.read_text() if path.is_file() else Path(json.__file__).read_text()
    text = (text * 4)[: 300 * n]
    out = []
    for i in range(n):
        c = text[i * 300 : (i + 1) * 300]
        out.append({"messages": [{"role": "user", "content": c[:100]},
                                 {"role": "assistant", "content": c[100:]}]})  # fmt: skip
    return out


def models(teacher_dir: Path, tok):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), local_files_only=True)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), teacher


def run_trl(teacher_dir, tok, data, epochs: int) -> float:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, teacher = models(teacher_dir, tok)
    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(
            output_dir=out, per_device_train_batch_size=16, lmbda=0.0, beta=0.5,
            num_train_epochs=epochs, logging_steps=10_000, report_to=[], use_cpu=True,
            save_strategy="no", max_length=128, learning_rate=1e-3, disable_tqdm=True,
            dataloader_num_workers=0,
        )  # fmt: skip
        trainer = GKDTrainer(
            model=student, teacher_model=teacher, args=args,
            train_dataset=Dataset.from_list(data), processing_class=tok,
        )  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def run_kdkit(teacher_dir, tok, data, epochs: int, cache=None, overlap="auto", no_teacher=False):
    """kdkit's loop with the online teacher, or (``cache``) from the top-k cache: the teacher
    is then never loaded or run; ``no_teacher``: the scratch baseline. Returns (seconds,
    tokens, the overlap choice's line)."""
    from torch.utils.data import DataLoader

    from kdkit import Trainer
    from kdkit.lm import Aligner, LMTask, TokenInputs, load_lm_dataset

    student, teacher = models(teacher_dir, tok)
    teacher = None if no_teacher else teacher if cache is None else cache
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "chat.jsonl"
        path.write_text("\n".join(json.dumps(e) for e in data) + "\n")
        ds = load_lm_dataset(  # cut at the end, as TRL does (data.truncation: right)
            [path], tok, format="chat", loss_on="assistant", max_length=128, truncation="right"
        )
    collate = Aligner(tok.pad_token_id, 128)
    if cache is not None:
        collate = cache.collate(collate, "bucket")
    loader = DataLoader(ds, batch_size=16, collate_fn=collate)
    task = LMTask(student, teacher, divergence="jsd", beta=0.5)
    trainer = Trainer(
        task, loader, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        inputs=TokenInputs("cpu"), epochs=epochs, progress=False, device="cpu", overlap=overlap,
    )  # fmt: skip
    choice = trainer.plan()[-1].line()  # before the clock, as kdkit train's builder does
    start = time.perf_counter()
    trainer.fit()
    tokens = sum(len(r) for r in ds.rows)
    return time.perf_counter() - start, tokens, choice


def batches_of(tok, data) -> list:
    """The rows' batches as kdkit's loader collates them (for the student and teacher rows)."""
    from torch.utils.data import DataLoader

    from kdkit.lm import Aligner, load_lm_dataset

    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "chat.jsonl"
        path.write_text("\n".join(json.dumps(e) for e in data) + "\n")
        ds = load_lm_dataset(  # TRL's rows are cut at 128 too: the same tokens on both sides
            [path], tok, format="chat", loss_on="assistant", max_length=128, truncation="right"
        )
    return list(DataLoader(ds, batch_size=16, collate_fn=Aligner(tok.pad_token_id, 128)))


def run_student(teacher_dir, tok, batches, epochs: int) -> float:
    """The student's own step: logits, cross-entropy on the trained positions, AdamW."""
    import torch.nn.functional as F

    student, _ = models(teacher_dir, tok)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        for b in batches:
            logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            loss = F.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def run_teacher(teacher_dir, tok, batches, epochs: int) -> float:
    """The teacher's forward alone, to its final hidden states (what kdkit's loss reads)."""
    from kdkit.lm.models import hidden_and_head

    _, teacher = models(teacher_dir, tok)
    teacher.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(epochs):
            for b in batches:
                hidden_and_head(teacher, **b.model_inputs())
    return time.perf_counter() - start


def bench_teacher(work: Path) -> Path:
    """The LM demo's cached teacher, else a random-init Llama of its shape (speed does not
    depend on the weights) with a tokenizer trained here on the demo's text."""
    found = next(Path.home().glob(".cache/kdkit/lm-demo/*/teacher"), None)
    if found is not None:
        return found
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdkit.lm.tokenizer import train_bpe_tokenizer
    from kdkit.run.lm_demo import LMDemoConfig, llama_folder, write_splits

    cfg = LMDemoConfig()
    train, _, _, _ = write_splits(cfg, work)
    tok = AutoTokenizer.from_pretrained(
        str(train_bpe_tokenizer([train], cfg.vocab, work / "tokenizer")), local_files_only=True
    )
    folder = llama_folder(work / "teacher", tok, cfg.teacher, cfg.max_length)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.from_pretrained(folder)
    ).save_pretrained(folder)
    return folder


def capture_cache(teacher_dir, data, out: Path) -> tuple[object, float]:
    """``kdkit lm capture`` (top-32, q8) of the teacher over the same chats; its wall time."""
    from kdkit.config import load_config, resolve_paths
    from kdkit.lm.cache import TopKCache
    from kdkit.run.lm_job import capture_run

    path = out / "chat.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in data) + "\n")
    raw = {
        "task": "lm",
        "student": {"model": f"hf:{teacher_dir}"},
        "teacher": {"model": f"hf:{teacher_dir}"},
        "data": {"text_files": [str(path)], "format": "chat", "loss_on": "assistant",
                 "max_length": 128, "pack": False, "truncation": "right", "batch_size": 16},
    }  # fmt: skip
    start = time.perf_counter()
    capture_run(resolve_paths(load_config(data=raw)), out / "cache", topk=32, progress=False)
    return TopKCache(out / "cache"), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-lm-e2e-"))
    teacher_dir = bench_teacher(work)
    tok = AutoTokenizer.from_pretrained(str(teacher_dir), local_files_only=True)
    data = examples()
    batches = batches_of(tok, data)
    cache, capture_s = capture_cache(teacher_dir, data, work)
    rows = {
        "student": lambda: run_student(teacher_dir, tok, batches, args.epochs),
        "scratch": lambda: run_kdkit(teacher_dir, tok, data, args.epochs, no_teacher=True),
        "teacher": lambda: run_teacher(teacher_dir, tok, batches, args.epochs),
        "cached": lambda: run_kdkit(teacher_dir, tok, data, args.epochs, cache),
        "online": lambda: run_kdkit(teacher_dir, tok, data, args.epochs),
        "online-seq": lambda: run_kdkit(teacher_dir, tok, data, args.epochs, overlap=False),
        "trl": lambda: run_trl(teacher_dir, tok, data, args.epochs),
    }
    if args.threads > 1:
        rows["student-1t"] = on_threads(rows["student"], 1)
        rows["teacher-1t"] = on_threads(rows["teacher"], 1)
    times: dict[str, list[float]] = {name: [] for name in rows}
    choices: list[str] = []
    tokens = sum(int(b.attention_mask.sum()) for b in batches) * args.epochs
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, row in rows.items():
            got = row()
            if isinstance(got, tuple):
                got, _, choice = got
                if name == "online":
                    choices.append(choice)
            if r:
                times[name].append(got)
        line = ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v and r)
        print(f"round {r} (load {os.getloadavg()[0]:.2f}): {line}", flush=True)
    rate = {k: tokens / statistics.median(v) for k, v in times.items()}
    n = args.threads
    one = {1: rate.get("student-1t")} if n > 1 else {}
    seq = sequential_bound(rate["student"], rate["teacher"])
    work_b = work_bound(
        n,
        {n: rate["student"], **one},
        {n: rate["teacher"], **({1: rate["teacher-1t"]} if n > 1 else {})},
    )
    print(
        f"\n{tokens:,} tokens per run ({len(data)} chats x {args.epochs} epochs), {n} thread(s)\n"
    )
    print("| row | median s | tokens/s | x TRL | % of student | % of work bound |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in rows:
        med = statistics.median(times[name])
        print(
            f"| {name} | {med:.2f} | {rate[name]:,.0f} | {rate[name] / rate['trl']:.2f}x "
            f"| {100 * rate[name] / rate['student']:.0f}% | {100 * rate[name] / work_b:.0f}% |"
        )
    print(f"| sequential bound | | {seq:,.0f} | {seq / rate['trl']:.2f}x | | |")
    print(f"| work bound | | {work_b:,.0f} | {work_b / rate['trl']:.2f}x | | 100% |")
    print(f"\ncapture of the cache (once, not in the rows): {capture_s:.2f} s")
    print("online's overlap choices:", *sorted(set(choices)), sep="\n- ")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "threads": n,
                    "times": times,
                    "tokens": tokens,
                    "choices": choices,
                    "load": os.getloadavg()[0],
                }
            )
        )


if __name__ == "__main__":
    main()
