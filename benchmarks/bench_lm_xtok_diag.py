"""Why a top-k cache of a flat teacher loses: per cached position, against the live teacher.

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_xtok_diag.py --cache-k 32 64 128 256 512

Over the first ``--rows`` rows of each cache (``bench_lm_xtok.py quality`` captures them, one
per k, in ``--out``), with the live A teacher run on the same rows: the teacher mass outside
the top k, how often the text's own next token is inside them, the share of the teacher's own
cross-entropy at the positions where it is not, whether the cached ids are the live top k and
the q8 error on them, the mass the map places (live) and that the projected top k carry, and,
for the B student's rows built from the cached text (as training builds them), the share of
positions that pair and how often the student's next token is among the projected top k.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from bench_lm_xtok import setup_pair

from kdkit.lm.cache import TopKCache
from kdkit.lm.models import load_lm
from kdkit.lm.xtok.data import xtok_rows
from kdkit.lm.xtok.vocabmap import vocab_map


def diagnose(out: Path, k: int, n_rows: int) -> dict[str, float]:
    base, _, teacher, tok_a, tok_b = setup_pair(out)
    cache = TopKCache(out / f"cache-k{k}")
    model, _ = load_lm(f"hf:{teacher}")
    model.eval()
    v = cache.vocab
    first = torch.full((v,), -1, dtype=torch.long)
    m = torch.as_tensor(np.asarray(vocab_map(tok_a, tok_b).first), dtype=torch.long)[:v]
    first[: len(m)] = m
    rows = [cache.row(i) for i in range(min(n_rows, len(cache)))]
    s_rows = xtok_rows(rows, tok_b, tok_a, from_teacher=base.max_length)
    acc = dict.fromkeys(("n", "tail", "inside", "ce", "ce_out", "same", "dlogp", "placed",
                         "topk", "pos", "paired", "s_n", "s_inside"), 0.0)  # fmt: skip
    for r, x in zip(rows, s_rows, strict=True):
        ids, logp, tail = (torch.from_numpy(a) for a in cache.entries(r))
        entry = torch.zeros(len(r.input_ids), dtype=torch.bool)  # the cached positions
        entry[:-1] = r.trainable[1:] & (r.doc_ids[1:] == r.doc_ids[:-1])
        pos = entry.nonzero().squeeze(1)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=r.input_ids[None]).logits[0, :, :v], -1)[pos]
        lab = r.input_ids[pos + 1]
        inside = (ids == lab[:, None]).any(1)
        ce = -lp.gather(1, lab[:, None]).squeeze(1)
        acc["n"] += len(pos)
        acc["tail"] += float(tail.exp().sum())
        acc["inside"] += float(inside.sum())
        acc["ce"] += float(ce.sum())
        acc["ce_out"] += float(ce[~inside].sum())
        acc["same"] += float((lp.topk(k, 1).indices == ids).all(1).sum())
        acc["dlogp"] = max(acc["dlogp"], float((lp.gather(1, ids) - logp).abs().max()))
        acc["placed"] += float(lp.exp()[:, first >= 0].sum())
        acc["topk"] += float((logp.exp() * (first[ids] >= 0)).sum())
        # the student's rows of the cached text: paired positions, and its next token there
        rank = torch.cumsum(entry.long(), 0) - 1
        ok = entry[x.pair_teacher] & (x.pair_student + 1 < len(x.input_ids))
        acc["pos"] += len(x.input_ids) - 1
        acc["paired"] += float(entry[x.pair_teacher].sum())
        s_lab = x.input_ids[x.pair_student[ok] + 1]
        reached = first[ids[rank[x.pair_teacher[ok]]]]
        acc["s_n"] += len(s_lab)
        acc["s_inside"] += float((reached == s_lab[:, None]).any(1).sum())
    n = acc["n"]
    return {
        "positions": n,
        "mass outside the top k": acc["tail"] / n,
        "next token inside the top k": acc["inside"] / n,
        "teacher CE share at outside positions": acc["ce_out"] / acc["ce"],
        "cached ids == live top k": acc["same"] / n,
        "max |live - cached| logp on the top k": acc["dlogp"],
        "live mass the map places": acc["placed"] / n,
        "mass the projected top k carry": acc["topk"] / n,
        "student positions paired": acc["paired"] / acc["pos"],
        "student next token among the projected top k": acc["s_inside"] / acc["s_n"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-k", type=int, nargs="+", default=[32])
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--out", default="runs/bench-lm-xtok")
    args = p.parse_args()
    for k in args.cache_k:
        print(f"k={k}")
        for name, value in diagnose(Path(args.out), k, args.rows).items():
            print(f"  {name}: {value:.4f}")


if __name__ == "__main__":
    main()
