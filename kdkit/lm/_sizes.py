"""A model folder's ``config.json`` read before transformers builds anything (private).

transformers validates a config with whatever exception its code meets (a ``ZeroDivisionError``
for zero heads, a ``RuntimeError`` for a negative vocabulary, a strict-dataclass error for a
string) and allocates what the config declares: ``vocab_size: 1e9`` asks for 64 GB, a
million layers for tens of GB of Python objects before the first weight. Here the sizes a
decoder is made of are checked as numbers, with the key named, and the model's memory is
estimated and compared with this process's memory before anything is allocated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdkit.errors import KDError

__all__ = ["check_model_config", "memory_available"]

#: size keys of common decoder configs (transformers' names and GPT-2's)
_SIZES = {
    "vocab": ("vocab_size",),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "inter": ("intermediate_size", "n_inner", "ffn_dim"),
    "positions": ("max_position_embeddings", "n_positions"),
}
_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
#: Python objects of one decoder layer, measured on the meta device (transformers 5, Llama:
#: 27-53 KiB); a million layers is tens of GB before any weight
_LAYER_OVERHEAD = 32 << 10


def memory_available() -> int:
    """Bytes this process may still allocate: the machine's memory, less where an address
    space limit (``ulimit -v``) or a cgroup limit is lower."""
    import resource

    page = os.sysconf("SC_PAGE_SIZE")
    limit = os.sysconf("SC_PHYS_PAGES") * page
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * page
        limit = min(limit, soft - used)
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(cgroup).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return max(limit, 0)


def _size(cfg: dict[str, Any], what: str, where: str) -> tuple[str, int] | None:
    """``(key, value)`` of the first key of ``what`` the config has, checked as an integer
    >= 1 (a missing one is None: the model class has its default)."""
    for key in _SIZES[what]:
        if key in cfg and cfg[key] is not None:
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KDError(f"{where}: {key} must be an integer >= 1, got {value!r}")
            return key, value
    return None


def check_model_config(folder: str | os.PathLike, dtype: str | None, spec: str) -> None:
    """Refuse (one line naming the key) a ``config.json`` whose sizes no model can have, or
    whose model would not fit this process's memory (parameters at ``dtype``, else the
    config's, else float32, and each layer's Python objects)."""
    path = Path(folder) / "config.json"
    where = f"{spec} ({path})"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise KDError(f"{where} is not a readable JSON file: {err}".splitlines()[0]) from None
    if not isinstance(cfg, dict):
        raise KDError(f"{where} must hold a JSON object (the model's settings)")
    text = cfg.get("text_config")  # a multimodal config keeps its decoder's sizes here
    sizes = {w: _size(cfg, w, where) for w in _SIZES}
    if isinstance(text, dict) and sizes["hidden"] is None:
        sizes = {w: _size(text, w, where) for w in _SIZES}
    value = {w: (s[1] if s else None) for w, s in sizes.items()}
    heads, kv, hidden = value["heads"], value["kv_heads"], value["hidden"]
    if heads and kv and heads % kv:
        raise KDError(
            f"{where}: num_attention_heads {heads} is not a multiple of {sizes['kv_heads'][0]} {kv}"
        )
    if heads and hidden and "head_dim" not in cfg and hidden % heads:
        raise KDError(
            f"{where}: {sizes['hidden'][0]} {hidden} is not a multiple of "
            f"{sizes['heads'][0]} {heads}; set one so that it divides the other"
        )
    if not (value["vocab"] and hidden):
        return  # not a decoder we can size: transformers decides
    layers, inter = value["layers"] or 1, value["inter"] or 4 * hidden
    tied = bool(cfg.get("tie_word_embeddings", False))
    params = value["vocab"] * hidden * (1 if tied else 2) + layers * (
        4 * hidden * hidden + 3 * hidden * inter
    )
    width = _BYTES.get(str(dtype or cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), 4)
    need = params * width + layers * _LAYER_OVERHEAD
    have = memory_available()
    if need > have:
        raise KDError(
            f"{where} describes a model of about {params / 1e9:.3g}B parameters and "
            f"{layers:,} layers ({need / 2**30:.1f} GiB to build) but this process has "
            f"{have / 2**30:.1f} GiB of memory; check vocab_size, {sizes['hidden'][0]} and "
            "num_hidden_layers (nothing was allocated)"
        )
