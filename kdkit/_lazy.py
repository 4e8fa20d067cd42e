"""The lazy face of a package (PEP 562): names resolve to their modules on first use.

``import kdkit`` (and ``import kdkit.train``, ``kdkit.data``, ``kdkit.run``) then costs no
torch, torchvision or CLI, and a name is imported only when a user reaches for it. One helper
for every face, so they agree: a public name, a subpackage (``kdkit.teachers`` is an
attribute of ``kdkit`` as well as a module, as SPEC 1's ``lazy_loader`` has it), a moved name
(with a :class:`~kdkit.errors.KDDeprecationWarning` naming the new one), else AttributeError.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_face"]


def lazy_face(
    package: str,
    public: Mapping[str, str],
    *,
    submodules: Iterable[str] = (),
    moved: Mapping[str, tuple[str, str, str]] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``public`` maps a name to the module that
    defines it, ``submodules`` are reachable as attributes, ``moved`` maps an old name to
    ``(module, attribute, what to use instead)``."""
    subs = tuple(submodules)
    moved = dict(moved or {})

    def __getattr__(name: str) -> Any:
        module = importlib.import_module(package)
        if name in public:
            value = getattr(importlib.import_module(public[name]), name)
        elif name in subs:
            value = importlib.import_module(f"{package}.{name}")
        elif name in moved:
            from kdkit.errors import KDDeprecationWarning

            where, attr, new = moved[name]
            warnings.warn(f"{package}.{name} moved: use {new}", KDDeprecationWarning, stacklevel=2)
            found = importlib.import_module(where)  # attr "": the module itself moved
            return getattr(found, attr) if attr else found
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(module, name, value)  # resolved once
        return value

    def __dir__() -> list[str]:
        return sorted({*public, *subs, *moved})

    return __getattr__, __dir__
