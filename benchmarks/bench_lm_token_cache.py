"""The tokenized-corpus cache (``data.token_cache``): a run's data start-up the first time
(read, tokenize, pack, write the cache) against the second (read the cache back), each in a
fresh process, rounds interleaved (cold: the cache folder emptied first).

The corpus: the ``kdkit demo lm`` text (the Python docs' sources, or the stdlib's ``*.py`` where
``python3.11-doc`` is missing), all of it; the demo's tokenizer when cached, else a BPE of 2,048
tokens trained here once; ``format: text``, ``max_length`` 128, packed, as the demo trains.

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_token_cache.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(work: Path) -> None:
    start = time.perf_counter()
    from transformers import AutoTokenizer

    from kdkit.lm import load_lm_dataset

    imported = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(work / "tok"), local_files_only=True)
    files = json.loads((work / "files.json").read_text())
    loaded = time.perf_counter()
    ds = load_lm_dataset(files, tok, format="text", max_length=128, pack=True, overflow="split",
                         cache_dir=work / "cache")  # fmt: skip
    done = time.perf_counter()
    print("RESULT " + json.dumps({"import_s": imported - start, "tokenizer_s": loaded - imported,
                                  "data_s": done - loaded, "rows": len(ds),
                                  "tokens": ds.description["tokens"]}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(Path(args.one))
        return
    from kdkit.run.lm_demo import demo_corpus

    files, source = demo_corpus()
    work = Path(tempfile.mkdtemp(prefix="bench-token-cache-"))
    (work / "files.json").write_text(json.dumps([str(f) for f in files]))
    cached = next(Path.home().glob(".cache/kdkit/lm-demo/*/tokenizer"), None)
    if cached is not None:
        shutil.copytree(cached, work / "tok")
    else:
        from kdkit.lm.tokenizer import train_bpe_tokenizer

        train_bpe_tokenizer(files[:200], 2048, work / "tok")
    size = sum(Path(f).stat().st_size for f in files)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows: dict[str, list[dict]] = {"first run (cold)": [], "second run (cache)": []}
    for r in range(args.rounds):
        for name in rows:
            if name.startswith("first"):
                shutil.rmtree(work / "cache", ignore_errors=True)
            t = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--one", str(work)], env=env,
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT"))[7:])
            result["process_s"] = time.perf_counter() - t
            rows[name].append(result)
            print(f"round {r} {name}: {json.dumps(result)}", flush=True)
    first = rows["first run (cold)"][0]
    print(f"\n{source}: {len(files)} files, {size / 2**20:.1f} MiB -> {first['rows']:,} rows, "
          f"{first['tokens']:,} tokens; median (min-max) of {args.rounds}, one thread\n")  # fmt: skip
    print("| run | data start-up s | whole process s |")
    print("|---|---:|---:|")
    for name, rs in rows.items():
        d, w = [x["data_s"] for x in rs], [x["process_s"] for x in rs]
        print(f"| {name} | {statistics.median(d):.2f} ({min(d):.2f}-{max(d):.2f}) | "
              f"{statistics.median(w):.2f} ({min(w):.2f}-{max(w):.2f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
