"""Size and fidelity of the LM top-k cache on the demo's real teacher and corpus, against
DistillKit's recommended setting by its own bit formula, in the same run.

For each k and log-prob encoding, ``kdkit lm capture`` (the real code path) writes a cache of
the demo's val split; bytes per token are the shard bytes over the trained tokens (everything
on disk: ids, log-probs, tail, row index, token ids). Reconstruction KL is
``KL(p || p_hat)`` per token against the teacher's full distribution, where ``p_hat`` is what
the cache can rebuild: the top k as decoded, and the rest of the mass spread over the other ids,
uniformly (the ``uniform`` policy) or shaped like the teacher's mean distribution over the
corpus (the ``prior`` policy; the same prior is given to DistillKit's reconstruction, whose top k
imply the same rest mass).

DistillKit (arcee-ai/DistillKit, ``compression/config.py total_bits``, read not run): ids
bit-packed at ``ceil(log2 V)`` bits, the top ``exact_k`` log-probs in bf16, the rest of the top
k as a polynomial of ``poly_terms`` float32 coefficients in the rank: bytes per token =
``(k * ceil(log2 V) + exact_k * 16 + poly_terms * 32) / 8``; its recommended setting is k=128,
exact_k=16, 6 terms. Its reconstruction here: the top 16 rounded to bf16, ranks 16..127 from a
least-squares degree-5 polynomial fitted per token, and (to put it on the same footing) the mass
outside its top 128 spread like ours, column by column. Token ids and row offsets, which DistillKit stores
as uint64 beside the values, are not counted for it.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/bench_lm_cache.py [--rows 128] [--bounds]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

KS = (8, 16, 32, 64, 128)


def _demo(rows: int):
    """The demo's teacher (trained and cached by ``kdkit demo lm``) and a config over its val
    split, first ``rows`` rows."""
    from kdkit.config import load_config, resolve_paths
    from kdkit.run.lm_demo import LMDemoConfig, write_splits

    base = LMDemoConfig(progress=False)
    found = sorted(Path(base.cache_dir).glob("*/teacher/config.json"))
    if not found:
        raise SystemExit("no demo teacher: run `make demo-lm` (or kdkit demo lm) once first")
    teacher = found[0].parent
    data = Path(tempfile.mkdtemp(prefix="bench-lm-cache-"))
    _, val, _, _ = write_splits(base, data)
    text = val.read_text(encoding="utf-8")
    part = data / "part.txt"
    part.write_text(text[: rows * base.max_length * 4], encoding="utf-8")
    raw = {
        "task": "lm",
        "student": {"model": f"hf:{teacher}"},
        "teacher": {"model": f"hf:{teacher}"},
        "data": {"text_files": [str(part)], "max_length": base.max_length, "batch_size": 16},
    }
    return resolve_paths(load_config(data=raw)), data


def _full_logp(cfg, cache) -> list[torch.Tensor]:
    """The teacher's full log-distribution at every trained token of every cached row."""
    from kdkit.lm.align import Aligner
    from kdkit.lm.models import hidden_and_head, load_lm

    teacher, _ = load_lm(cfg.teacher.model)
    aligner = Aligner(pad_id=0, max_length=cfg.data.max_length)
    out = []
    with torch.no_grad():
        for i in range(len(cache)):
            b = aligner([cache.row(i)])
            s = hidden_and_head(teacher, b.input_ids, b.position_ids, b.attention_mask)
            logits = s.hidden[b.mask] @ s.head.weight[: cache.vocab].T
            out.append(torch.log_softmax(logits.double(), -1))
    return out


def _kl_tail(full: torch.Tensor, ids, logp, vocab: int, prior=None) -> torch.Tensor:
    """KL(p || p_hat) per token: p_hat = decoded top k + the rest of the mass (1 - their sum)
    spread uniformly, or (``prior``) in proportion to ``prior`` over the other ids."""
    k = ids.shape[1]
    top = torch.logsumexp(logp, -1)
    rest = torch.log(-torch.expm1(top.clamp(max=-1e-12)))
    if prior is None:
        hat = (rest - math.log(vocab - k)).unsqueeze(1).expand(-1, vocab).clone()
    else:
        lp0 = prior.double().log()
        outside = torch.log(-torch.expm1(torch.logsumexp(lp0[ids], -1).clamp(max=-1e-12)))
        hat = lp0.unsqueeze(0) + (rest - outside).unsqueeze(1)
    hat = hat.scatter_(1, ids, logp)
    hat = hat - torch.logsumexp(hat, -1, keepdim=True)
    return (full.exp() * (full - hat)).sum(-1)


