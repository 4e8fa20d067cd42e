"""``kdkit demo lm``: distill a tiny Llama on the Python documentation, through ``kdkit train``.

Real text (the reStructuredText sources of Debian's ``python3.11-doc``, ~11 M characters; the
CPython standard library's own sources when that package is missing), a byte-level BPE
tokenizer trained here, a teacher Llama trained once on the text and cached under
``~/.cache/kdkit/lm-demo`` (as the vision demo caches its teacher), and a smaller student
trained four ways on the same tokens: from scratch (cross-entropy) and distilled with forward
KL, reverse KL and JSD. Every run is a ``task: lm`` config run through the same front door as
``kdkit train`` (:func:`kdkit.run.train_run`); the table reports held-out perplexity and bits
per byte, the share of the scratch-to-teacher gap each student closes, parameters and tokens/s.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sysconfig
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdkit.config import load_config, resolve_paths

__all__ = [
    "LMDemoConfig",
    "demo_corpus",
    "demo_teacher_dir",
    "llama_folder",
    "run_lm_demo",
    "student_test_ppl",
    "teacher_test_ppl",
    "teacher_test_scores",
    "train_demo_run",
    "write_splits",
]

log = logging.getLogger(__name__)

DOC_DIRS = ("/usr/share/doc/python3.11/html/_sources", "/usr/share/doc/python3.11-doc")


@dataclass(frozen=True)
class LMDemoConfig:
    out_dir: str = "runs/demo-lm"
    cache_dir: str = str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdkit" / "lm-demo"
    )
    chars: int = 1_500_000  # of the corpus, split 90/5/5 into train / val / test
    vocab: int = 2048
    max_length: int = 128
    batch_size: int = 16
    teacher: tuple[int, int, int] = (128, 4, 4)  # hidden, layers, heads
    student: tuple[int, int, int] = (64, 2, 2)
    teacher_epochs: int = 4
    student_epochs: int = 1
    lr: float = 3e-3
    seed: int = 0
    divergences: tuple[str, ...] = ("fkl", "rkl", "jsd")
    retrain: bool = False
    progress: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> LMDemoConfig:
        return replace(cls(chars=400_000, teacher_epochs=3, divergences=("fkl",)), **overrides)


def demo_corpus() -> tuple[list[Path], str]:
    """The demo's text files and where they come from."""
    for root in DOC_DIRS:
        files = sorted(Path(root).rglob("*.txt")) + sorted(Path(root).rglob("*.rst"))
        if files:
            return files, f"Python documentation sources ({root})"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py"))
    return (
        files,
        f"CPython standard library sources ({stdlib}; apt-get install python3.11-doc for the docs)",
    )


def write_splits(cfg: LMDemoConfig, root: Path) -> tuple[Path, Path, Path, str]:
    files, source = demo_corpus()
    docs = []
    for f in files:
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    random.Random(cfg.seed).shuffle(docs)
    text = "\n\n".join(docs)[: cfg.chars]
    cut1, cut2 = int(len(text) * 0.9), int(len(text) * 0.95)
    out = []
    for name, part in (("train", text[:cut1]), ("val", text[cut1:cut2]), ("test", text[cut2:])):
        path = root / f"{name}.txt"
        path.write_text(part, encoding="utf-8")
        out.append(path)
    return out[0], out[1], out[2], source


def llama_folder(path: Path, tokenizer: Any, shape: tuple[int, int, int], ctx: int) -> Path:
    from transformers import LlamaConfig

    hidden, layers, heads = shape
    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=ctx,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _model_string(teacher: Path | str) -> str:
    """A teacher folder as ``hf:DIR``; a model string (``cache:DIR``) as it is."""
    return str(teacher) if str(teacher).startswith("cache:") else f"hf:{teacher}"


