"""LM teacher hidden-state throughput on the CPU: eager PyTorch vs ONNX Runtime fp32 vs int8.

The teacher is the LM demo's shape (kdkit/run/lm_demo.py: Llama, hidden 128, 4 layers, 4
heads, MLP 512, vocabulary 2048, 128 positions; 1.6 M parameters), its tokenizer a byte-level
BPE trained here on the demo's corpus (the Python documentation sources). Speed does not
depend on the weights, so the timing may use a random init; the int8 fidelity numbers do, so
the teacher is first fitted for ``--train-steps`` AdamW steps on the corpus (0: random init,
whose near-uniform distributions make agreement meaningless).

1. Fidelity: the int8 teacher against fp32 (:func:`kdkit.lm.onnx_teacher.check_lm_fidelity`,
   the gate's own measure) on ``--probe-rows`` held-out rows: token top-1 agreement, mean KL.
2. Throughput: one ``[batch, max_length]`` batch of real rows through each teacher to its
   final hidden states (what the fused loss and capture read), one thread on both runtimes,
   the three interleaved for ``--repeats`` rounds after a warm-up; tokens/s from the median,
   and each row's ratio to eager in the same run.

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_teacher.py --repeats 15 --train-steps 150
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def corpus(chars: int) -> str:
    from kdkit.run.lm_demo import demo_corpus

    files, source = demo_corpus()
    text, n = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text.append(t)
        n += len(t)
        if n >= chars:
            break
    print(f"corpus: {source}, {min(n, chars):,} characters")
    return "\n\n".join(text)[:chars]


def teacher(vocab: int, length: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def fit(model, rows: torch.Tensor, steps: int, batch: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        b = rows[torch.randint(0, len(rows), (batch,), generator=g)]
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=300_000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--probe-rows", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoTokenizer

    from kdkit.lm.align import Aligner
    from kdkit.lm.data import TokenRow
    from kdkit.lm.models import hidden_and_head
    from kdkit.lm.onnx_teacher import OnnxLMTeacher, check_lm_fidelity
    from kdkit.lm.tokenizer import train_bpe_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-lm-teacher-"))
    text = corpus(args.chars)
    tok = AutoTokenizer.from_pretrained(str(train_bpe_tokenizer([text], 2048, work / "tok")))
    ids = torch.tensor(tok(text)["input_ids"])
    n = args.length
    rows = ids[: len(ids) // n * n].view(-1, n)
    train, held = rows[: -args.probe_rows - args.batch], rows[-args.probe_rows - args.batch :]
    model = teacher(len(tok), n)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    start = time.perf_counter()
    loss = fit(model, train, args.train_steps, 16) if args.train_steps else float("nan")
    print(
        f"teacher: {params:.2f} M parameters, {args.train_steps} training steps "
        f"(final train CE {loss:.2f}, {time.perf_counter() - start:.0f} s)"
    )

    aligner = Aligner(pad_id=0, max_length=n)
    batches = [
        aligner([TokenRow.of(r.tolist()) for r in held[i : i + 8]])
        for i in range(0, args.probe_rows, 8)
    ]
    start = time.perf_counter()
    fp32 = OnnxLMTeacher.from_model(model, cache_dir=work / "onnx", threads=1)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = OnnxLMTeacher.from_model(
        model, precision="int8", probe=batches, cache_dir=work / "onnx", threads=1,
        min_agreement=0.0, max_kl=None,
    )  # fmt: skip
    int8_s = time.perf_counter() - start
    report = int8.fidelity
    eager_vs_ort = check_lm_fidelity(model, fp32, batches, min_agreement=0.0, max_kl=None)
    print(f"export {export_s:.1f} s, quantize + gate {int8_s:.1f} s")
    print(
        f"fidelity (int8 vs fp32, {report.n_probe} held-out tokens): top-1 agreement "
        f"{report.top1_agreement:.2%}, mean KL {report.mean_kl:.2e} nats/token, "
        f"max |logit diff| {report.max_abs_diff:.3g}; ORT fp32 vs eager: max |logit diff| "
        f"{eager_vs_ort.max_abs_diff:.2g}"
    )
    sizes = {k: os.path.getsize(t.path) / 2**20 for k, t in (("fp32", fp32), ("int8", int8))}
    print(f"file sizes: fp32 {sizes['fp32']:.2f} MiB, int8 {sizes['int8']:.2f} MiB")

    batch = aligner([TokenRow.of(r.tolist()) for r in held[-args.batch :]])
    inputs = (batch.input_ids, batch.position_ids, batch.attention_mask)
    runners = {
        "eager PyTorch (sdpa)": model,
        "ONNX Runtime fp32": fp32,
        "ONNX Runtime int8 (dynamic)": int8,
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.no_grad():
        for r in range(args.repeats + 1):
            for name, m in runners.items():
                start = time.perf_counter()
                hidden_and_head(m, *inputs)
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
    tokens = args.batch * n
    eager = statistics.median(times["eager PyTorch (sdpa)"])
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"onnxruntime {__import__('onnxruntime').__version__}, 1 thread, batch "
        f"{args.batch} x {n} tokens, median of {args.repeats} interleaved rounds\n"
    )
    print("| teacher | median ms / batch | tokens/s | x eager |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {tokens / med:,.0f} | {eager / med:.2f}x |")


if __name__ == "__main__":
    main()
