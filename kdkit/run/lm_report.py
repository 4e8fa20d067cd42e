"""The ``task: lm`` run's closing numbers: the teacher's held-out scores and ``report.md``."""

from __future__ import annotations

from typing import Any

from kdkit._io import atomic_write_text

__all__ = [
    "data_notes",
    "generation_lines",
    "lm_teacher_ppl",
    "lm_teacher_scores",
    "write_lm_report",
]


def lm_teacher_scores(trainer: Any, data: Any) -> dict[str, float] | None:
    """The teacher's perplexity (and bits per byte) on the run's val tokens (None without a
    teacher or val data). Every rank calls it: a sharded teacher is gathered by all of them."""
    if getattr(trainer.task, "teacher", None) is None or data.val_loader is None:
        return None
    batches = (trainer.inputs(b, augment=False) for b in data.val_loader)
    return trainer.task.score_teacher(batches, trainer.precision.autocast)


def lm_teacher_ppl(trainer: Any, data: Any) -> float | None:
    """The teacher's val perplexity alone: this function's name before bits per byte joined it
    (:func:`lm_teacher_scores` gives both)."""
    scores = lm_teacher_scores(trainer, data)
    return None if scores is None else scores["ppl"]


def data_notes(train: Any, val: Any = None) -> tuple[str, ...]:
    """The report's lines about the data: what truncation cost, per split that has one."""
    from kdkit.lm._truncate import Truncation

    notes = []
    for name, ds in (("train", train), ("val", val)):
        t = getattr(ds, "truncation", None)
        if t:
            notes.append(f"Data ({name}): {Truncation.of(t).line()}.")
    return tuple(notes)


def _teacher_name(cfg: Any, teacher: Any) -> str:
    """The teacher's row name, with the engine that ran it when not PyTorch fp32."""
    tc = cfg.teacher
    name = f"teacher `{tc.model}`"
    if (tc.backend, tc.precision) == ("torch", "fp32"):
        return name
    engine = (
        f"ONNX Runtime {tc.precision}" if tc.backend == "onnx" or tc.precision == "int8" else ""
    )
    fidelity = getattr(teacher, "fidelity", None)
    return f"{name} ({engine}" + (f"; gate: {fidelity}" if fidelity else "") + ")"


def _run_lines(cfg: Any, history: list[dict], teacher: Any = None) -> list[str]:
    """The global batch, the teacher's engine (ONNX Runtime, int8), and an on-policy run's
    samples of the last epoch."""
    from kdkit.train.options import global_batch_line

    batch = global_batch_line(cfg.data.batch_size, cfg.train.grad_accum)
    lines = [batch[0].upper() + batch[1:] + ".", ""]
    if teacher is not None and cfg.teacher is not None:  # the engine, with or without val data
        name = _teacher_name(cfg, teacher)
        if name.endswith(")"):
            lines += [f"Teacher: {name.removeprefix('teacher ')}.", ""]
    last = history[-1] if history else {}
    if "sampled_share" in last:
        text = f"On-policy samples (last epoch): {last['sampled_share']:.0%} of the batches"
        if "sample_len" in last:
            text += (
                f", mean completion {last['sample_len']:.1f} tokens, "
                f"{last['sample_clipped']:.0%} cut at max_new_tokens, entropy "
                f"{last['sample_entropy']:.3f} nats/token"
            )
        lines += [text + ".", ""]
    return lines


def _show(text: str | None, width: int = 160) -> str:
    if text is None:
        return "-"
    text = text.replace("`", "'").replace("\n", " \u23ce ").strip()
    return f"`{text[:width]}{'...' if len(text) > width else ''}`"


def generation_lines(generations: list[Any]) -> list[str]:
    """Sample generations as report lines: each prompt, the data's continuation, the
    teacher's and the student's (greedy)."""
    if not generations:
        return []
    lines = [f"Sample generations (greedy, the first {len(generations)} val rows):", ""]
    for i, g in enumerate(generations, start=1):
        lines += [
            f"{i}. prompt: {_show(g.prompt)}",
            f"   - data: {_show(g.reference)}",
            f"   - teacher: {_show(g.teacher)}",
            f"   - student: {_show(g.student)}",
        ]
    return [*lines, ""]


