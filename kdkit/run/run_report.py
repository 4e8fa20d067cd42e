"""The image run's closing numbers: the teacher's val top-1 and ``report.md`` + ``curves.png``
(the ``task: lm`` run's are in :mod:`kdkit.run.lm_report`)."""

from __future__ import annotations

from typing import Any

from kdkit.config import RunConfig
from kdkit.run.extend import extension_note

__all__ = ["teacher_top1", "write_run_report"]


def teacher_top1(trainer, data) -> float | None:
    from kdkit.cache import CachedTeacher
    from kdkit.run.evaluate import evaluate_logits

    teacher = trainer.distiller.teacher
    if data.val_loader is None or teacher is None or isinstance(teacher, CachedTeacher):
        return None  # a cache holds training images only
    scores = evaluate_logits(
        lambda x: teacher(x).logits, data.val_loader, data.mean, data.std, trainer.device
    )
    return scores["top1"]


def _params(module) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,}"


def write_run_report(
    cfg: RunConfig, trainer, data, result: Any, wall_s: float, extended=None, choices=()
) -> None:
    from kdkit._io import atomic_write_text
    from kdkit.report import plot_run_curves, run_report_text
    from kdkit.run.teacher_info import teacher_summary

    history = trainer.history
    best = max((h for h in history if "val_top1" in h), key=lambda h: h["val_top1"], default=None)
    rows = []
    teacher = trainer.distiller.teacher
    if teacher is not None:  # an ONNX or cached teacher too: its size and how it ran
        params, precision = teacher_summary(teacher, cfg.teacher.precision)
        top1 = "-" if result.teacher_score is None else f"{result.teacher_score:.2f}"
        rows.append((f"teacher `{cfg.teacher.model}`", params, precision, top1, "-"))
    if best is not None:
        rows.append(
            (
                f"student `{cfg.student.model}` (best epoch {best['epoch'] + 1})",
                _params(trainer.distiller.student),
                cfg.train.precision,
                f"{best['val_top1']:.2f}",
                f"{best['val_top5']:.2f}",
            )
        )
    plot_run_curves(history, result.run_dir / "curves.png", result.teacher_score)
    epochs = f"{cfg.train.epochs} epoch{'s' if cfg.train.epochs != 1 else ''}"
    notes = [
        f"{epochs}, wall time {wall_s:.1f} s (this invocation). Next:",
        "",
        f"    kdkit eval {result.run_dir}",
        f"    kdkit export {result.run_dir} --onnx {result.run_dir / 'student.onnx'}",
        f"    kdkit bench {result.run_dir}",
    ]
    notes += _choice_notes(choices)
    notes += _unreadable_notes(data)
    if extended or (result.run_dir / "extended.json").is_file():
        notes += ["", extension_note(result.run_dir, extended)]
    text = run_report_text(cfg.name, history, rows, notes)
    atomic_write_text(result.run_dir / "report.md", text)


def _choice_notes(choices) -> list[str]:
    """The report's lines on the ``auto`` defaults: what each chose and what measuring cost."""
    if not choices:
        return []
    lines = ["", "Chosen by measurement on the first batch (`auto`, recorded in choices.json):"]
    for c in choices:
        lines.append(f"- {c.line()}")
    cost = sum(c.cost_s for c in choices if c.measured)
    lines.append(f"- measuring cost {cost:.1f} s of this run")
    return lines


def _unreadable_notes(data) -> list[str]:
    """The report's line on files no decoder could read (skipped, so the run went on)."""
    lines = []
    for split, loader in (("train", data.train_loader), ("val", data.val_loader)):
        record = getattr(loader, "unreadable", None)
        if record is not None and record.count:
            lines.append(f"- {split}: {record.summary()}")
    return ["", "Unreadable files (skipped, the run went on):", *lines] if lines else []
