"""Counter-based random numbers on int64 tensors: the views' only source of randomness.

Every augmentation draw is a pure function of an integer key (seed, view id, sample index)
and a counter, so a cache precompute and a training run draw the same numbers on any device,
in any batch order, with no generator state to save (see :mod:`kdkit.data.views`).
"""

from __future__ import annotations

import torch

__all__ = ["splitmix64", "uniform", "beta_symmetric", "OFFSET_STREAM"]


def _signed(c: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_OFFSET_STREAM = 0x5EED0FF5E7  # salt of the per-sample view-id phase
# counters of _uniform per key: 0..4 crop and flip, 8 mixup-or-CutMix coin, 9 partner,
# 10..13 CutMix box, 16.. Beta draws (two per try)
_BETA_TRIES = 48


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (two's-complement wrap-around = uint64 math).

    Ref: Steele, Lea, Flood 2014, "Fast splittable pseudorandom number generators".
    """
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _uniform(key: torch.Tensor, counter: int) -> torch.Tensor:
    """Uniform float64 in [0, 1) from stream ``counter`` of each key (53 exact bits)."""
    return _shr(splitmix64(key + counter), 11).double() * (2.0**-53)


def _beta_symmetric(key: torch.Tensor, alpha: float) -> torch.Tensor:
    """Beta(alpha, alpha) per key from counter streams (Johnk's method, vectorised tries).

    Try ``t`` accepts when ``u^(1/a) + v^(1/a) <= 1``; the first accepted try wins. Each try
    accepts with probability >= 1/6 for alpha <= 2, so 48 tries all fail less than once in
    10^3 samples at alpha = 2 (about never at alpha <= 1); those rare keys get 0.5.
    """
    counters = torch.arange(_BETA_TRIES, dtype=torch.int64) * 2 + 16
    u = _uniform(key[:, None], counters[None])  # broadcast: (N, tries)
    v = _uniform(key[:, None], counters[None] + 1)
    a = u.clamp_min(1e-300) ** (1.0 / alpha)
    b = v.clamp_min(1e-300) ** (1.0 / alpha)
    ok = (a + b <= 1.0) & (a + b > 0.0)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    lam = (a / (a + b).clamp_min(1e-300)).gather(1, first).squeeze(1)
    return torch.where(ok.any(dim=1), lam, torch.full_like(lam, 0.5))


uniform = _uniform
beta_symmetric = _beta_symmetric
OFFSET_STREAM = _OFFSET_STREAM
