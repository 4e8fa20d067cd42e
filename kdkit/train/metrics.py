"""Accuracy and per-epoch metric logs (CSV always, TensorBoard when installed)."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from tqdm.auto import tqdm

from kdkit._io import atomic_write_text

__all__ = ["MetricLog", "epoch_line", "report_epoch"]

log = logging.getLogger(__name__)


def _label(key: str) -> str:
    """A column as the epoch line shows it: the total is ``loss`` (not ``loss_loss``), each
    part its own name (``kd``, ``ce``, ``kl``); ``metrics.csv`` keeps the column names."""
    return "loss" if key in ("loss_loss", "loss_total") else key.removeprefix("loss_")


def epoch_line(row: dict, epochs: int) -> str:
    """One epoch's row as one line, the epoch counted from 1 like the progress bar and the
    report (``metrics.csv`` keeps ``epoch`` from 0, as checkpoints and resume do)."""
    parts = [f"epoch {int(row['epoch']) + 1}/{epochs}"]
    rates = [k for k in row if k.endswith("_per_s")]
    for k, v in row.items():
        if k in ("epoch", "epoch_time_s", *rates):
            continue
        parts.append(f"{_label(k)} {v:.4g}" if isinstance(v, float) else f"{_label(k)} {v}")
    parts += [f"{row[k]:,.0f} {k.removesuffix('_per_s')}/s" for k in rates]
    if "epoch_time_s" in row:
        parts.append(f"{row['epoch_time_s']:.1f} s")
    return "  ".join(parts)


def report_epoch(line: str, show: bool) -> None:
    """Log ``line``; when nothing would show it (no logging configured, as in a plain
    script) and ``show`` (progress on, rank 0), print it under the progress bar instead."""
    if show and not (log.isEnabledFor(logging.INFO) and log.hasHandlers()):
        tqdm.write(line)
    else:
        log.info(line)


class MetricLog:
    """Appends one row per epoch to ``metrics.csv``; mirrors scalars to TensorBoard if present.

    On resume, rows from epochs at or after the resumed epoch are dropped first, so the file
    never holds an epoch twice; a column that appears in a later epoch widens the header.
    The file counts epochs from 1, like the console lines and the report (the Trainer's
    ``epoch`` in rows and checkpoints is the 0-based index of the epoch).
    """

    def __init__(self, directory: str | Path | None, resume_epoch: int | None = None) -> None:
        self.path = Path(directory) / "metrics.csv" if directory else None
        self._tb = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_epoch is not None and self.path.exists():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
            self._write_all(rows)
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path.parent / "tb"))
        except Exception:  # tensorboard is optional
            self._tb = None

    def _read(self) -> tuple[list[str], list[dict]]:
        if not self.path.exists():
            return [], []
        with self.path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def _write_all(self, rows: list[dict], fieldnames: list[str] | None = None) -> None:
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        if fieldnames is None:
            fieldnames = list(dict.fromkeys(k for r in rows for k in r))
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=fieldnames, restval="")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, out.getvalue())

    def append(self, row: dict) -> None:
        """Add one epoch's row. A column that appears later (a distillation loss starting
        at ``start_epoch > 0``) rewrites the file under the widened header, earlier rows
        left empty there, so no value ever sits under another column's name."""
        if self.path is None:
            return
        row = {**row, "epoch": int(row["epoch"]) + 1}  # counted from 1, as everywhere shown
        header, rows = self._read()
        if not header or not set(row) <= set(header):
            fieldnames = list(dict.fromkeys([*header, *row]))
            self._write_all([*rows, row], fieldnames)
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=header, restval="").writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
