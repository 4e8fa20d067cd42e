"""Does a stand-in teacher say what the reference teacher says? The shared comparison.

Two checks ask this question: the cache check (cached outputs vs the live teacher,
:mod:`kdkit.cache.check`) and the int8 gate (a quantized teacher vs its fp32 original,
:mod:`kdkit.teachers.quantize`). Both measure top-1 agreement, the mean KL divergence of the
softened distributions and the largest logit difference, accumulated over probe batches by a
:class:`FidelityTally`; this module sits on the teachers' floor so both can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdkit.errors import KDError

__all__ = ["FidelityReport", "FidelityTally", "kl_sum", "compare_logits"]


def kl_sum(p_ref: torch.Tensor, p_other: torch.Tensor) -> float:
    """``sum over rows of KL(p_ref || p_other)`` for probability rows (N, C, ...)."""
    return float(F.kl_div(p_other.clamp_min(1e-30).log(), p_ref, reduction="sum"))


@dataclass(frozen=True)
class FidelityReport:
    """Agreement of a candidate teacher with a reference on ``n_probe`` inputs.

    ``mean_kl`` is KL(reference || candidate) of the softmax at ``temperature``, averaged
    over rows; ``max_abs_diff`` is the largest logit difference.
    """

    n_probe: int
    top1_agreement: float
    mean_kl: float
    max_abs_diff: float
    temperature: float = 1.0

    def __str__(self) -> str:
        return (
            f"{self.n_probe} probes: top-1 agreement {self.top1_agreement:.2%}, "
            f"mean KL {self.mean_kl:.2e} (T={self.temperature:g}), "
            f"max |logit diff| {self.max_abs_diff:.3g}"
        )

    def refuse_below(
        self, min_agreement: float, max_kl: float | None = None, *, what: str, options: str
    ) -> None:
        """Raise :class:`KDError` naming both numbers when agreement or KL is out of bounds."""
        low = self.top1_agreement < min_agreement
        high = max_kl is not None and self.mean_kl > max_kl
        if low or high:
            bound = f"at least {min_agreement:.2%} agreement"
            if max_kl is not None:
                bound += f" and mean KL at most {max_kl:g}"
            raise KDError(
                f"{what}: top-1 agreement {self.top1_agreement:.2%} and mean KL "
                f"{self.mean_kl:.3g} at T={self.temperature:g} on {self.n_probe} probes "
                f"(required: {bound}); {options}"
            )


class FidelityTally:
    """Accumulates agreement, KL and max difference over batches (dense logits or counts)."""

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise KDError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.n, self.agree, self.kl, self.max_abs_diff = 0, 0.0, 0.0, 0.0

    def add_logits(self, reference: torch.Tensor, candidate: torch.Tensor) -> None:
        """One batch of dense logits (N, C, ...), same shape on both sides."""
        if reference.shape != candidate.shape:
            raise KDError(
                f"logit shapes differ: reference {tuple(reference.shape)}, "
                f"candidate {tuple(candidate.shape)}"
            )
        ref, cand = reference.float().cpu(), candidate.float().cpu()
        p_ref = F.softmax(ref / self.temperature, dim=1)
        p_cand = F.softmax(cand / self.temperature, dim=1)
        self.add(
            n=ref.shape[0],
            agree=float((ref.argmax(1) == cand.argmax(1)).sum()),
            kl=kl_sum(p_ref, p_cand),
            max_abs_diff=float((ref - cand).abs().max()) if ref.numel() else 0.0,
        )

    def add(self, n: int, agree: float, kl: float, max_abs_diff: float) -> None:
        """Counts computed elsewhere (e.g. on top-k outputs); ``kl`` is a sum over rows."""
        self.n += int(n)
        self.agree += agree
        self.kl += kl
        self.max_abs_diff = max(self.max_abs_diff, max_abs_diff)

    def report(self) -> FidelityReport:
        if self.n == 0:
            raise KDError("the fidelity probe is empty")
        return FidelityReport(
            self.n, self.agree / self.n, self.kl / self.n, self.max_abs_diff, self.temperature
        )


def compare_logits(
    reference: torch.Tensor, candidate: torch.Tensor, temperature: float = 1.0
) -> FidelityReport:
    """:class:`FidelityReport` of one pair of logit tensors."""
    tally = FidelityTally(temperature)
    tally.add_logits(reference, candidate)
    return tally.report()
