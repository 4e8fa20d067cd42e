"""Checkpoint files (re-exported from :mod:`kdkit.load`) and the RNG state (from
:mod:`kdkit.train.resume`); kept so existing imports work."""

from kdkit.load import FORMAT, VERSION, load_checkpoint, save_checkpoint
from kdkit.train.resume import rng_state, set_rng_state

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]