def train_demo_run(
    cfg: LMDemoConfig, name: str, student: Path, teacher: Path | None, files, **distill
):
    """One ``task: lm`` config through kdkit train's front door; returns (result, seconds)."""
    from kdkit.run import train_run

    train, val, _ = files
    epochs = distill.pop("epochs")
    data = {
        "task": "lm",
        "name": name,
        "student": {"model": f"hf-config:{student}"},
        "teacher": None if teacher is None else {"model": _model_string(teacher)},
        "data": {
            "text_files": [str(train)],
            "val": {"text_files": [str(val)]},
            "max_length": cfg.max_length,
            "batch_size": cfg.batch_size,
        },
        "distill": distill,
        "train": {
            "epochs": epochs,
            "seed": cfg.seed,
            "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": 0.01},
            "scheduler": {"name": "CosineAnnealingLR", "interval": "step"},
            "max_grad_norm": 1.0,
            "progress": cfg.progress,
        },
        "run_dir": str(Path(cfg.out_dir) / name),
    }
    run_cfg = resolve_paths(load_config(data=data))
    start = time.perf_counter()
    result = train_run(run_cfg, trust_code=False)  # the demo's own folders
    return result, time.perf_counter() - start


def student_test_ppl(run_dir: Path, test: Path) -> dict[str, float]:
    import torch

    from kdkit.run.lm_tools import evaluate_lm_run

    scores = evaluate_lm_run(
        run_dir, torch.device("cpu"), teacher=False, data=[str(test)], trust_code=False, samples=0
    )
    return scores["student"]


def run_lm_demo(cfg: LMDemoConfig) -> Path:
    """Run the demo; returns the path of its Markdown report (also printed by the CLI)."""
    import shutil

    from transformers import AutoTokenizer

    from kdkit.lm._hf import from_folder
    from kdkit.lm.tokenizer import train_bpe_tokenizer

    out = Path(cfg.out_dir)
    if out.exists():
        shutil.rmtree(out)  # the demo's own directory: every run starts clean
    out.mkdir(parents=True)
    data_dir = out / "data"
    data_dir.mkdir()
    train, val, test, source = write_splits(cfg, data_dir)
    teacher_dir = demo_teacher_dir(cfg)
    cache, key = teacher_dir.parent.parent, teacher_dir.parent.name
    start = time.perf_counter()
    if cfg.retrain or not (teacher_dir / "config.json").is_file():
        tok_dir = train_bpe_tokenizer([train], cfg.vocab, cache / key / "tokenizer")
        tokenizer = from_folder(AutoTokenizer, tok_dir, trust_code=False)  # the demo's own
        init = llama_folder(cache / key / "teacher-init", tokenizer, cfg.teacher, cfg.max_length)
        result, _ = train_demo_run(
            cfg, "teacher", init, None, (train, val, test), epochs=cfg.teacher_epochs
        )
        from kdkit.run.lm_tools import export_hf

        if teacher_dir.exists():
            shutil.rmtree(teacher_dir)
        export_hf(result.run_dir, teacher_dir, trust_code=False)
    teacher_s = time.perf_counter() - start
    tokenizer = from_folder(AutoTokenizer, teacher_dir, trust_code=False)
    student_dir = llama_folder(out / "student-init", tokenizer, cfg.student, cfg.max_length)
    rows = []
    runs = [("scratch", None, {"epochs": cfg.student_epochs})]
    runs += [
        (f"kd-{d}", teacher_dir, {"epochs": cfg.student_epochs, "divergence": d})
        for d in cfg.divergences
    ]
    for name, teacher, distill in runs:
        result, wall = train_demo_run(
            cfg, name, student_dir, teacher, (train, val, test), **distill
        )
        scores = student_test_ppl(result.run_dir, test)
        tok_s = result.history[-1].get("tok_per_s", 0.0)
        rows.append((name, scores["ppl"], scores.get("bpb"), tok_s, wall))
    teacher = teacher_test_scores(teacher_dir, test, cfg)
    return _report(cfg, out, source, rows, teacher, teacher_dir, student_dir, teacher_s)


