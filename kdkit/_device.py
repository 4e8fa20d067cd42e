"""Is this a device torch understands and this machine has? One check for every floor.

The CLI's ``--device``, the config's ``train.device`` and ``LoopOptions.device`` all ask it, so
it sits on the ground floor: ``config/`` and ``train/`` import it without reaching up to
``cli/``.
"""

from __future__ import annotations

from kdkit.errors import KDError

__all__ = ["check_device"]


def check_device(device: str | None, option: str = "--device") -> str | None:
    """``None`` or a device string torch understands and this machine has."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise KDError(f"{option}: {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise KDError(f"{option} {device}: no CUDA device is visible here; use {option} cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise KDError(
                f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif parsed.type != "cpu":
        raise KDError(f"{option}: kdkit runs on cpu or cuda, got {device!r}")
    return device
