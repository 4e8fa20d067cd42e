"""``kdkit lm cache info | verify | check DIR``: what a cache holds, whether it is intact, and
whether it still agrees with a live teacher."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.errors import KDError
from kdkit.lm.cache.format import row_hash
from kdkit.lm.cache.reader import TopKCache

__all__ = ["info_lines", "verify", "check"]


def info_lines(cache_dir: str | Path) -> list[str]:
    """Size, bytes per token, settings, and a histogram of the top-k probability mass."""
    cache = TopKCache(cache_dir)
    m = cache.manifest
    size = sum(s["bytes"] for s in m["shards"])
    tails = np.concatenate([s.arrays()["tail_logmass"].astype(np.float32) for s in cache.shards])
    mass = 1.0 - np.exp(tails)
    edges = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0001]
    counts, _ = np.histogram(mass, bins=edges)
    hist = "  ".join(
        f"[{a:.2f},{min(b, 1):.2f}{']' if b > 1 else ')'} {100 * c / max(len(mass), 1):.1f}%"
        for a, b, c in zip(edges, edges[1:], counts, strict=False)
    )
    t, cap = m["teacher"], m["capture"]
    # overflow applies to plain text only (older caches recorded it for every format)
    data = {k: v for k, v in m["data"].items() if k != "overflow" or m["data"]["format"] == "text"}
    return [
        f"cache           {cache.dir} ({m['format']}/{m['version']})",
        f"teacher         {t['model']} ({t['dtype']}, vocab {t['vocab']} of {t['vocab_rows']} "
        f"rows, weights {t['weights_sha256'][:16]}...)",
        f"tokenizer       vocab {m['tokenizer']['vocab_size']}, "
        f"{m['tokenizer']['vocab_sha256'][:16]}...",
        f"capture         top-{cap['k']} at temperature {cap['temperature']:g}, ids "
        f"{cap['id_bits']} bits, log-probs {cap['encoding']}, tail {cap['tail']}",
        f"data            {data}",
        f"rows / tokens   {m['num_rows']} rows, {m['entries']} trained tokens, "
        f"{len(m['shards'])} shards",
        f"size            {size / 2**20:.2f} MiB, {m['bytes_per_token']:.1f} bytes per token",
        f"top-k mass      mean {mass.mean():.4f}; {hist}",
    ]


def verify(cache_dir: str | Path) -> TopKCache:
    """Every shard's checksum and arrays, and every row's stored hash against its ids."""
    cache = TopKCache(cache_dir)
    for s, (shard, entry) in enumerate(zip(cache.shards, cache.manifest["shards"], strict=True)):
        arrays = shard.arrays()  # sha256 checked here
        rows = entry["rows"][1] - entry["rows"][0]
        if (
            arrays["row_offsets"].shape != (rows + 1,)
            or int(arrays["row_offsets"][-1]) != entry["entries"]
        ):
            raise KDError(f"{shard.path} does not hold the rows and entries its manifest lists")
        for r in range(rows):
            row = cache.row(entry["rows"][0] + r)
            if row_hash(row) != int(arrays["row_hash"][r]):
                raise KDError(f"{shard.path}: row {r}'s hash does not match its ids")
        del s
    return cache


@torch.no_grad()
def check(
    cache_dir: str | Path,
    teacher: torch.nn.Module,
    *,
    rows: int = 16,
    seed: int = 0,
    pad_id: int = 0,
) -> dict[str, Any]:
    """Recompute ``rows`` random cached rows with the live ``teacher``: the largest
    ``|d logp|`` over the cached top-k entries, and the mean KL between the live and cached
    (k + 1)-bucket distributions (top k and the rest)."""
    from kdkit._fingerprint import module_fingerprint
    from kdkit.lm.align import Aligner
    from kdkit.lm.cache.target import log1mexp
    from kdkit.lm.logits import output_transform, project_logits
    from kdkit.lm.models import hidden_and_head

    cache = TopKCache(cache_dir)
    m = cache.manifest
    picks = sorted(random.Random(seed).sample(range(len(cache)), min(rows, len(cache))))
    sample = [cache.row(i) for i in picks]
    aligner = Aligner(pad_id=pad_id, max_length=max(len(r) for r in sample))
    d_max, kl_sum, n = 0.0, 0.0, 0
    temperature = cache.temperature
    transform = output_transform(teacher)
    for row in sample:
        batch = aligner([row])
        out = hidden_and_head(teacher, **batch.model_inputs())
        logits = project_logits(out.hidden[batch.mask], out.head, transform, cache.vocab)
        live = torch.log_softmax(logits.double() / temperature, dim=-1)
        ids, logp, tail = (torch.from_numpy(a) for a in cache.entries(row))
        live_k = live.gather(1, ids)
        d_max = max(d_max, float((live_k - logp.double()).abs().max()))
        live_b = torch.cat([live_k, log1mexp(torch.logsumexp(live_k, 1)).unsqueeze(1)], 1)
        cached_b = torch.cat([logp.double(), tail.double().unsqueeze(1)], 1)
        cached_b = cached_b - torch.logsumexp(cached_b, 1, keepdim=True)
        p = live_b.exp()
        kl_sum += float((p * (live_b - cached_b)).nan_to_num(0.0).sum())
        n += ids.shape[0]
    return {
        "rows": len(sample),
        "tokens": n,
        "max_abs_dlogp": d_max,
        "mean_kl": kl_sum / max(n, 1),
        "same_weights": module_fingerprint(teacher) == m["teacher"]["weights_sha256"],
    }
