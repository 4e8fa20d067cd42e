"""Reports: the demo's accuracy / speed table and plot, and a ``kdkit train`` run's table and
curves (train loss, val top-1, the teacher's top-1 as a line)."""

from __future__ import annotations

import logging
import statistics
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdkit._io import atomic_path, atomic_write_text
from kdkit.bench import bench_model
from kdkit.errors import KDDeprecationWarning

log = logging.getLogger(__name__)

__all__ = [
    "write_report",
    "accuracy_table",
    "measure_speeds",
    "plot_accuracy",
    "plot_run_curves",
    "run_report_text",
]


def _speed(model: Any, input_shape: tuple[int, ...]) -> dict[str, float]:
    """CPU latency at batch 1 (p50, ms) and throughput at batch 64 (img/s), torch eager."""
    results = bench_model(model, input_shape, batch_sizes=(1, 64), backends=("eager",))
    by_batch = {r.batch_size: r for r in results}
    return {
        "params": results[0].params,
        "latency_ms": by_batch[1].latency_p50_ms,
        "img_per_s": by_batch[64].img_per_s,
    }


def _architecture(model: Any) -> Any:
    """What a model's speed depends on: its class and its weights' shapes, not their values."""
    state = getattr(model, "state_dict", None)
    if not callable(state):
        return id(model)
    shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in state().items())
    return (type(model).__qualname__, shapes)