def _generations(trainer: Any, data: Any) -> list[Any]:
    """Greedy continuations of a few val rows (none when the models are sharded)."""
    import kdkit._sharding as fsdp
    from kdkit.errors import KDError
    from kdkit.lm.generations import sample_generations

    loader = getattr(data, "val_loader", None) or getattr(data, "train_loader", None)
    if loader is None or fsdp.is_sharded(trainer.task) or data.tokenizer is None:
        return []
    rows = [loader.dataset[i] for i in range(min(3, len(loader.dataset)))]
    try:
        return sample_generations(trainer.task.student, trainer.task.teacher, rows, data.tokenizer)
    except KDError:  # a model that cannot generate: the report goes without, the run stands
        return []


def _params(module: Any) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,}"


def _probe_lines(task: Any) -> list[str]:
    """The logits probe's findings (kdkit.lm.probe): kdkit's view of each model against the
    model's own logits, before the first step."""
    results = getattr(task, "probe_results", None) or []
    if not results:
        return []
    return (
        ["Logits probe (kdkit's view against each model's own logits, before step 1):", ""]
        + [f"- {r.line()}" for r in results]
        + [""]
    )


def _bpb(scores: dict[str, float], key: str = "bpb") -> str:
    return f"{scores[key]:.4f}" if key in scores else "-"


def write_lm_report(
    cfg: Any,
    trainer: Any,
    result: Any,
    wall_s: float,
    data: Any = None,
    teacher: dict[str, float] | None = None,
) -> None:
    """``report.md``: the teacher's val scores (``teacher``, :func:`lm_teacher_scores`) and the
    student's best epoch (perplexity, bits per byte, KL, agreement)."""
    history = trainer.history
    rows = [("model", "params", "val ppl", "val bits/byte", "val KL", "val agree (%)")]
    if teacher is not None:
        rows.append(
            (
                _teacher_name(cfg, trainer.task.teacher),
                _params(trainer.task.teacher),
                f"{teacher['ppl']:.3f}",
                _bpb(teacher),
                "-",
                "-",
            )
        )
    best = min((h for h in history if "val_ppl" in h), key=lambda h: h["val_ppl"], default=None)
    if best is not None:
        rows.append(
            (
                f"student `{cfg.student.model}` (best epoch {best['epoch'] + 1})",
                _params(trainer.task.student),
                f"{best['val_ppl']:.3f}",
                _bpb(best, "val_bpb"),
                f"{best['val_kl']:.4f}" if "val_kl" in best else "-",
                f"{best['val_agree']:.2f}" if "val_agree" in best else "-",
            )
        )
    table = [f"| {' | '.join(rows[0])} |", "|" + "---|" * len(rows[0])]
    table += [f"| {' | '.join(r)} |" for r in rows[1:]]
    tok_s = history[-1].get("tok_per_s") if history else None
    lines = [
        f"# {cfg.name}",
        "",
        *table,
        "",
        f"{cfg.train.epochs} epoch{'s' if cfg.train.epochs != 1 else ''}, divergence {cfg.distill.divergence}, "
        f"T {cfg.distill.temperature:g}, wall time {wall_s:.1f} s"
        + (f", {tok_s:,.0f} tokens/s (last epoch)" if tok_s else ""),
        "",
        *_run_lines(cfg, history, trainer.task.teacher),
        *_probe_lines(trainer.task),
        *generation_lines(_generations(trainer, data) if data is not None else []),
        *[f"{n}\n" for n in getattr(data, "notes", ())],
        f"    kdkit eval {result.run_dir}",
        f"    kdkit export {result.run_dir} --hf {result.run_dir / 'student-hf'}",
        "",
    ]
    atomic_write_text(result.run_dir / "report.md", "\n".join(lines))
