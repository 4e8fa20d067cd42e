"""Cross-tokenizer distillation (kdkit.lm.xtok): alignment speed, step cost, quality.

Tokenizer A is the LM demo's (byte-level BPE, 2,048 tokens, numbers merged, no BOS; its
teacher is the demo's, trained once and cached); tokenizer B is trained here on the same train
text, 3,000 tokens, every digit its own token and a BOS prepended (they differ the way Qwen's
and Llama's do).

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_xtok.py align     # alignment vs a Python loop
    OMP_NUM_THREADS=1 python benchmarks/bench_lm_xtok.py step      # step vs same-tokenizer KD
    OMP_NUM_THREADS=1 python benchmarks/bench_lm_xtok.py quality --seeds 0 1 2

``align``: pairs of every row of the train text, kdkit's vectorized ``align_many`` (what the
data pipeline calls, all rows at once: rows in, one ``RowAlignment`` per row out), ``align_flat``
(the same rows held flat, as a dataset that stores them concatenated gives them; pairs out
flat) and ``align_rows`` (one row at a time) against a per-token Python loop over the same
per-id tables (the loop is given the tables: no decode), and against a loop that decodes each
token (the GOLD / DSKD way); the pairs must be equal.
``step``: the LM task's forward + backward (rows of 128 tokens, batch 16, the demo's student
and teacher shapes), interleaved, median ms per step: cross-tokenizer KD (teacher A, student B)
against same-tokenizer KD with the same student (B, from a teacher of B's tokenizer and the
same shape) and against the A -> A pair (a student of 2,048 tokens: a cheaper head);
``step --cache`` adds the rows from a k=32 cache of the A teacher (tail bucket and label).
``quality``: test perplexity in the student's tokens and bits per byte (comparable across
tokenizers), mean +- std over seeds: scratch and same-tokenizer KD on A (the reference), and
same-tokenizer KD from each top-k cache (``--cache-k``, 32 always; tail bucket, the default, and
label); scratch, cross-tokenizer KD online, from the same caches (bucket, label; prior at k 32)
and ULD alone on B. "closed" is against same-tokenizer KD online and against same-tokenizer KD
from the same cache and tail. ``quality --ce-mix``: the k=32 cache rows and online with
``ce_weight: 0.5``.

    OMP_NUM_THREADS=1 python benchmarks/bench_lm_xtok.py quality --cache-k 32 128 512
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kdkit.run.lm_demo import LMDemoConfig, llama_folder, train_demo_run, write_splits


def setup_pair(out: Path):
    """(demo config, train / val / test files, teacher A folder, tokenizer A, tokenizer B)."""
    from transformers import AutoTokenizer

    from kdkit.lm.tokenizer import train_bpe_tokenizer
    from kdkit.run import lm_demo

    base = LMDemoConfig.quick(out_dir=str(out), progress=False)
    (out / "data").mkdir(parents=True, exist_ok=True)
    files = write_splits(base, out / "data")[:3]
    key = "v1-400000c-2048v-128l-128x4x4-3e-0s"
    teacher = Path(base.cache_dir) / key / "teacher"
    if not (teacher / "config.json").is_file():  # train the demo's teacher once (cached)
        lm_demo.run_lm_demo(dataclasses.replace(base, divergences=(), out_dir=str(out / "demo")))
    tok_a = AutoTokenizer.from_pretrained(str(teacher), local_files_only=True)
    b_dir = out / "tok-b"
    if not (b_dir / "tokenizer.json").is_file():
        train_bpe_tokenizer([files[0]], 3000, b_dir, split_digits=True,
                            bos_token="<|begin_of_text|>")  # fmt: skip
    tok_b = AutoTokenizer.from_pretrained(str(b_dir), local_files_only=True)
    return base, files, teacher, tok_a, tok_b


# -- align ----------------------------------------------------------------------------------
def _loop_align(ids_s, ids_t, len_s, len_t, kind_s, kind_t, docs_s, docs_t):
    """The per-token Python loop: the same keys, one token at a time."""

    def keys(ids, lens, kinds, docs):
        out, end = {}, 0
        n = len(ids)
        for i in range(n):
            end += lens[ids[i]]
            nxt = kinds[ids[i + 1]] if i + 1 < n else 4095
            out[(docs[i], end, nxt)] = i
        return out

    ks, kt = keys(ids_s, len_s, kind_s, docs_s), keys(ids_t, len_t, kind_t, docs_t)
    pairs = sorted((i, kt[k]) for k, i in ks.items() if k in kt)
    return pairs


def _decode_lengths(tok, ids):
    """Byte length per token by decoding each one (what a decode-in-the-loop aligner does)."""
    return [len(tok.decode([i]).encode("utf-8")) for i in ids]


def _interface_floor(data):
    """What ``align_many`` costs without aligning: its rows read into flat arrays and one
    ``RowAlignment`` of two slices made per row (the per-row Python no vectorizing removes)."""
    from kdkit.lm.xtok.align import FlatAlignment, FlatRows

    s = FlatRows.of([(a, b) for a, b, _, _ in data])
    t = FlatRows.of([(c, d) for _, _, c, d in data])
    return FlatAlignment(s.ids, t.ids[: len(s.ids)], s.starts).rows()


def bench_align(out: Path) -> None:
    from kdkit.lm.data import load_lm_dataset
    from kdkit.lm.xtok.align import FlatRows, align_flat, align_many, align_rows
    from kdkit.lm.xtok.retokenize import teacher_ids
    from kdkit.lm.xtok.tokenbytes import kind_tables, token_bytes

    base, files, _, tok_a, tok_b = setup_pair(out)
    rows = load_lm_dataset([files[0]], tok_b, max_length=base.max_length, overflow="split").rows
    s, t = token_bytes(tok_b), token_bytes(tok_a)
    ks, kt = kind_tables(s, t)
    start = time.perf_counter()
    pairs_t = [teacher_ids(r.input_ids.numpy(), r.doc_ids.numpy(), s, t, tok_a) for r in rows]
    retok_s = time.perf_counter() - start
    data = [
        (r.input_ids.numpy(), r.doc_ids.numpy(), ti, td)
        for r, (ti, td) in zip(rows, pairs_t, strict=True)
    ]
    n_tok = sum(len(a) + len(c) for a, _, c, _ in data)
    flat_s = FlatRows.of([(a, b) for a, b, _, _ in data])  # rows a dataset holds flat
    flat_t = FlatRows.of([(c, d) for _, _, c, d in data])
    tables = (s.lengths, ks), (t.lengths, kt)
    ls, lt, kss, ktt = s.lengths.tolist(), t.lengths.tolist(), ks.tolist(), kt.tolist()

    def python_loop():
        return [_loop_align(a.tolist(), c.tolist(), ls, lt, kss, ktt, b.tolist(), d.tolist())
                for a, b, c, d in data]  # fmt: skip

    kdkit = {
        "vectorized": lambda: align_many([(a, b) for a, b, _, _ in data],
                                         [(c, d) for _, _, c, d in data], *tables),
        "flat": lambda: align_flat(flat_s, flat_t, *tables),
        "per row": lambda: [align_rows(a, b, c, d, *tables) for a, b, c, d in data],
        "floor": lambda: _interface_floor(data),
    }  # fmt: skip
    timing: dict[str, list[float]] = {}
    out = {}
    # interleaved, the best of 7 (a shared machine); each kdkit call runs right after the loop,
    # so it finds the caches as the loop left them, as a data pipeline's call would
    for rep in range(7):
        for name, fn in kdkit.items():
            start = time.perf_counter()
            loop = python_loop()
            timing.setdefault("python loop", []).append(time.perf_counter() - start)
            start = time.perf_counter()
            out[name] = fn()
            timing.setdefault(name, []).append(time.perf_counter() - start)
        if rep == 0:
            rows_out = zip(out["vectorized"], loop, out["per row"], out["flat"].rows(), strict=True)
            for o, lp, o1, of in rows_out:
                assert list(zip(o.student.tolist(), o.teacher.tolist(), strict=True)) == lp
                assert list(zip(o1.student.tolist(), o1.teacher.tolist(), strict=True)) == lp
                assert list(zip(of.student.tolist(), of.teacher.tolist(), strict=True)) == lp
            sub = data[:100]
            start = time.perf_counter()
            for a, _, c, _ in sub:
                _decode_lengths(tok_b, a.tolist()), _decode_lengths(tok_a, c.tolist())
            dec = (time.perf_counter() - start) * len(data) / len(sub)
    best = {k: min(v) for k, v in timing.items()}
    print(f"rows {len(data)}, tokens (both sides) {n_tok:,}; torch {torch.__version__}")
    print("| aligner | tokens/s | vs kdkit | speed-up over the per-token loop |")
    print("|---|---:|---:|---:|")
    for name, sec in (("kdkit align_many (all rows at once)", best["vectorized"]),
                      ("kdkit align_flat (rows held flat, pairs flat)", best["flat"]),
                      ("kdkit align_rows (one row per call)", best["per row"]),
                      ("align_many's rows in and out alone (no alignment)", best["floor"]),
                      ("per-token Python loop (tables)", best["python loop"]),
                      ("decode per token, lengths only", dec)):  # fmt: skip
        print(f"| {name} | {n_tok / sec:,.0f} | {sec / best['vectorized']:.1f}x | "
              f"{best['python loop'] / sec:.1f}x |")  # fmt: skip
    print(f"retokenize (teacher's tokens of each student row, once per row): "
          f"{n_tok / 2 / retok_s:,.0f} student tokens/s")  # fmt: skip


# -- step -----------------------------------------------------------------------------------
def bench_step(out: Path, steps: int = 12, cached: bool = False) -> None:
    from kdkit.config import load_config, resolve_paths
    from kdkit.run.lm_job import build_lm_trainer

    base, files, teacher, tok_a, tok_b = setup_pair(out)
    from transformers import AutoConfig, AutoModelForCausalLM

    a_dir = llama_folder(out / "student-a", tok_a, base.student, base.max_length)
    b_dir = llama_folder(out / "student-b", tok_b, base.student, base.max_length)
    # a teacher of B's tokenizer, the demo teacher's shape (random weights: time only)
    tb_dir = llama_folder(out / "teacher-b", tok_b, base.teacher, base.max_length)
    if not (tb_dir / "model.safetensors").is_file():
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tb_dir)).save_pretrained(tb_dir)
    cache = _capture(base, teacher, b_dir, files, out) if cached else None  # k 32, A's tokens
    tasks = {}
    runs = (
        ("same-tokenizer KD, A -> A", a_dir, f"hf:{teacher}", {}),
        ("same-tokenizer KD, B -> B", b_dir, f"hf:{tb_dir}", {}),
        ("cross-tokenizer KD, A -> B", b_dir, f"hf:{teacher}", {}),
    ) + (
        ("same-tokenizer KD, A -> A, cache k32 (tail bucket)", a_dir, cache, {}),
        ("cross-tokenizer KD, A -> B, cache k32 (tail bucket)", b_dir, cache, {}),
        ("cross-tokenizer KD, A -> B, cache k32 (tail label)", b_dir, cache, {"tail": "label"}),
    ) * cached
    for name, student, source, distill in runs:
        raw = {
            "task": "lm",
            "student": {"model": f"hf-config:{student}"},
            "teacher": {"model": source},
            "data": {
                "text_files": [str(files[1])],
                "max_length": base.max_length,
                "batch_size": base.batch_size,
            },  # fmt: skip
            "distill": {"divergence": "fkl", **distill},
            "run_dir": str(out / f"step-{len(tasks)}"),
        }
        trainer, data = build_lm_trainer(resolve_paths(load_config(data=raw)), torch.device("cpu"))
        batches = [b for _, b in zip(range(steps), data.train_loader, strict=False)]
        tasks[name] = (trainer.task, batches)
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for i in range(steps):
        for name, (task, batches) in tasks.items():
            b = batches[i % len(batches)]
            start = time.perf_counter()
            out_ = task(b, reduction="mean")
            out_.loss.backward()
            times[name].append(time.perf_counter() - start)
            task.student.zero_grad(set_to_none=True)
    ref = statistics.median(times["same-tokenizer KD, B -> B"][2:])
    print("| step (batch 16 x 128 tokens, fwd + bwd) | median ms | vs same-tokenizer B -> B |")
    print("|---|---:|---:|")
    for name, t in times.items():
        m = statistics.median(t[2:])
        print(f"| {name} | {1000 * m:.1f} | {m / ref:.2f}x |")


# -- quality --------------------------------------------------------------------------------
def bits_per_byte(run_dir: Path, test: Path, max_length: int, batch: int) -> tuple[float, float]:
    """(test perplexity in the student's tokens, bits per byte of the predicted tokens)."""
    from kdkit.lm.align import Aligner
    from kdkit.lm.data import load_lm_dataset
    from kdkit.lm.task import LMTask
    from kdkit.lm.tokenizer import pad_id
    from kdkit.lm.xtok.tokenbytes import token_bytes
    from kdkit.run.lm_tools import load_lm_student

    student, tok, _ = load_lm_student(run_dir)
    ds = load_lm_dataset([test], tok, max_length=max_length, overflow="split")
    aligner = Aligner(pad_id=pad_id(tok), max_length=max_length)
    lens = torch.from_numpy(token_bytes(tok).lengths)
    batches = [aligner(ds.rows[i : i + batch]) for i in range(0, len(ds), batch)]
    scores = LMTask(student, None, probe=False).evaluate(batches)
    n_bytes = sum(int(lens[b.labels[b.mask]].sum()) for b in batches)
    return scores["ppl"], scores["ce"] * scores["tokens"] / (math.log(2) * n_bytes)


def _capture(base, teacher: Path, student: Path, files, out: Path, k: int = 32) -> str:
    """``kdkit lm capture`` of the A teacher over the train and val text, top ``k``, q8 (one
    cache serves both students: it is in the teacher's tokens)."""
    from kdkit.config import load_config, resolve_paths
    from kdkit.run.lm_job import capture_run

    cache = out / f"cache-k{k}"
    if not (cache / "manifest.json").is_file():
        raw = {
            "task": "lm",
            "student": {"model": f"hf-config:{student}"},
            "teacher": {"model": f"hf:{teacher}"},
            "data": {
                "text_files": [str(files[0])],
                "val": {"text_files": [str(files[1])]},
                "max_length": base.max_length,
                "batch_size": base.batch_size,
            },  # fmt: skip
        }
        capture_run(resolve_paths(load_config(data=raw)), cache, topk=k, progress=False)
    return f"cache:{cache}"


def _recipes(a_dir, b_dir, teacher, caches: dict[int, str], ce_mix: bool) -> dict:
    """name -> (student, teacher source, distill settings, the same-tokenizer cache row it is
    compared with or None). Each cache (one per k) serves both students."""
    fkl = {"divergence": "fkl"}
    xkd = "B: cross-tokenizer KD"
    if ce_mix:  # the hard-label mix beside the KD term (a weak teacher's top k loses the text)
        ce = {**fkl, "ce_weight": 0.5}
        return {
            "A: scratch": (a_dir, None, {}, None),
            "A: same-tokenizer KD": (a_dir, teacher, fkl, None),
            "A: same-tokenizer KD, cache k32, ce 0.5": (a_dir, caches[32], ce, None),
            "B: scratch": (b_dir, None, {}, None),
            f"{xkd}, online, ce 0.5": (b_dir, teacher, ce, None),
            f"{xkd}, cache k32 (bucket), ce 0.5": (
                b_dir, caches[32], ce, "A: same-tokenizer KD, cache k32, ce 0.5"),
            "A: same-tokenizer KD, cache k32 (label), ce 0.5": (
                a_dir, caches[32], {**ce, "tail": "label"}, None),
            f"{xkd}, cache k32 (label), ce 0.5": (b_dir, caches[32], {**ce, "tail": "label"},
                "A: same-tokenizer KD, cache k32 (label), ce 0.5"),
        }  # fmt: skip
    label = {**fkl, "tail": "label"}
    recipes = {
        "A: scratch": (a_dir, None, {}, None),
        "A: same-tokenizer KD": (a_dir, teacher, fkl, None),
    }
    for k, c in caches.items():
        recipes[f"A: same-tokenizer KD, cache k{k} (tail bucket)"] = (a_dir, c, fkl, None)
        recipes[f"A: same-tokenizer KD, cache k{k} (tail label)"] = (a_dir, c, label, None)
    recipes["B: scratch"] = (b_dir, None, {}, None)
    recipes[f"{xkd}, online"] = (b_dir, teacher, fkl, None)
    for k, c in caches.items():
        ref = f"A: same-tokenizer KD, cache k{k} (tail bucket)"
        recipes[f"{xkd}, cache k{k} (tail bucket)"] = (b_dir, c, fkl, ref)
        if k == 32:
            recipes[f"{xkd}, cache k32 (tail prior)"] = (b_dir, c, {**fkl, "tail": "prior"}, ref)
        ref = f"A: same-tokenizer KD, cache k{k} (tail label)"
        recipes[f"{xkd}, cache k{k} (tail label)"] = (b_dir, c, label, ref)
    recipes["B: ULD alone"] = (b_dir, teacher, {**fkl, "cross_tokenizer": {"method": "uld"}}, None)
    return recipes


def bench_quality(
    out: Path,
    seeds: list[int],
    ce_mix: bool = False,
    ks: tuple[int, ...] = (32,),
    only: str | None = None,
    reuse: bool = False,
) -> None:
    """The quality table; ``only`` (a regular expression) keeps the matching recipes (the
    scratch and same-tokenizer KD rows that "closed" needs are always kept); ``reuse`` reads a
    run already trained in ``out/runs`` instead of training it again."""
    import re

    base, files, teacher, tok_a, tok_b = setup_pair(out)
    a_dir = llama_folder(out / "student-a", tok_a, base.student, base.max_length)
    b_dir = llama_folder(out / "student-b", tok_b, base.student, base.max_length)
    caches = {k: _capture(base, teacher, b_dir, files, out, k) for k in sorted({32, *ks})}
    recipes = _recipes(a_dir, b_dir, teacher, caches, ce_mix)
    keep = {"A: scratch", "A: same-tokenizer KD", "B: scratch"}
    if only:
        wanted = {k for k in recipes if re.search(only, k)}
        keep |= wanted | {v[3] for k, v in recipes.items() if k in wanted and v[3]}
        recipes = {k: v for k, v in recipes.items() if k in keep}
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in recipes}
    for seed in seeds:
        cfg = dataclasses.replace(base, seed=seed, out_dir=str(out / "runs"))
        for name, (student, source, distill, _) in recipes.items():
            run = f"s{seed}-{name.split(':')[0]}-{'-'.join(name.split(':')[1].split())}"
            run = run.replace(",", "").replace("(", "").replace(")", "")
            run_dir, wall = Path(cfg.out_dir) / run, 0.0
            if not (reuse and (run_dir / "last.pt").is_file()):
                result, wall = train_demo_run(cfg, run, student, source, files,
                                              epochs=base.student_epochs, **distill)  # fmt: skip
                run_dir = result.run_dir
            ppl, bpb = bits_per_byte(run_dir, files[2], base.max_length, base.batch_size)
            rows[name].append((ppl, bpb))
            print(f"seed {seed} {name}: test ppl {ppl:.2f}, bpb {bpb:.4f} ({wall:.0f} s)",
                  flush=True)  # fmt: skip
    t_ppl, t_bpb = _teacher_bpb(teacher, files[2], base, out / "teacher-run")
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    mean = {k: statistics.mean(b for _, b in v) for k, v in rows.items()}

    def closed(name: str, ref: str) -> str:
        """The share of what ``ref`` closes on A (from A scratch) that ``name`` closes on its
        own tokenizer (from its scratch), in bits per byte."""
        gain = mean["A: scratch"] - mean[ref]
        if gain <= 0:
            return "n/a (ref. below scratch)"
        scratch = mean["A: scratch"] if name.startswith("A") else mean["B: scratch"]
        return f"{(scratch - mean[name]) / gain:.0%}"

    print(f"\nteacher (A) test ppl {t_ppl:.2f}, bpb {t_bpb:.4f}; seeds {seeds}\n")
    print("| recipe | test ppl (own tokens) | bits per byte | closed vs same-tok KD online "
          "| closed vs same-tok KD, same cache |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for name, vals in rows.items():
        p = [a for a, _ in vals]
        b = [x for _, x in vals]
        ref = recipes[name][3]
        online = "-" if "scratch" in name else closed(name, "A: same-tokenizer KD")
        cached = closed(name, ref) if ref else "-"
        print(f"| {name} | {statistics.mean(p):.2f} ± {sd(p):.2f} | "
              f"{statistics.mean(b):.4f} ± {sd(b):.4f} | {online} | {cached} |")  # fmt: skip


def _teacher_bpb(teacher: Path, test: Path, base, out: Path) -> tuple[float, float]:
    """The teacher's test perplexity and bits per byte, as the students' are read."""
    from kdkit.lm.align import Aligner
    from kdkit.lm.data import load_lm_dataset
    from kdkit.lm.models import load_lm
    from kdkit.lm.task import LMTask
    from kdkit.lm.tokenizer import pad_id
    from kdkit.lm.xtok.tokenbytes import token_bytes

    model, tok = load_lm(f"hf:{teacher}")
    ds = load_lm_dataset([test], tok, max_length=base.max_length, overflow="split")
    aligner = Aligner(pad_id=pad_id(tok), max_length=base.max_length)
    lens = torch.from_numpy(token_bytes(tok).lengths)
    batches = [aligner(ds.rows[i : i + 16]) for i in range(0, len(ds), 16)]
    s = LMTask(model, None, probe=False).evaluate(batches)
    n_bytes = sum(int(lens[b.labels[b.mask]].sum()) for b in batches)
    return s["ppl"], s["ce"] * s["tokens"] / (math.log(2) * n_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("align", "step", "quality"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench-lm-xtok")
    p.add_argument("--ce-mix", action="store_true", help="quality: the ce_weight 0.5 rows")
    p.add_argument("--cache", action="store_true", help="step: the k=32 cache rows too")
    p.add_argument(
        "--steps", type=int, default=12, help="step: steps per row (median of all but 2)"
    )
    p.add_argument(
        "--cache-k",
        type=int,
        nargs="+",
        default=[32],
        help="quality: the cache rows' k (one capture each; 32 is always there)",
    )
    p.add_argument(
        "--only",
        help="quality: the recipes matching this regular expression "
        "(and the rows their 'closed' needs)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="quality: read runs already trained in OUT/runs instead of training",
    )
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.seterr(all="ignore")
    if args.part == "align":
        bench_align(out)
    elif args.part == "step":
        bench_step(out, args.steps, args.cache)
    else:
        bench_quality(out, args.seeds, args.ce_mix, tuple(args.cache_k), args.only, args.reuse)


if __name__ == "__main__":
    main()
