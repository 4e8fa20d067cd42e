"""What issue 34 costs: the fused loss with a family's after-head transform, and packed rows.

Two tables, every row in its own subprocess (no allocator state leaks between rows), one
thread, fp32, CPU. Peak = the process's peak RSS increase over the resident size after the
inputs are built (:class:`kdkit.bench.memory.PeakMemory`, glibc's mmap threshold fixed at
128 KiB), over every rep; time = median of ``--reps`` timed calls after one warm-up. Ratios are
against a baseline of the same run.

1. ``--loss``: forward + backward of the loss alone, N=2048 tokens, V=32000, student hidden
   256, teacher hidden 512 (the shapes of ``bench_lm_loss.py``), forward KL at T=1. Rows: the
   dense reference *with* the transform (full ``[N, V]`` logits through autograd, the
   baseline), kdkit's fused loss without a transform, with Gemma's soft-cap (30, on student and
   teacher) and with Cohere's logit scale (0.0625). The memory bound is <= 0.15x dense.
2. ``--packing``: one training step of a small Llama (hidden 64, 2 layers, 4 heads, sdpa) on
   ``B`` rows of L=4096 tokens: the collate (``Aligner``), the forward to the final hidden
   states and a backward of their sum. Rows: B rows of one document each (the baseline);
   packed rows of 8 documents the way kdkit 0.1 did it (a ``[B, 1, L, L]`` bool mask in the
   collate, turned into an additive float mask of the model's dtype for every forward,
   reproduced here); the same documents as a ``[B, 1, L, L]`` bool mask (what transformers'
   sdpa path builds itself, measured apart); packed rows now (``position_ids``, the model's own
   masks).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bench_lm_families.py [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

N, V, H_S, H_T = 2048, 32000, 256, 512
LOSS_ROWS = ["dense softcap", "kdkit none", "kdkit softcap", "kdkit scale"]
PACK_ROWS = ["rows", "packed before", "packed bool mask", "packed after"]
LENGTH, DOCS = 4096, 8


# -- loss rows -----------------------------------------------------------------------------------
def _loss_step(row: str):
    import torch

    from kdkit.lm.divergence import divergence_value
    from kdkit.lm.fused import DenseTeacher, token_divergence
    from kdkit.lm.logits import IDENTITY, OutputTransform

    torch.manual_seed(0)
    h = torch.randn(N, H_S, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(V, H_S) * H_S**-0.5 * 8)  # logits of ~+-30: the cap bites
    ht, wt = torch.randn(N, H_T), torch.randn(V, H_T) * H_T**-0.5 * 8
    kind = row.split()[1]
    transform = {
        "none": IDENTITY,
        "softcap": OutputTransform(softcap=30.0),
        "scale": OutputTransform(scale=0.0625),
    }[kind]
    if row.startswith("dense"):

        def step():
            s, t = transform(h @ w.T), transform(ht @ wt.T)
            lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
            loss = divergence_value("fkl", lq, lp).mean()
            loss.backward()
            return float(loss.detach())

    else:

        def step():
            out = token_divergence(
                h, w, DenseTeacher(ht, wt, transform), divergence="fkl", student_transform=transform
            )
            out.loss.backward()
            return float(out.loss.detach())

    return step, (h, w), {}


# -- packing rows --------------------------------------------------------------------------------
def _pack_step(row: str, rows: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdkit.lm.align import Aligner
    from kdkit.lm.data import TokenRow

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LENGTH,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    decoder = model.get_decoder()
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, 512, (LENGTH,), generator=g).tolist() for _ in range(rows)]
    doc = [i * DOCS // LENGTH for i in range(LENGTH)] if row != "rows" else [0] * LENGTH
    token_rows = [TokenRow.of(x, doc_ids=doc) for x in ids]
    aligner = Aligner(pad_id=0, max_length=LENGTH)

    made = {"mask_mb": 0.0}  # what kdkit itself allocates for the masks of one step

    def step():
        batch = aligner(token_rows)
        if row == "packed before":  # kdkit 0.1: a bool mask in the collate, a float one per step
            block = batch.block_mask()
            additive = torch.zeros(block.shape).masked_fill(~block, torch.finfo(torch.float32).min)
            inputs = dict(position_ids=batch.position_ids, attention_mask=additive)
            made["mask_mb"] = (block.nbytes + additive.nbytes) / 2**20
        elif row == "packed bool mask":  # the same documents as a bool mask: what torch's sdpa
            block = batch.block_mask()  # does with one (converted to float in every layer)
            inputs = dict(position_ids=batch.position_ids, attention_mask=block)
            made["mask_mb"] = block.nbytes / 2**20
        else:
            inputs = dict(position_ids=batch.position_ids, attention_mask=batch.attention_mask)
            mask = batch.attention_mask
            made["mask_mb"] = 0.0 if mask is None else mask.nbytes / 2**20
        hidden = decoder(input_ids=batch.input_ids, use_cache=False, **inputs).last_hidden_state
        hidden.sum().backward()
        return float(hidden.detach().float().square().mean())

    return step, tuple(model.parameters()), made


def run_row(table: str, row: str, rows: int, reps: int) -> dict:
    import torch

    from kdkit.bench.memory import PeakMemory

    torch.set_num_threads(1)
    step, params, extra = _loss_step(row) if table == "loss" else _pack_step(row, rows)
    mem = PeakMemory(torch.device("cpu"), "eager")
    mem.reset_peak()
    times, value = [], None
    for i in range(reps + 1):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        value = step()
        if i:
            times.append(time.perf_counter() - t0)
    return {
        "row": row,
        "peak_mb": mem.peak_mb(),
        "time_s": statistics.median(times),
        "value": value,
        **extra,
    }


# -- the tables (parent) -------------------------------------------------------------------------
def _child(table: str, row: str, rows: int, reps: int) -> dict:
    # glibc's mmap threshold fixed: freed [rows, V] blocks go back to the OS, so the peak is the
    # loop's and not the allocator's history (the method of shared/LM-ANCHORS.md B)
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072"
    )
    cmd = [sys.executable, __file__, "--reps", str(reps), "--child", table, row, str(rows)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"row": row, "skip": f"exit {proc.returncode}: {tail[:200]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    sys.stderr.write(f"  {table} B={rows} {row}: {result}\n")
    return result


def _table(title: str, results: list[dict], base: str, value: str) -> None:
    ref = next(r for r in results if r["row"] == base)
    masks = any("mask_mb" in r for r in results)
    extra = " masks kdkit made, MiB |" if masks else ""
    print(f"\n{title}")
    print(f"| row | peak MiB | x {base} | time s | x {base} | {value} |{extra}")
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if masks else ""))
    for r in results:
        if "skip" in r:
            print(f"| {r['row']} | - | - | - | - | skipped: {r['skip']} |")
            continue
        made = f" {r['mask_mb']:.0f} |" if masks else ""
        print(
            f"| {r['row']} | {r['peak_mb']:.0f} | {r['peak_mb'] / ref['peak_mb']:.3f} | "
            f"{r['time_s']:.3f} | {r['time_s'] / ref['time_s']:.3f} | {r['value']:.6g} |{made}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--loss", action="store_true", help="the loss table only")
    ap.add_argument("--packing", action="store_true", help="the packing table only")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8], help="rows per packed batch")
    ap.add_argument("--child", nargs=3, metavar=("TABLE", "ROW", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        table, row, rows = args.child
        print(json.dumps(run_row(table, row, int(rows), args.reps)))
        return
    both = not (args.loss or args.packing)
    if args.loss or both:
        results = [_child("loss", row, 0, args.reps) for row in LOSS_ROWS]
        _table(
            f"Fused loss, N={N} V={V} H_s={H_S} H_t={H_T}, fkl, fp32, 1 thread, fwd+bwd, "
            f"{args.reps} reps",
            results,
            "dense softcap",
            "loss",
        )
    if args.packing or both:
        for rows in args.batch:
            results = [_child("pack", row, rows, args.reps) for row in PACK_ROWS]
            _table(
                f"Packed batch, B={rows} x L={LENGTH} ({DOCS} documents per packed row), Llama "
                f"h64 x 2 layers sdpa, collate + forward + backward, fp32, 1 thread",
                results,
                "rows",
                "mean h^2",
            )


if __name__ == "__main__":
    main()
