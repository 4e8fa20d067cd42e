"""Where the teacher's probability mass goes through the vocabulary map: ``kdkit lm vocab-map``.

"Which mass went where is measured, not assumed": given the mass each teacher token carries
over a corpus sample (the teacher model's next-token probabilities summed over the sample's
positions, or, without weights, how often the teacher's tokenizer emits each token), the report
splits it into mass that maps **exactly** (the student has the same string), through
**decomposition** (the student gets the first of several pieces: numbers for a digit-splitting
student, runs of spaces, rare scripts), **special** tokens mapped by role, and mass that maps
**not at all**; and lists the teacher tokens that lose the most (decomposed or unmapped mass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdkit.lm.xtok.tokenbytes import TokenBytes
from kdkit.lm.xtok.vocabmap import DECOMPOSED, KIND_NAMES, UNMAPPED, VocabMap

__all__ = ["Coverage", "coverage", "format_coverage"]


@dataclass(frozen=True)
class Coverage:
    """Shares of the mass by map kind (they sum to 1), the token counts by kind, the mass's
    source (``"teacher model"`` / ``"token counts"``) and the worst tokens: ``(text, kind,
    student pieces, share of all mass)``."""

    shares: dict[str, float]
    tokens: dict[str, int]
    source: str
    positions: int
    worst: list[tuple[str, str, int, float]]


def coverage(
    vmap: VocabMap,
    mass: np.ndarray,
    teacher_bytes: TokenBytes,
    *,
    source: str,
    positions: int,
    top: int = 15,
) -> Coverage:
    """The :class:`Coverage` of ``mass`` (``[Vt]``, any non-negative scale)."""
    mass = np.asarray(mass, dtype=np.float64)[: vmap.teacher_vocab]
    total = float(mass.sum()) or 1.0
    kind = np.asarray(vmap.kind, dtype=np.int64)[: mass.shape[0]]
    shares = {name: float(mass[kind == k].sum() / total) for k, name in KIND_NAMES.items()}
    lossy = np.where((kind == DECOMPOSED) | (kind == UNMAPPED), mass, 0.0)
    order = np.argsort(-lossy, kind="stable")[:top]
    worst = [
        (
            teacher_bytes.piece(int(t)).decode("utf-8", errors="backslashreplace")
            or teacher_bytes.special_class.get(int(t), "?"),
            KIND_NAMES[int(kind[t])],
            int(vmap.pieces[t]),
            float(lossy[t] / total),
        )
        for t in order.tolist()
        if lossy[t] > 0
    ]
    return Coverage(shares, vmap.counts(), source, positions, worst)


def format_coverage(c: Coverage) -> list[str]:
    """The report's lines (plain text, one fact a line)."""
    s = c.shares
    lines = [
        f"teacher mass over {c.positions} positions ({c.source}):",
        f"  exact       {100 * s['exact']:6.2f}%   ({c.tokens['exact']} tokens)",
        f"  decomposed  {100 * s['decomposed']:6.2f}%   ({c.tokens['decomposed']} tokens)",
        f"  special     {100 * s['special']:6.2f}%   ({c.tokens['special']} tokens)",
        f"  unmapped    {100 * s['unmapped']:6.2f}%   ({c.tokens['unmapped']} tokens)",
    ]
    if c.worst:
        lines.append("tokens losing the most mass (decomposed: the student gets the first piece):")
        for text, kind, pieces, share in c.worst:
            lines.append(f"  {text!r:>24}  {kind:10}  {pieces} pieces  {100 * share:6.3f}%")
    return lines
