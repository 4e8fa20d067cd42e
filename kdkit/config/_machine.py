"""What this machine can tell about a config before any data is read or model built.

:func:`kdkit.config.validate` checks a config on its own terms (it also runs on a run's saved
config when ``kdkit eval`` reads it on another machine). These checks are about *this*
machine and installation, for ``kdkit train`` and ``--print-config``: a ``timm:`` name the
installed timm does not know, ``device: cuda`` where torch sees no GPU, fp16 mixed precision
on the CPU. Each is one line, before minutes of data loading end in the same error.
"""

from __future__ import annotations

from typing import Any

from kdkit.errors import KDError, closest_names

__all__ = ["check_machine"]


def check_machine(cfg: Any) -> None:
    """Raise one :class:`KDError` for the first thing this machine cannot run in ``cfg``."""
    for role in ("teacher", "student"):
        model = getattr(getattr(cfg, role, None), "model", None)
        if isinstance(model, str) and model.startswith("timm:"):
            _timm_name(model.partition(":")[2], f"{role}.model")
    train = getattr(cfg, "train", None)
    if train is not None:
        _device_and_precision(getattr(train, "device", None), getattr(train, "precision", "fp32"))


def _timm_name(name: str, key: str) -> None:
    try:
        import timm
    except ImportError:
        raise KDError(
            f"config key {key!r}: timm:{name} needs the optional package timm: "
            "pip install 'kdkit[timm]'"
        ) from None
    if not timm.is_model(name):
        close = closest_names(name, timm.list_models(), 1)
        hint = f"; did you mean 'timm:{close[0]}'?" if close else ""
        raise KDError(f"config key {key!r}: timm {timm.__version__} has no model {name!r}{hint}")


def _device_and_precision(device: str | None, precision: str) -> None:
    import torch

    try:
        where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise KDError(
            f"config key 'train.device': {device!r} is not a device (cpu, cuda, cuda:N, mps)"
        ) from None
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KDError(
                f"config key 'train.device' is {device!r} but torch {torch.__version__} sees no "
                "CUDA device here; use device: cpu, or leave it out to use a GPU when there is one"
            )
        if where.index is not None and where.index >= count:
            raise KDError(f"config key 'train.device': {device!r}, but there are {count} GPUs")
    if precision == "fp16" and where.type != "cuda":
        raise KDError(
            f"config key 'train.precision': fp16 mixed precision needs a CUDA device and this "
            f"run is on {where.type}; use bf16 or fp32"
        )