def _distillkit(full: torch.Tensor, prior=None, k=128, exact=16, terms=6) -> torch.Tensor:
    """DistillKit's recommended reconstruction (see the module docstring), per-token KL."""
    logp, ids = full.topk(k, dim=-1)
    head = logp[:, :exact].to(torch.bfloat16).double()
    ranks = torch.arange(exact, k, dtype=torch.float64)
    x = (ranks - ranks.mean()) / ranks.std()
    basis = torch.stack([x**d for d in range(terms)], 1)  # [k - exact, terms]
    coef = torch.linalg.lstsq(basis, logp[:, exact:].T).solution.float().double()
    approx = torch.cat([head, (basis @ coef).T], 1)
    return _kl_tail(full, ids, approx, full.shape[1], prior)


def _log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def bounds(full: torch.Tensor, dk_bytes: float, dk_kl: float) -> None:
    """How small any top-k cache of this teacher could be at DistillKit's KL or lower: ids as
    an unordered set (coded by the uniform binomial bound, by a per-id membership model fitted
    on these same tokens, or by fixed-width Elias-Fano) plus each id's value as a level index,
    quantized in sqrt(p) (the KL weighs an error by p, so low-p entries can be coarse) and
    entropy-coded by its frequency here. In-sample models: these are floors, not a codec."""
    n, vocab = full.shape
    print("\nfloors: set + sqrt(p) levels, ideal entropy coding (per id, bits), uniform tail")
    print(
        "| k | step in sqrt p | KL | set: binomial / membership / Elias-Fano | level entropy "
        "| B/token, membership (x DistillKit) | B/token, Elias-Fano (x DistillKit) |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|")
    for k in (128, 160, 192):
        logp, ids = full.topk(k, -1)
        member = torch.zeros(n, vocab, dtype=torch.bool).scatter_(1, ids, True)
        f = member.double().mean(0).clamp(1e-12, 1 - 1e-12)
        h_member = float(-(f * f.log2() + (1 - f) * (1 - f).log2()).sum()) / k
        low = int(math.floor(math.log2(vocab / k)))
        ef = (k * low + k + math.ceil(vocab / 2**low)) / k
        for step in (0.01, 0.02):
            q = torch.round(torch.exp(logp / 2) / step).clamp(min=1)
            hat = 2 * torch.log(q * step)
            hat[:, 0] = logp[:, 0]  # the top value stored as is (2 bytes)
            kl = float(_kl_tail(full, ids, hat, vocab).mean())
            _, counts = torch.unique(q[:, 1:], return_counts=True)
            pr = counts.double() / counts.sum()
            h_level = float(-(pr * pr.log2()).sum())
            fixed = 9  # top value, row index and token ids, as the caches above store them
            member_b = k * (h_member + h_level) / 8 + fixed
            ef_b = k * (ef + h_level) / 8 + fixed
            mark = "" if kl <= dk_kl else " (above DistillKit's KL)"
            print(
                f"| {k} | {step} | {kl:.4f}{mark} | {_log2_binom(vocab, k) / k:.2f} / "
                f"{h_member:.2f} / {ef:.2f} | {h_level:.2f} | {member_b:.0f} "
                f"({member_b / dk_bytes:.2f}) | {ef_b:.0f} ({ef_b / dk_bytes:.2f}) |"
            )


