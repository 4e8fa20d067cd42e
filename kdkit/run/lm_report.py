"""The ``task: lm`` run's closing numbers: the teacher's held-out scores and ``report.md``."""

from __future__ import annotations

from typing import Any

from kdkit._io import atomic_write_text

__all__ = ["lm_teacher_scores", "write_lm_report"]


def lm_teacher_scores(trainer: Any, data: Any) -> dict[str, float] | None:
    """The teacher's perplexity (and bits per byte) on the run's val tokens (None without a
    teacher or val data). Every rank calls it: a sharded teacher is gathered by all of them."""
    if getattr(trainer.task, "teacher", None) is None or data.val_loader is None:
        return None
    batches = (trainer.inputs(b, augment=False) for b in data.val_loader)
    return trainer.task.score_teacher(batches, trainer.precision.autocast)


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
    cfg: Any, trainer: Any, result: Any, wall_s: float, teacher: dict[str, float] | None = None
) -> None:
    """``report.md``: the teacher's val scores (``teacher``, :func:`lm_teacher_scores`) and the
    student's best epoch (perplexity, bits per byte, KL, agreement)."""
    history = trainer.history
    rows = [("model", "params", "val ppl", "val bits/byte", "val KL", "val agree (%)")]
    if teacher is not None:
        rows.append(
            (
                f"teacher `{cfg.teacher.model}`",
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
        *_probe_lines(trainer.task),
        f"    kdkit eval {result.run_dir}",
        f"    kdkit export {result.run_dir} --hf {result.run_dir / 'student-hf'}",
        "",
    ]
    atomic_write_text(result.run_dir / "report.md", "\n".join(lines))
