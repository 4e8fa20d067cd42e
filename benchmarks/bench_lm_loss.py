"""Peak memory and time of LM distillation losses, forward + backward of the loss alone (CPU).

What it measures: the loss from the student's final hidden states through its LM head, against
a teacher given as hidden states + head (no_grad), fp32, one thread. Shapes (LM-ANCHORS.md, E4):
N=2048 tokens / V=32000 and N=1024 / V=128256; student hidden 256, teacher hidden 512.

Rows, each in its own subprocess so that no row's allocator state leaks into another's:

- ``dense``: TRL's ``GKDTrainer.generalized_jsd_loss`` on full logits (or, if trl does not import,
  the same formula as a dense torch reference; the table says which).
- ``liger cN``: Liger's ``LigerFusedLinearJSDLoss(compiled=False)``, chunk size N rows.
- ``torchtune c8``: ``ForwardKLWithChunkedOutputLoss`` (8 chunks; forward-KL/CE, not JSD),
  loaded from its file when ``import torchtune`` is broken.
- ``kdkit jsd`` / ``kdkit fkl``: :func:`kdkit.lm.token_divergence` at the default budget.

Peak = the process's peak RSS (``VmHWM``) increase over the resident size after the inputs are
built (kdkit.bench's probe: gc + malloc_trim, then ``clear_refs`` resets the high-water mark); it
covers every rep, and includes the head's ``.grad``. Time = median of ``--reps`` timed
forward+backward calls after one warm-up. Ratios are against the dense row of the same run.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bench_lm_loss.py [--reps 3]
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bench_lm_loss.py --offline   # issue 20
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(2048, 32000), (1024, 128256)]
H_S, H_T = 256, 512
OFFLINE_ROWS = [
    "distillkit top128",
    "cached top128 drop b256",
    "cached top128 bucket b256",
    "cached top128 bucket b64",
]
ROWS = [
    "dense",
    "liger c128",
    "liger c256",
    "liger c1024",
    "torchtune c8",
    "kdkit jsd",
    "kdkit fkl",
]


# -- one row (child process) -------------------------------------------------------------------
def _torchtune_loss():
    try:
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        return ForwardKLWithChunkedOutputLoss, "package"
    except Exception:  # noqa: BLE001 - torchtune 0.6.1's package import fails with new torchao
        spec = importlib.util.find_spec("torchtune")
        if spec is None or not spec.submodule_search_locations:
            raise
        path = os.path.join(spec.submodule_search_locations[0], "modules", "loss", "kd_losses.py")
        mod_spec = importlib.util.spec_from_file_location("_tt_kd_losses", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod.ForwardKLWithChunkedOutputLoss, "file"


def _dense_jsd(student_logits, teacher_logits, beta=0.5):
    """TRL's generalized JSD (beta in (0, 1)), batchmean, as a dense torch reference."""
    import torch
    import torch.nn.functional as F

    s = F.log_softmax(student_logits, -1)
    t = F.log_softmax(teacher_logits, -1)
    b = torch.tensor(beta, dtype=s.dtype)
    m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
    jsd = b * F.kl_div(m, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
        m, s, reduction="none", log_target=True
    )
    return jsd.sum() / jsd.shape[0]


def _build_step(row: str, h, w, ht, wt, labels):
    """A zero-argument callable running forward + backward, and a note."""
    import torch

    if row == "dense":
        try:
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            from trl.experimental.gkd import GKDTrainer

            fn, note = GKDTrainer.generalized_jsd_loss, "trl GKDTrainer.generalized_jsd_loss"
        except Exception as err:  # noqa: BLE001
            fn, note = None, f"torch reference (trl: {type(err).__name__})"

        def step():
            s = h @ w.T
            with torch.no_grad():
                t = ht @ wt.T
            if fn is not None:
                loss = fn(s, t, beta=0.5)  # [N, V]: batchmean = mean over tokens
            else:
                loss = _dense_jsd(s, t)
            loss.backward()
            return float(loss)

        return step, note
    if row.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        chunk = int(row.split("c")[-1])
        fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=False, chunk_size=chunk
        )

        def step():
            loss = fn(h, w, ht, wt, labels)
            loss.backward()
            return float(loss)

        return step, "LigerFusedLinearJSDLoss(compiled=False)"
    if row.startswith("torchtune"):
        cls, how = _torchtune_loss()
        fn = cls(num_output_chunks=8)

        def step():
            s = [c @ w.T for c in h[None].chunk(8, dim=1)]
            with torch.no_grad():
                t = [c @ wt.T for c in ht[None].chunk(8, dim=1)]
            loss = fn(s, t, labels[None])
            loss.backward()
            return float(loss)

        return step, f"ForwardKLWithChunkedOutputLoss (fkl; loaded by {how})"
    if row.startswith("kdkit"):
        from kdkit.lm import DenseTeacher, token_divergence

        div = row.split()[-1]

        def step():
            out = token_divergence(h, w, DenseTeacher(ht, wt), divergence=div, beta=0.5)
            out.loss.backward()
            return float(out.loss)

        return step, f"token_divergence({div!r}, memory_budget_mb=256)"
    if row.startswith(("distillkit", "cached")):
        return _offline_step(row, h, w, ht, wt)
    raise SystemExit(f"unknown row {row!r}")