def engines(cfg, work: Path, rounds: int) -> None:
    """Capture wall time (top-32, q8) with the teacher in eager PyTorch, ONNX Runtime fp32 and
    int8 (gated), interleaved rounds, medians; exports are made before the clock."""
    import dataclasses
    import statistics
    import time

    from kdkit.run.lm_job import capture_run

    rows = {"torch fp32": ("torch", "fp32"), "onnx fp32": ("onnx", "fp32"),
            "onnx int8": ("onnx", "int8")}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(rounds + 1):  # round 0: exports, warm-up
        for name, (backend, precision) in rows.items():
            teacher = dataclasses.replace(cfg.teacher, backend=backend, precision=precision)
            start = time.perf_counter()
            capture_run(dataclasses.replace(cfg, teacher=teacher), work / f"e{r}-{name.replace(' ', '-')}",
                    topk=32, progress=False)  # fmt: skip
            if r:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch fp32"])
    print(f"\ncapture of the same rows, top-32 q8, 1 thread, median of {rounds}")
    print("| teacher engine | capture s | x eager |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {base / med:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--engines", type=int, metavar="ROUNDS", help="capture speed per engine")
    ap.add_argument("--bounds", action="store_true", help="also print the size floors")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from kdkit.lm.cache import TopKCache
    from kdkit.run.lm_job import capture_run

    cfg, work = _demo(args.rows)
    if args.engines:
        engines(cfg, work, args.engines)
        return
    results = []
    full = None
    for encoding in ("q8", "f16"):
        for k in KS:
            out = work / f"k{k}-{encoding}"
            manifest = capture_run(cfg, out, topk=k, encoding=encoding, progress=False)
            cache = TopKCache(out)
            if full is None:
                full = _full_logp(cfg, cache)
            prior = cache.prior()
            kls, kls_prior = [], []
            for i, f in enumerate(full):
                ids, logp, _ = (torch.from_numpy(a) for a in cache.entries(cache.row(i)))
                kls.append(_kl_tail(f, ids, logp.double(), cache.vocab))
                kls_prior.append(_kl_tail(f, ids, logp.double(), cache.vocab, prior))
            kl = (torch.cat(kls), torch.cat(kls_prior))
            mass = float(torch.cat([f.exp().topk(k, -1).values.sum(-1) for f in full]).mean())
            results.append((f"kdkit k={k} {encoding}", manifest["bytes_per_token"], kl, mass))
    vocab = full[0].shape[1]
    dk_bytes = (128 * math.ceil(math.log2(vocab)) + 16 * 16 + 6 * 32) / 8
    dk_kl = (
        torch.cat([_distillkit(f) for f in full]),
        torch.cat([_distillkit(f, prior) for f in full]),
    )
    mass = float(torch.cat([f.exp().topk(128, -1).values.sum(-1) for f in full]).mean())
    results.append(("DistillKit k=128 (16 exact + 6-term poly)", dk_bytes, dk_kl, mass))
    tokens = sum(f.shape[0] for f in full)
    print(f"\ndemo teacher, V={vocab}, {len(full)} val rows, {tokens} tokens; 1 thread")
    print(
        "| cache | bytes/token | x DistillKit | KL, uniform tail | p99 | KL, prior tail | p99 "
        "| top-k mass |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, b, (kl, klp), m in results:
        print(
            f"| {name} | {b:.1f} | {b / dk_bytes:.2f} | {float(kl.mean()):.4f} | "
            f"{float(kl.quantile(0.99)):.4f} | {float(klp.mean()):.4f} | "
            f"{float(klp.quantile(0.99)):.4f} | {m:.3f} |"
        )
    for t, tail in enumerate(("uniform", "prior")):
        # equal or lower reconstruction KL, both sides with the same tail
        best = [r for r in results[:-1] if float(r[2][t].mean()) <= float(dk_kl[t].mean())]
        if best:
            small = min(best, key=lambda r: r[1])
            print(
                f"{tail} tail: smallest kdkit cache at <= DistillKit's KL: {small[0]}, "
                f"{small[1] / dk_bytes:.2f}x its bytes per token"
            )
        else:
            print(f"{tail} tail: no kdkit setting here reaches DistillKit's KL")
    if args.bounds:
        bounds(torch.cat(full), dk_bytes, float(dk_kl[0].mean()))


if __name__ == "__main__":
    main()