def measure_speeds(
    results: Sequence[Any], input_shape: tuple[int, ...] = (1, 28, 28), *, rounds: int = 3
) -> list[dict[str, float]]:
    """Each run's ``params``, CPU ``latency_ms`` (batch 1, p50) and ``img_per_s`` (batch 64),
    measured with :func:`kdkit.bench.bench_model` (torch eager, warmed up): the numbers
    :func:`accuracy_table` formats.

    Fair by construction: runs of one architecture (the student from scratch and the
    distilled one) are one measurement, since their weights do not change the work; the
    architectures are measured in ``rounds`` interleaved rounds and each gets its median,
    so a drift in the machine's load does not make one model look faster than another.
    Measured separately, the demo's two students once differed by 18% in throughput.
    """
    keys = [_architecture(r.model) if r.model is not None else i for i, r in enumerate(results)]
    models: dict[Any, Any] = {}
    for k, r in zip(keys, results, strict=True):
        models.setdefault(k, r.model)  # the first run of each architecture is measured
    samples: dict[Any, list[dict[str, float]]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, model in models.items():
            samples[k].append(_speed(model, input_shape))
    median = {
        k: {f: statistics.median(s[f] for s in runs) for f in runs[0]}
        for k, runs in samples.items()
    }
    return [dict(median[k]) for k in keys]


def accuracy_table(
    results: Sequence[Any],
    input_shape: tuple[int, ...] = (1, 28, 28),
    *,
    speeds: Sequence[Mapping[str, float]] | None = None,
) -> str:
    """Markdown: model, training data, parameters, test accuracy, latency, throughput.

    ``speeds``: :func:`measure_speeds` of ``results``, measured by the caller (a table only
    formats). Without them the table measures them itself, as before; that is deprecated.
    """
    rows = [
        "| model | training data | params | test top-1 (%) | CPU latency, batch 1 (ms) "
        "| CPU throughput, batch 64 (img/s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    if speeds is None:
        warnings.warn(
            "accuracy_table() without speeds= measures the models itself; pass "
            "speeds=measure_speeds(results, input_shape)",
            KDDeprecationWarning,
            stacklevel=2,
        )
        speeds = measure_speeds(results, input_shape, rounds=1)
    for r, s in zip(results, speeds, strict=True):
        rows.append(
            f"| {r.name} | {r.data} | {s['params']:,} | {r.test_top1:.2f} "
            f"| {s['latency_ms']:.3f} | {s['img_per_s']:,.0f} |"
        )
    teacher, student = speeds[0], speeds[-1]
    best = results[-1]
    rows.append("")
    rows.append(
        f"The distilled student has {teacher['params'] / student['params']:.1f}x fewer "
        f"parameters than the teacher, runs {teacher['latency_ms'] / student['latency_ms']:.1f}x "
        f"faster at batch 1 and {student['img_per_s'] / teacher['img_per_s']:.1f}x faster at "
        f"batch 64, and is {results[0].test_top1 - best.test_top1:.2f} points below the "
        f"teacher ({best.test_top1 - results[1].test_top1:+.2f} points vs the same student "
        "trained from scratch on the labels alone)."
    )
    supervised = [r for r in results[2:-1] if r.name.startswith("student, supervised")]
    for r in supervised:  # did distillation beat labelling everything?
        rows[-1] += (
            f" The same student supervised on all {r.data} for as many epochs scores "
            f"{r.test_top1:.2f}% ({best.test_top1 - r.test_top1:+.2f} points for the distilled "
            "one)."
        )
    return "\n".join(rows)


def plot_accuracy(results: Sequence[Any], path: Path) -> Path:
    """Test accuracy per epoch of each run (x axis: fraction of that run's training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for r in results:
        acc = [h["val_top1"] for h in r.history if "val_top1" in h]
        if not acc:
            continue
        xs = [(i + 1) / len(acc) for i in range(len(acc))]
        ax.plot(xs, acc, marker="o", label=f"{r.name} ({r.data}): {r.test_top1:.2f}%")
    ax.set_xlabel("fraction of training")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Fashion-MNIST: teacher, student from scratch, distilled student")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_report(results: Sequence[Any], out_dir: Path, *, notes: Sequence[str] = ()) -> Path:
    """Write ``report.md`` and ``accuracy.png`` to ``out_dir``; log the table. ``notes``:
    Markdown paragraphs after the next steps."""
    out_dir = Path(out_dir)
    table = accuracy_table(results, speeds=measure_speeds(results))  # measure, then format
    plot = plot_accuracy(results, out_dir / "accuracy.png")
    report = out_dir / "report.md"
    next_steps = (
        "Ship the student:\n\n"
        f"    kdkit export {out_dir / 'student.pt'} --onnx {out_dir / 'student.onnx'}\n"
        f"    kdkit bench --teacher {out_dir / 'teacher.pt'} --student {out_dir / 'student.pt'}\n"
    )
    atomic_write_text(
        report,
        "# kdkit demo: Fashion-MNIST\n\n"
        + table
        + f"\n\n![accuracy per epoch]({plot.name})\n\n"
        + next_steps
        + "".join(f"\n{note}" for note in notes),
    )
    log.info("\n%s\n\nreport: %s\nplot:   %s", table, report, plot)
    return report


# -- `kdkit train` run reports ----------------------------------------------------------------


def plot_run_curves(
    history: Sequence[dict[str, Any]], path: Path, teacher_top1: float | None = None
) -> Path:
    """Three panels per epoch (whole numbers, counted from 1 as in the logs and the report):
    train losses with the val loss as a dashed line, val top-1 with the teacher's as a line,
    and the learning rate at each epoch's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110)
    for key in sorted({k for h in history for k in h if k.startswith("loss_")}):
        ax_loss.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o",
                     label=key.removeprefix("loss_"))  # fmt: skip
    if any("val_loss" in h for h in history):
        ax_loss.plot(epochs, [h.get("val_loss", float("nan")) for h in history], "k--",
                     marker="s", label="val (cross-entropy)")  # fmt: skip
    ax_loss.set_ylabel("loss (train: epoch mean)")
    ax_loss.legend(fontsize=8)
    acc = [h.get("val_top1", float("nan")) for h in history]
    ax_acc.plot(epochs, acc, marker="o", label="student")
    if teacher_top1 is not None:
        ax_acc.axhline(teacher_top1, color="gray", ls="--", label=f"teacher {teacher_top1:.2f}%")
    ax_acc.set_ylabel("val top-1 (%)")
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_lr.plot(epochs, [h.get("lr", float("nan")) for h in history], marker="o")
    ax_lr.set_ylabel("learning rate (epoch end)")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def run_report_text(
    name: str,
    history: Sequence[dict[str, Any]],
    rows: Sequence[tuple[str, ...]],
    notes: Sequence[str] = (),
) -> str:
    """Markdown of a run: the final table (model, params, precision, val top-1, val top-5)
    + the per-epoch table + curves."""
    lines = [
        f"# kdkit run: {name}",
        "",
        "| model | params | precision | val top-1 (%) | val top-5 (%) |",
        "|---|---:|---|---:|---:|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "| epoch | " + " | ".join(k for k in _columns(history)) + " |",
        "|---:|" + "---:|" * len(_columns(history)),
    ]
    for h in history:
        cells = [_fmt(h.get(k)) for k in _columns(history)]
        lines.append(f"| {h['epoch'] + 1} | " + " | ".join(cells) + " |")
    lines += ["", "![losses, val top-1 and learning rate per epoch](curves.png)", "", *notes]
    return "\n".join(lines) + "\n"


def _columns(history: Sequence[dict[str, Any]]) -> list[str]:
    keys = [k for k in (history[0] if history else {}) if k.startswith(("loss_", "val_"))]
    return keys + [k for k in ("epoch_time_s", "img_per_s") if history and k in history[0]]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