def _offline_step(row: str, h, w, ht, wt):
    """The offline rows: a cached top-128 teacher (ids, log-probs, tail), built here from the
    teacher's logits before the memory probe starts.

    - ``distillkit top128``: DistillKit's offline loss shape: the student's full ``[N, V]``
      logits materialized, log-softmax, gathered at the cached ids, sparse forward KL
      (``sum_k p log(p / q)``), token mean (``distillkit/lossfuncs``, read not run).
    - ``cached top128 TAIL bBUDGET``: kdkit's fused loss on the same cached targets, tail policy
      TAIL, ``memory_budget_mb`` BUDGET.
    """
    import torch

    from kdkit.lm import token_divergence
    from kdkit.lm.cache import TopKTarget

    with torch.no_grad():
        logp, ids = torch.log_softmax(ht @ wt.T, -1).topk(128, dim=-1)
        tail = torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-7))
    if row.startswith("distillkit"):

        def step():
            lq = torch.log_softmax(h @ w.T, -1).gather(1, ids)
            p = logp.exp()
            loss = (p * (logp - lq)).sum() / h.shape[0]
            loss.backward()
            return float(loss)

        return step, "student logits materialized, sparse fkl over the cached top-128"
    _, _, policy, budget = row.split()
    target = TopKTarget(ids, logp, tail, w.shape[0], policy=policy)
    mb = float(budget.removeprefix("b"))

    def step():
        out = token_divergence(h, w, target, divergence="fkl", memory_budget_mb=mb)
        out.loss.backward()
        return float(out.loss)

    return step, f"token_divergence(TopKTarget tail={policy!r}, memory_budget_mb={mb:g})"


def run_row(row: str, n: int, v: int, reps: int) -> dict:
    import torch

    from kdkit.bench.memory import PeakMemory

    torch.set_num_threads(1)
    torch.manual_seed(0)
    h = torch.randn(n, H_S, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(v, H_S) * H_S**-0.5)
    ht = torch.randn(n, H_T)
    wt = torch.randn(v, H_T) * H_T**-0.5 * 2.0
    labels = torch.randint(0, v, (n,))
    try:
        step, note = _build_step(row, h, w, ht, wt, labels)
    except Exception as err:  # noqa: BLE001 - a peer that does not import is skipped with why
        return {"row": row, "skip": f"{type(err).__name__}: {err}"[:160]}
    mem = PeakMemory(torch.device("cpu"), "eager")
    mem.reset_peak()
    times, loss = [], None
    for i in range(reps + 1):
        h.grad, w.grad = None, None
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
    return {
        "row": row,
        "note": note,
        "peak_mb": mem.peak_mb(),
        "time_s": statistics.median(times),
        "loss": loss,
        "grad_w_norm": float(w.grad.norm()),
    }


# -- the table (parent) --------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", nargs="*", default=ROWS)
    ap.add_argument(
        "--offline", action="store_true", help="the cached top-k rows (issue 20) instead"
    )
    ap.add_argument("--shape", action="append", help="N,V (repeatable); default both E4 shapes")
    ap.add_argument("--child", nargs=3, metavar=("ROW", "N", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        row, n, v = args.child
        print(json.dumps(run_row(row, int(n), int(v), args.reps)))
        return
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else SHAPES
    if args.offline:
        args.rows = OFFLINE_ROWS
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for n, v in shapes:
        results = []
        for row in args.rows:
            cmd = [
                sys.executable,
                __file__,
                "--reps",
                str(args.reps),
                "--child",
                row,
                str(n),
                str(v),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                results.append({"row": row, "skip": f"exit {proc.returncode}: {tail[:160]}"})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            sys.stderr.write(f"  {n}x{v} {row}: {results[-1]}\n")
        base = "distillkit top128" if args.offline else "dense"
        dense = next((r for r in results if r["row"] == base and "skip" not in r), None)
        print(f"\nN={n} V={v} H_s={H_S} H_t={H_T} fp32, 1 thread, fwd+bwd, {args.reps} reps")
        print(f"| row | peak MiB | x {base} | time s | x {base} | loss | note |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for r in results:
            if "skip" in r:
                print(f"| {r['row']} | - | - | - | - | - | skipped: {r['skip']} |")
                continue
            pm = r["peak_mb"] / dense["peak_mb"] if dense and r["peak_mb"] is not None else None
            tm = r["time_s"] / dense["time_s"] if dense else None
            print(
                f"| {r['row']} | {r['peak_mb']:.0f} | {pm:.3f} | {r['time_s']:.3f} | {tm:.3f} | "
                f"{r['loss']:.6g} | {r['note']} |"
            )
        liger = [r for r in results if r["row"].startswith("liger") and "skip" not in r]
        fused = next((r for r in results if r["row"] == "kdkit jsd" and "skip" not in r), None)
        if liger and fused:
            best = min(liger, key=lambda r: r["peak_mb"])
            print(
                f"kdkit jsd peak = {fused['peak_mb'] / best['peak_mb']:.3f}x the best Liger chunk "
                f"({best['row']}, {best['peak_mb']:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
