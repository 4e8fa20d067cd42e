"""``kdkit lm generate``: a teacher's completions and their top-k targets, written in one pass.

The output folder is a ``kdkit-lm-topk`` cache (``docs/lm-cache-format.md``) with the data
beside it::

    OUT/manifest.json                 the cache's manifest, with a "generate" section
    OUT/shard-00000.safetensors ...   the targets of the rows of data/part-00000.jsonl, ...
    OUT/tokenizer/                    the tokenizer
    OUT/data/part-00000.jsonl ...     the completions (prompt_completion or chat JSONL)

so ``data: {text_files: ["OUT/data/*.jsonl"]}`` trains on the text (sequence-level KD) and
``teacher: {model: "cache:OUT"}`` on the targets too (token-level KD), with the same config.

**Rows by construction.** Part ``k`` is written first; its rows are then rebuilt from the file by
the training path itself (``rows_of``: what ``kdkit train`` builds from it) and each row is
matched with what was sampled: where its ids are the sampled sequence at every trained position
and its trained positions cover whole regions (:mod:`kdkit.lm.sampling`), the targets of the
sampling pass are used; otherwise (a completion whose text tokenizes otherwise than it was
sampled, a template that renders otherwise) the row is scored again by the teacher, counted as
``rescored``. The row hashes are those of the training rows, so ``cache:OUT`` just works and a
row changed later is refused by the reader as for any capture.

**Resume.** Shard ``k`` holds exactly ``shard_rows`` rows (the cache format's layout), so its
rows may end inside a batch or inside a prompt's samples. Each finished part records the stream
position after its last row (prompt, sample, byte offset in the prompts file, the hashes its
prompt already kept) and the counts up to there; the manifest (sealed, written atomically after
the part and the shard) is the commit. A killed run restarts from the last commit: nothing
before it is generated again, nothing after it was kept. Samples are seeded by (seed, prompt,
sample), so the regenerated ones are the same draws.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kdkit._io import atomic_write_json, atomic_write_text, check_output_path, sha256_file, writing
from kdkit._lock import LOCK_NAME, folder_lock
from kdkit.errors import KDError
from kdkit.lm.cache.capture import (
    KIND,
    Provenance,
    cache_settings,
    check_capture_options,
    rows_arrays,
    write_shard,
)
from kdkit.lm.cache.format import MANIFEST, differences, read_manifest, seal, shard_name
from kdkit.lm.cache.gen_rows import Counts, match_rows, rows_sha256
from kdkit.lm.prompts import Prompt, PromptFile, PromptFormat
from kdkit.lm.sampling import SampleSettings, sample_seed

__all__ = ["DATA_DIR", "GenerateOptions", "generate", "part_name"]

log = logging.getLogger(__name__)

DATA_DIR = "data"


def part_name(i: int) -> str:
    return f"{DATA_DIR}/part-{i:05d}.jsonl"


@dataclass(frozen=True)
class GenerateOptions:
    """``n`` samples per prompt, their ``seed``, sequences per teacher ``batch_size``; drop
    completions that hit their token limit unless ``keep_unfinished``; drop a prompt's
    identical completions when ``dedup``; ``shard_rows`` rows per shard and part; ``encoding``
    of the log-probs; rows of at most ``max_length`` tokens (``data.max_length``, capped by the
    teacher's positions)."""

    max_length: int
    n: int = 1
    seed: int = 0
    batch_size: int = 8
    keep_unfinished: bool = False
    dedup: bool = True
    shard_rows: int = 256
    encoding: str = "q8"
    progress: bool = True


@dataclass
class _Item:
    """One (prompt, sample) of the stream, or a prompt skipped (``sample`` None)."""

    prompt: Prompt
    sample: int | None
    ids: list[int] = field(default_factory=list)
    room: int = 0
    result: Any = None


def _resume_point(prompt: Prompt, sample: int | None, n: int) -> dict[str, Any]:
    """The stream position right after ``sample`` of ``prompt`` (a skipped prompt: after it)."""
    if sample is not None and sample + 1 < n:
        return {"prompt": prompt.index, "sample": sample + 1, "offset": prompt.start}
    return {"prompt": prompt.index + 1, "sample": 0, "offset": prompt.end}


class _Writer:
    """The stream of samples, the filters, and the commits of parts and shards."""

    def __init__(self, sampler, prompts, fmt, out, rows_of, settings, sampling, options, done):
        self.sampler, self.prompts, self.fmt, self.out = sampler, prompts, fmt, out
        self.rows_of, self.settings, self.sampling, self.o = rows_of, settings, sampling, options
        self.parts: list[dict[str, Any]] = done
        last = done[-1] if done else None
        self.next = dict(last["next"]) if last else {"prompt": 0, "sample": 0, "offset": 0}
        self.counts = Counts.of(last["counts"] if last else None)
        self.seen: dict[int, dict[str, int]] = {self.next["prompt"]: {
            h: -1 for h in (last["next"].get("seen", []) if last else [])}}  # fmt: skip
        #: ``(item, verdict, record)`` after the last commit, in stream order
        self.pending: deque[tuple[_Item, str, Any]] = deque()
        self.kept = 0  # kept rows among them
        self.tokens, self.start, self.first = 0, time.perf_counter(), self.next["prompt"]
        self.mass = torch.zeros(settings["teacher"]["vocab"], dtype=torch.float64)  # the part's

    # -- the stream ---------------------------------------------------------------------------
    def items(self) -> Iterator[_Item]:
        first = self.next
        limit = self.o.max_length - self.fmt.after_stop - 1
        for prompt in self.prompts.read(first["prompt"], first["offset"]):
            ids = self.fmt.prompt_ids(prompt.record)
            room = min(self.sampling.max_new_tokens, limit - len(ids))
            if room < 1 or not ids:
                yield _Item(prompt, None)
                continue
            s0 = first["sample"] if prompt.index == first["prompt"] else 0
            for s in range(s0, self.o.n):
                yield _Item(prompt, s, ids, room)

    def run(self, bar: Any) -> None:
        """Batches of at most ``batch_size`` samples, never more than the open part still
        takes: a part ends with a batch, so a resumed run batches as an uninterrupted one
        (and computes bit for bit the same)."""
        batch: list[_Item] = []
        todo = 0
        for item in self.items():
            batch.append(item)
            todo += item.sample is not None
            if todo == min(self.o.batch_size, self.o.shard_rows - self.kept):
                self._step(batch, bar)
                batch, todo = [], 0
        if batch:
            self._step(batch, bar)
        if self.kept:
            self._commit()
        self._finish()

    def _step(self, batch: list[_Item], bar: Any) -> None:
        todo = [i for i in batch if i.sample is not None]
        if todo:
            seeds = [sample_seed(self.o.seed, i.prompt.index, i.sample) for i in todo]
            results = self.sampler.sample(
                [i.ids for i in todo], seeds, [i.room for i in todo], self.sampling
            )
            for item, result in zip(todo, results, strict=True):
                item.result = result
                self.tokens += len(result.tokens)
        for item in batch:
            self._event(item)
        if self.kept == self.o.shard_rows:
            self._commit()
        done = batch[-1].prompt.index + (batch[-1].sample in (None, self.o.n - 1))
        bar.update(done - bar.n)
        bar.set_postfix_str(
            f"{self.tokens_per_s():,.0f} tok/s, {self.counts.kept + self.kept:,} rows"
        )

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def rate(self) -> str:
        """``prompt 512 of 2,000, 1,234 tok/s, ETA 3 min``: this run's pace."""
        done, total = self.next["prompt"], self.prompts.count
        wall = time.perf_counter() - self.start
        eta = wall / (done - self.first) * (total - done) if done > self.first else float("nan")
        return (
            f"prompt {done:,} of {total:,}, {self.tokens_per_s():,.0f} tok/s, "
            f"ETA {eta / 60:.1f} min"
        )

    def _event(self, item: _Item) -> None:
        """Filter one sample (or record a skipped prompt); a kept one waits for its part."""
        if item.sample is None:
            self.pending.append((item, "skipped", None))
            return
        r = item.result
        text = self.fmt.text(r.tokens, r.finished)
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
        seen = self.seen.setdefault(item.prompt.index, {})
        if not r.finished and not self.o.keep_unfinished:
            verdict = "unfinished"
        elif self.o.dedup and key in seen:
            verdict = "duplicate"
        else:
            verdict = "kept"
            seen[key] = item.sample
            self.kept += 1
            self.mass += r.mass.cpu()
        r.mass = None  # added up: a part's kept samples keep only their entries
        if verdict != "kept":
            r.ids, r.logp, r.tail = r.ids[:0], r.logp[:0], r.tail[:0]
        gen = {"prompt": item.prompt.index, "sample": item.sample, "finished": r.finished}
        record = self.fmt.record(item.prompt.record, text, gen) if verdict == "kept" else None
        self.pending.append((item, verdict, record))

    # -- commits ------------------------------------------------------------------------------
    def _commit(self) -> None:
        """Part and shard ``len(self.parts)`` from the kept samples since the last commit, then
        the manifest that lists them (the commit)."""
        events = list(self.pending)
        self.pending.clear()
        self.kept = 0
        samples = [(item.result, record) for item, verdict, record in events if verdict == "kept"]
        k = len(self.parts)
        part = self.out / part_name(k)
        text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for _, rec in samples)
        with writing(part):
            atomic_write_text(part, text)
        matched = match_rows(self.rows_of(part), [s for s, _ in samples], self.sampler,
                             self.settings, self.o.batch_size, self.mass)  # fmt: skip
        self.mass = torch.zeros_like(self.mass)
        arrays = rows_arrays(matched.rows, matched.entries, matched.ids, matched.logp,
                             matched.tail, matched.mass, self.settings)  # fmt: skip
        shard = self.out / shard_name(k)
        with writing(shard):
            write_shard(shard, arrays)
        self.counts.add(events, self.o.n, matched.rescored)
        item = events[-1][0]
        self.next = _resume_point(item.prompt, item.sample, self.o.n)
        seen = self.seen.get(self.next["prompt"], {})
        self.next["seen"] = sorted(h for h, s in seen.items() if s < self.next["sample"])
        for p in [p for p in self.seen if p < self.next["prompt"]]:
            del self.seen[p]
        self.parts.append(
            {"file": part.name, "rows": len(samples), "sha256": sha256_file(part),
             "next": self.next, "counts": self.counts.as_dict(),
             "shard": {"file": shard.name, "entries": int(arrays["row_offsets"][-1]),
                       "bytes": shard.stat().st_size, "sha256": sha256_file(shard)}}
        )  # fmt: skip
        self._write_manifest(complete=False)
        if not self.o.progress:  # a log line per part where there is no bar
            log.info("generate: part %d written; %s", k, self.rate())

    def _finish(self) -> None:
        events = list(self.pending)
        self.pending.clear()
        self.counts.add(events, self.o.n, 0)
        self.counts.prompts = self.prompts.count
        if not self.parts:
            raise KDError(
                f"no completion was kept ({self.counts.line()}); raise --max-new-tokens, pass "
                "--keep-unfinished, or give prompts shorter than data.max_length"
            )
        self._write_manifest(complete=True)

    def _write_manifest(self, complete: bool) -> None:
        per = self.o.shard_rows
        shards = [
            {"file": p["shard"]["file"], "rows": [i * per, i * per + p["rows"]],
             "entries": p["shard"]["entries"], "bytes": p["shard"]["bytes"],
             "sha256": p["shard"]["sha256"]}
            for i, p in enumerate(self.parts)
        ]  # fmt: skip
        rows = shards[-1]["rows"][1] if shards else 0
        gen = dict(self.settings["generate"])
        gen["parts"] = [{k: v for k, v in p.items() if k != "shard"} for p in self.parts]
        gen["counts"] = self.counts.as_dict() if complete else self.parts[-1]["counts"]
        manifest = {**self.settings, "generate": gen, "num_rows": rows,
                    "num_shards": len(shards), "shards": shards, "complete": complete}  # fmt: skip
        if complete:
            entries = sum(s["entries"] for s in shards)
            manifest["entries"] = entries
            manifest["bytes_per_token"] = sum(s["bytes"] for s in shards) / max(entries, 1)
            manifest["rows_sha256"] = rows_sha256(self.out, shards)
        with writing(self.out / MANIFEST):
            atomic_write_json(self.out / MANIFEST, seal(manifest))


