"""End-to-end tokens/s of a KD step: kdkit's ``task: lm`` loop against TRL's
``GKDTrainer(lmbda=0)`` (supervised / off-policy GKD, generalized JSD beta 0.5, online
teacher), the same teacher, student, chat examples and batch size, interleaved rounds.

Both sides train on the same 64 chat examples (prompt: a slice of the Python docs, completion:
the text after it), rendered by the same tokenizer's chat template, batch 16, max_length 128,
AdamW lr 1e-3. tokens/s counts the examples' tokens (the same number on both sides) over the
wall time of the training steps; the first round warms up and is dropped.

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_e2e.py --rounds 3 --epochs 2

The third row trains from a top-32 ``kdkit lm capture`` of the same teacher over the same chats
(captured once before the rounds; its time is printed apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

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


def run_kdkit(teacher_dir, tok, data, epochs: int, cache=None) -> tuple[float, int]:
    """kdkit's loop with the online teacher, or (``cache``) from the top-k cache: the teacher
    is then never loaded or run."""
    from torch.utils.data import DataLoader

    from kdkit import Trainer
    from kdkit.lm import Aligner, LMTask, TokenInputs, load_lm_dataset

    student, teacher = models(teacher_dir, tok)
    teacher = teacher if cache is None else cache  # the same weights, captured once
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
        inputs=TokenInputs("cpu"), epochs=epochs, progress=False, device="cpu",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit()
    tokens = sum(len(r) for r in ds.rows)
    return time.perf_counter() - start, tokens


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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    teacher_dir = next(Path.home().glob(".cache/kdkit/lm-demo/*/teacher"), None)
    if teacher_dir is None:
        raise SystemExit("run `kdkit demo lm` first: this benchmark uses its cached teacher")
    tok = AutoTokenizer.from_pretrained(str(teacher_dir), local_files_only=True)
    data = examples()
    times: dict[str, list[float]] = {"trl": [], "kdkit": [], "cached": []}
    tokens = 0
    work = Path(tempfile.mkdtemp(prefix="bench-lm-e2e-"))
    cache, capture_s = capture_cache(teacher_dir, data, work)
    for r in range(args.rounds + 1):  # round 0 warms up
        t_trl = run_trl(teacher_dir, tok, data, args.epochs)
        t_kd, tokens = run_kdkit(teacher_dir, tok, data, args.epochs)
        t_cached, _ = run_kdkit(teacher_dir, tok, data, args.epochs, cache)
        if r:
            times["trl"].append(t_trl)
            times["kdkit"].append(t_kd)
            times["cached"].append(t_cached)
        print(
            f"round {r}: trl {t_trl:.2f} s, kdkit {t_kd:.2f} s, cached {t_cached:.2f} s",
            flush=True,
        )
    total = tokens * args.epochs
    base = total / statistics.median(times["trl"])
    print(f"\n{total:,} tokens per run ({len(data)} chats x {args.epochs} epochs), 1 thread\n")
    print("| row | median s | tokens/s | x TRL |")
    print("|---|---:|---:|---:|")
    labels = {
        "trl": "TRL GKDTrainer(lmbda=0, beta=0.5), online teacher",
        "kdkit": "kdkit task: lm (jsd, beta 0.5), online teacher",
        "cached": "kdkit from the top-32 cache (jsd, beta 0.5, tail bucket), no teacher",
    }
    for name, label in labels.items():
        med = statistics.median(times[name])
        print(f"| {label} | {med:.2f} | {total / med:,.0f} | {total / med / base:.2f}x |")
    print(f"\ncapture of the cache (once, not in the rows): {capture_s:.2f} s")


if __name__ == "__main__":
    main()
