"""Peak memory of loading a corpus larger than one wants in RAM (issue 38, streaming): the rows
kept in memory (``data.token_cache: false``) against streamed into the token cache and read back
memory-mapped (``data.token_cache: true``, first run and second run), each in a fresh process.

The corpus is generated: ``--files`` JSONL files of ``{"text"}`` records, ``--chars`` characters
in all, drawn from the stdlib's ``*.py`` sources (so the BPE has real text to merge); a BPE of
2,048 tokens trained on the first file's texts; ``format: text``, ``max_length`` 128, ``overflow:
split`` (every token kept), packed. Each
process loads the dataset, then reads every row once (the pass ``fingerprint`` makes, as a run
does before training) and reports its peak RSS (``VmHWM``) and, at the end, the resident memory
of its own heap (``RssAnon``) and of mapped files (``RssFile``: page cache, which the kernel
takes back under pressure and which a second process over the same file shares).

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_streaming.py --chars 100000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) // 1024
    return out


def one(work: Path, mode: str) -> None:
    from transformers import AutoTokenizer

    from kdkit.lm import load_lm_dataset

    tok = AutoTokenizer.from_pretrained(str(work / "tok"), local_files_only=True)
    files = json.loads((work / "files.json").read_text())
    before = _status()
    start = time.perf_counter()
    cache = None if mode == "memory" else work / "cache"
    ds = load_lm_dataset(files, tok, format="text", max_length=128, pack=True,
                         overflow="split", cache_dir=cache)  # fmt: skip
    loaded = time.perf_counter()
    after_load = _status()
    fingerprint = ds.fingerprint  # every row read once
    done = time.perf_counter()
    print("RESULT " + json.dumps({
        "mode": mode, "rows": len(ds), "tokens": ds.description["tokens"],
        "load_s": round(loaded - start, 2), "pass_s": round(done - loaded, 2),
        "rss_before_mib": before["VmRSS"], "peak_after_load_mib": after_load["VmHWM"],
        "peak_mib": _status()["VmHWM"], "anon_end_mib": _status()["RssAnon"],
        "file_end_mib": _status()["RssFile"], "fingerprint": fingerprint[:16]}))  # fmt: skip


def make_corpus(work: Path, chars: int, n_files: int) -> list[str]:
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    pool = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib]
    rng = random.Random(0)
    files, per_file = [], chars // n_files
    for i in range(n_files):
        path = work / f"part{i:03d}.jsonl"
        written = 0
        with open(path, "w", encoding="utf-8") as f:
            while written < per_file:
                text = rng.choice(pool)
                at = rng.randrange(max(1, len(text) - 4000))
                record = text[at : at + rng.randrange(500, 4000)]
                f.write(json.dumps({"text": record}) + "\n")
                written += len(record)
        files.append(str(path))
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=100_000_000)
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--work", help="keep the corpus here (default: a temporary folder)")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(Path(args.one[0]), args.one[1])
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-lm-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "files.json").is_file():
        files = make_corpus(work, args.chars, args.files)
        from kdkit.lm.tokenizer import train_bpe_tokenizer

        with open(files[0], encoding="utf-8") as f:  # the records' text, not the JSON
            sample = [json.loads(line)["text"] for line in f]
        train_bpe_tokenizer(sample, 2048, work / "tok")
        (work / "files.json").write_text(json.dumps(files))
    files = json.loads((work / "files.json").read_text())
    size = sum(Path(f).stat().st_size for f in files)
    shutil.rmtree(work / "cache", ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = []
    for mode in ("memory", "streamed (first run)", "mapped (second run)"):
        out = subprocess.run([sys.executable, __file__, "--one", str(work), mode], env=env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        results.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULT"))[7:]))
        print(json.dumps(results[-1]), flush=True)
    cached = sum(f.stat().st_size for f in (work / "cache").glob("*.safetensors"))
    r0 = results[0]
    print(f"\n{len(files)} files, {size / 2**20:.1f} MiB -> {r0['rows']:,} rows, "
          f"{r0['tokens']:,} tokens; token cache file {cached / 2**20:.1f} MiB\n")  # fmt: skip
    print(
        "| rows | load s | peak RSS after load MiB | peak RSS after a pass MiB "
        "| heap (RssAnon) at end MiB | mapped file (RssFile) at end MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['load_s']:.1f} | {r['peak_after_load_mib']:,} | "
              f"{r['peak_mib']:,} | {r['anon_end_mib']:,} | {r['file_end_mib']:,} |")  # fmt: skip
    assert len({r["fingerprint"] for r in results}) == 1, "the three runs' rows differ"


if __name__ == "__main__":
    main()