def generate(
    sampler: Any,
    prompts: PromptFile,
    fmt: PromptFormat,
    out: str | Path,
    *,
    rows_of: Callable[[Path], Sequence[Any]],
    tokenizer: Any,
    provenance: Provenance,
    sampling: SampleSettings,
    options: GenerateOptions,
) -> dict[str, Any]:
    """Sample ``options.n`` completions per prompt of ``prompts`` from ``sampler`` (a
    :class:`~kdkit.lm.sampling.TeacherSampler`), write them as ``fmt`` data into ``out/data``
    and their targets (``sampling.k`` per token at ``sampling.kd_temperature``) as a top-k
    cache into ``out``; resumes an unfinished run there. ``rows_of(part)``: the rows ``kdkit
    train`` builds from a written part. Returns the manifest."""
    check_capture_options(topk=sampling.k, encoding=options.encoding,
                          temperature=sampling.kd_temperature, shard_rows=options.shard_rows,
                          batch_size=options.batch_size)  # fmt: skip
    out = check_output_path(out, what="--out", directory=True, makes=KIND,
                            inputs=[prompts.path])  # fmt: skip
    settings = {
        **cache_settings(provenance, tokenizer, sampling.k, options.encoding,
                         sampling.kd_temperature),  # fmt: skip
        "shard_rows": options.shard_rows,
        "generate": {
            "prompts": prompts.fingerprint(),
            "prompts_file": str(prompts.path.resolve()),  # where they were (not compared)
            "sampling": {"n": options.n, "seed": options.seed,
                         "temperature": sampling.temperature, "top_p": sampling.top_p,
                         "max_new_tokens": sampling.max_new_tokens,
                         "stop_ids": list(sampling.stop_ids),
                         "keep_unfinished": options.keep_unfinished, "dedup": options.dedup,
                         "canonical": sampling.canonical is not None,
                         "max_length": options.max_length},
        },
    }  # fmt: skip
    if sampling.k > settings["teacher"]["vocab"]:
        raise KDError(f"--topk {sampling.k} is larger than the vocabulary")
    with folder_lock(out, makes=KIND, what="--out"):  # one writer at a time
        done = _resume(out, settings)
        if done is None:
            return read_manifest(out)
        if not done:
            with writing(out / "tokenizer"):
                tokenizer.save_pretrained(str(out / "tokenizer"))
        (out / DATA_DIR).mkdir(exist_ok=True)
        writer = _Writer(sampler, prompts, fmt, out, rows_of, settings, sampling, options, done)
        bar = tqdm(total=prompts.count, initial=writer.next["prompt"], unit="prompt",
                   desc="generate", disable=not options.progress, dynamic_ncols=True)  # fmt: skip
        try:
            writer.run(bar)
        finally:
            bar.close()
        manifest = read_manifest(out)
        wall = time.perf_counter() - writer.start
        manifest["session"] = {"wall_s": wall, "tokens": writer.tokens,  # this call's, not on disk
                               "tokens_per_s": writer.tokens_per_s()}  # fmt: skip
        return manifest