def demo_teacher_dir(cfg: LMDemoConfig) -> Path:
    """Where the demo keeps the teacher it trained for ``cfg`` (corpus size, tokenizer, shape,
    epochs and seed in the name), so benchmarks reuse it instead of training their own."""
    shape = "x".join(map(str, cfg.teacher))
    key = (
        f"v1-{cfg.chars}c-{cfg.vocab}v-{cfg.max_length}l-{shape}-{cfg.teacher_epochs}e-{cfg.seed}s"
    )
    return Path(cfg.cache_dir) / key / "teacher"


def teacher_test_scores(teacher_dir: Path, test: Path, cfg: LMDemoConfig) -> dict[str, float]:
    """The teacher's test perplexity and bits per byte, on the rows the students' test scores
    read (:func:`kdkit.run.lm_job.build_lm_data`: the same split, packing and batches)."""
    from kdkit.config import LMDataConfig, LMModelConfig, LMRunConfig
    from kdkit.lm.models import load_lm, max_positions
    from kdkit.lm.task import LMTask
    from kdkit.run.lm_job import build_lm_data, eval_byte_lengths

    model, tok = load_lm(f"hf:{teacher_dir}", trust_code=False)
    run = LMRunConfig(
        student=LMModelConfig(model=f"hf:{teacher_dir}"),
        data=LMDataConfig(
            text_files=(str(test),), max_length=cfg.max_length, batch_size=cfg.batch_size
        ),
    )
    loader = build_lm_data(run, tok, max_positions(model)).train_loader
    return LMTask(model, None, byte_lengths=eval_byte_lengths(tok)).evaluate(iter(loader))


def _params(folder: Path) -> int:
    from kdkit.lm.models import load_lm

    model, _ = load_lm(f"hf-config:{folder}", trust_code=False)
    return sum(p.numel() for p in model.parameters())


def _bpb(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _report(cfg, out, source, rows, teacher, teacher_dir, student_dir, teacher_s) -> Path:
    scratch = next(r[1] for r in rows if r[0] == "scratch")
    teacher_ppl = teacher["ppl"]
    n_teacher, n_student = _params(teacher_dir), _params(student_dir)
    lines = [
        "# kdkit demo lm",
        "",
        f"Corpus: {source}, {cfg.chars:,} characters (90% train, 5% val, 5% test). "
        f"Byte-level BPE, {cfg.vocab} tokens, rows of {cfg.max_length}. "
        f"Students: {cfg.student_epochs} epoch(s) on the same tokens, chosen on val, scored on test.",
        "",
        "| model | params | test perplexity | test bits/byte | gap closed | tokens/s (train) | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| teacher | {n_teacher:,} | {teacher_ppl:.2f} | {_bpb(teacher.get('bpb'))} | - | - | {teacher_s:.0f} (cached after the first run) |",
    ]
    for name, ppl, bpb, tok_s, wall in rows:
        gap = "-"
        if name != "scratch" and teacher_ppl < scratch:
            gap = f"{(scratch - ppl) / (scratch - teacher_ppl):.0%}"
        lines.append(
            f"| student, {name} | {n_student:,} | {ppl:.2f} | {_bpb(bpb)} | {gap} | {tok_s:,.0f} | {wall:.0f} |"
        )
    lines += ["", "gap closed = (scratch - student) / (scratch - teacher) test perplexity.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "results.json").write_text(
        json.dumps({"rows": rows, "teacher_ppl": teacher_ppl, "teacher_bpb": teacher.get("bpb")})
    )
    return path


def teacher_test_ppl(teacher_dir: Path, test: Path, cfg: LMDemoConfig) -> float:
    """The teacher's test perplexity alone: the name this function had before bits per byte
    joined it (:func:`teacher_test_scores` gives both)."""
    return teacher_test_scores(teacher_dir, test, cfg)["ppl"]
