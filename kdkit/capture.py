"""Collect named intermediate outputs of a model with forward hooks.

Users never rewrite their models to return features: they name modules as
``model.named_modules()`` does, and :class:`Capture` records those modules' outputs on every
forward pass. Names resolve through the wrappers PyTorch adds: ``module.`` (DDP /
DataParallel) and ``_orig_mod.`` (``torch.compile``), so the same mapping works before and
after wrapping. ``""`` names the model's own output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kdkit.errors import KDError, closest_names

__all__ = [
    "Capture",
    "capture",
    "resolve_module",
    "unwrap",
    "strip_prefixes",
]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name.replace("._orig_mod.", ".")


def resolve_module(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """Find the submodule called ``name`` in ``model`` (wrappers looked through).

    Raises :class:`KDError` naming the closest valid names when there is none.
    """
    base = unwrap(model)
    modules = dict(base.named_modules())
    key = strip_prefixes(name)
    if key in modules:
        return modules[key]
    valid = [n for n in modules if n]
    close = closest_names(key, valid)
    raise KDError(f"no module {name!r} in the {role}; did you mean one of {close}?")


def _first_tensor(output: object) -> object:
    """Modules may return tuples (e.g. attention blocks); the first tensor is the feature."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


class Capture:
    """Records the outputs of the named submodules of ``model`` while it is active.

    Use it as a context manager (``with Capture(model, names) as cap: model(x); cap["layer1"]``)
    or keep it alive across steps and call :meth:`remove` when done; either way every hook it
    registered is removed and nothing is left on the user's module. ``""`` is not hooked: the
    caller records the model's return value with :meth:`set_output`.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], role: str = "model") -> None:
        self.names = tuple(dict.fromkeys(names))
        self.outputs: dict[str, object] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        targets = {n: resolve_module(model, n, role) for n in self.names if n != ""}
        for name, module in targets.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
            self.outputs[name] = _first_tensor(output)

        return hook

    def set_output(self, output: object) -> None:
        """Record the model's own output under ``""``."""
        self.outputs[""] = output

    def clear(self) -> None:
        self.outputs = {}

    def __getitem__(self, name: str) -> object:
        try:
            return self.outputs[name]
        except KeyError:
            raise KDError(
                f"{name!r} produced no output in the last forward pass "
                f"(captured: {sorted(self.outputs)}); is that module used in forward()?"
            ) from None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextmanager
def capture(model: nn.Module, names: Iterable[str]) -> Iterator[Capture]:
    """``with capture(model, ["layer3"]) as cap: model(x)`` then ``cap["layer3"]``."""
    cap = Capture(model, names)
    try:
        yield cap
    finally:
        cap.remove()