def _resume(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The finished parts in ``out`` (verified), [] for a fresh run, None when complete."""
    if not (out / MANIFEST).exists():
        if any(p.name not in ("tokenizer", DATA_DIR, LOCK_NAME) for p in out.iterdir()):
            raise KDError(f"{out} is not empty and holds no generation; choose an empty --out")
        return []
    have = read_manifest(out, complete=False)
    if "generate" not in have:
        raise KDError(f"{out} holds a kdkit lm capture, not a generation; use another --out")
    want = {k: v for k, v in settings.items() if k != "generate"}
    changed = differences(have, want)
    for key, value in settings["generate"].items():
        if key != "prompts_file" and have["generate"].get(key) != value:
            changed.append(f"generate.{key}: cache {have['generate'].get(key)!r}, here {value!r}")
    if changed:
        raise KDError(
            f"{out} holds a generation made with other settings or prompts ({'; '.join(changed)});"
            " use another --out, or remove it to generate again"
        )
    if have.get("complete"):
        log.info("the generation in %s is already complete", out)
        return None
    done = []
    for part, shard in zip(have["generate"]["parts"], have["shards"], strict=True):
        files = (
            (out / DATA_DIR / part["file"], part["sha256"]),
            (out / shard["file"], shard["sha256"]),
        )
        if not all(f.is_file() and sha256_file(f) == s for f, s in files):
            break  # generate again from the last good commit
        done.append(
            {**part, "shard": {k: shard[k] for k in ("file", "entries", "bytes", "sha256")}}
        )
    return done
