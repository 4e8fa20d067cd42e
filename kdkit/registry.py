"""How a file or a config names a model: data, never code.

A model spec is a string ``"PREFIX:NAME"`` plus plain keyword values::

    {"model": "torchvision:resnet18", "kwargs": {"num_classes": 10}}

Registered prefixes build models without running anything the file chose:

- ``kdkit:NAME``       a builder in ``kdkit.models.MODELS`` or one registered with
  :func:`register_model`
- ``torchvision:NAME`` ``torchvision.models.get_model(NAME, **kwargs)``
- ``timm:NAME``        ``timm.create_model(NAME, **kwargs)`` (extra ``timm``)
- ``open_clip:NAME``   ``open_clip.create_model(NAME, **kwargs)`` (extra ``clip``)

``python:pkg.module:callable`` imports and calls arbitrary code, so it is refused unless the
caller passes ``trust_code=True`` (CLI: ``--trust-code``), like ``trust_remote_code`` in
transformers. A checkpoint that names ``subprocess:call`` is therefore refused before anything
is imported. Keyword values must be plain data (None, bool, int, float, str, and lists/dicts
of those): a spec can choose *which* registered model, never *what code* runs.

Checkpoints from kdkit 0.1 wrote ``{"factory": "pkg.mod:fn"}``; :meth:`ModelSpec.parse` maps
``kdkit.models:NAME`` onto ``kdkit:NAME`` and anything else onto ``python:`` (so it needs
trust).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kdkit.errors import KDError, closest_names
from kdkit.models import MODELS

__all__ = [
    "ModelSpec",
    "build_model",
    "check_plain",
    "list_models",
    "register_builder",
    "register_model",
    "resolve_python_callable",
    "import_optional",
]

Builder = Callable[..., nn.Module]
# prefix -> function(name) -> builder (raises KDError for an unknown name)
_RESOLVERS: dict[str, Callable[[str], Builder]] = {}
_KDKIT_MODELS: dict[str, Builder] = {}  # users' register_model builders (kdkit's: MODELS)


@dataclass(frozen=True)
class ModelSpec:
    """``model`` (``"PREFIX:NAME"``) and plain ``kwargs``: everything needed to rebuild."""

    model: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.model.partition(":")[0]

    @property
    def name(self) -> str:
        return self.model.partition(":")[2]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "kwargs": dict(self.kwargs)}

    @classmethod
    def parse(cls, obj: Any, *, where: str = "model spec") -> ModelSpec:
        """A spec from a string, ``{"model", "kwargs"}``, a legacy ``{"factory", "kwargs"}``
        dict, or a :class:`ModelSpec`. Checks shape and plain values; imports nothing."""
        if isinstance(obj, ModelSpec):
            return obj
        if isinstance(obj, str):
            obj = {"model": obj}
        if not isinstance(obj, Mapping):
            raise KDError(
                f"{where} must be a string like 'torchvision:resnet18' or a mapping "
                f"with 'model' and 'kwargs', got {type(obj).__name__}"
            )
        obj = dict(obj)
        if "factory" in obj and "model" not in obj:
            obj["model"] = _from_legacy_factory(obj.pop("factory"), where)
        unknown = sorted(set(obj) - {"model", "kwargs"})
        if unknown:
            raise KDError(
                f"{where}: unknown key(s) {unknown}; a model spec has 'model' and 'kwargs'"
            )
        model, kwargs = obj.get("model"), obj.get("kwargs") or {}
        if not isinstance(model, str) or ":" not in model:
            raise KDError(
                f"{where}: model must be a string 'PREFIX:NAME' with a prefix in "
                f"{sorted(_RESOLVERS) + ['python']}, got {model!r}"
            )
        if not isinstance(kwargs, Mapping):
            raise KDError(f"{where}: kwargs must be a mapping, got {type(kwargs).__name__}")
        check_plain(kwargs, f"{where} kwargs")
        return cls(model, dict(kwargs))


def _from_legacy_factory(factory: Any, where: str) -> str:
    if not isinstance(factory, str) or ":" not in factory:
        raise KDError(f"{where}: factory must be 'package.module:callable', got {factory!r}")
    module_name, _, attr = factory.partition(":")
    if module_name == "kdkit.models":
        return f"kdkit:{attr}"
    return f"python:{factory}"


def check_plain(value: Any, where: str) -> None:
    """Refuse anything but None, bool, int, float, str and lists/dicts of those."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise KDError(f"{where}: keys must be strings, got {k!r}")
            check_plain(v, f"{where}.{k}")
        return
    raise KDError(
        f"{where}: {type(value).__name__} is not a plain value (None, bool, number, "
        "string, list or mapping)"
    )


# -- registration -----------------------------------------------------------------------


def register_builder(prefix: str, resolve: Callable[[str], Builder]) -> None:
    """Register ``prefix:`` model strings: ``resolve(name)`` returns a builder or raises."""
    if not prefix.isidentifier() or prefix == "python":
        raise ValueError(f"invalid prefix {prefix!r}")
    _RESOLVERS[prefix] = resolve


def register_model(fn: Builder | None = None, *, name: str | None = None) -> Any:
    """Decorator: make ``fn`` buildable as ``kdkit:NAME`` (``name`` defaults to fn's name)."""

    def deco(f: Builder) -> Builder:
        _KDKIT_MODELS[name or f.__name__] = f
        return f

    return deco(fn) if fn is not None else deco


def list_models(prefix: str = "kdkit") -> list[str]:
    """Names buildable under ``prefix`` (may import the optional package)."""
    if prefix == "kdkit":
        return sorted(_kdkit_models())
    if prefix == "torchvision":
        import torchvision

        return sorted(torchvision.models.list_models())
    if prefix == "timm":
        return sorted(import_optional("timm", "timm").list_models())
    if prefix == "open_clip":
        return sorted(import_optional("open_clip", "clip").list_models())
    raise KDError(f"unknown model prefix {prefix!r}; known: {sorted(_RESOLVERS)}")


def _kdkit_models() -> dict[str, Builder]:
    """kdkit's own models, then the user's (a user's builder of the same name wins)."""
    return {**MODELS, **_KDKIT_MODELS}


def _unknown(prefix: str, name: str, names: list[str]) -> KDError:
    return KDError(
        f"no model {name!r} under {prefix}:; did you mean {closest_names(name, names, 3)}?"
    )


def _resolve_kdkit(name: str) -> Builder:
    models = _kdkit_models()
    if name not in models:
        raise _unknown("kdkit", name, sorted(models))
    return models[name]


def _resolve_torchvision(name: str) -> Builder:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise _unknown("torchvision", name, names)
    return lambda **kw: torchvision.models.get_model(name, **kw)


def import_optional(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KDError(
            f"this model needs the optional package {module!r}: pip install 'kdkit[{extra}]'"
        ) from None


def _resolve_timm(name: str) -> Builder:
    timm = import_optional("timm", "timm")
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())
    return lambda **kw: timm.create_model(name, **kw)


def _resolve_open_clip(name: str) -> Builder:
    open_clip = import_optional("open_clip", "clip")
    names = open_clip.list_models()
    if name not in names:
        raise _unknown("open_clip", name, names)
    return lambda **kw: open_clip.create_model(name, **kw)


register_builder("kdkit", _resolve_kdkit)
register_builder("torchvision", _resolve_torchvision)
register_builder("timm", _resolve_timm)
register_builder("open_clip", _resolve_open_clip)


def resolve_python_callable(target: str, trust_code: bool, where: str) -> Builder:
    """The callable ``python:pkg.module:attr`` names, imported only with ``trust_code``;
    otherwise a KDError naming the import it would have run."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise KDError(f"{where}: expected 'python:package.module:callable', got 'python:{target}'")
    if not trust_code:
        raise KDError(
            f"{where} names code to run: it would import {module_name!r} and call {attr!r}. "
            "kdkit only builds registered models (kdkit:, torchvision:, timm:, open_clip:) from "
            "files; if you trust this source, pass trust_code=True (CLI: --trust-code)"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise KDError(f"{where}: cannot import {module_name!r}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise KDError(f"{where}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise KDError(f"{where}: python:{target} is not callable")
    return obj


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def build_model(spec: Any, *, trust_code: bool = False, where: str = "model spec") -> nn.Module:
    """Build the module a spec names (random init unless its kwargs ask for weights).

    ``spec``: anything :meth:`ModelSpec.parse` accepts. ``python:`` specs need
    ``trust_code=True``; the refusal says which import it would have run.
    """
    spec = ModelSpec.parse(spec, where=where)
    prefix, name = spec.prefix, spec.name
    if prefix == "python":
        builder = resolve_python_callable(name, trust_code, where)
    elif prefix in _RESOLVERS:
        builder = _RESOLVERS[prefix](name)
    else:
        raise KDError(
            f"{where}: unknown model prefix {prefix!r} in {spec.model!r}; use one of "
            f"{sorted(_RESOLVERS)} (or python:pkg.module:callable with trust_code=True)"
        )
    try:
        module = builder(**spec.kwargs)
    except TypeError as err:
        raise KDError(f"{where}: {spec.model} does not take these kwargs: {err}") from None
    except (ValueError, RuntimeError, ZeroDivisionError, OverflowError) as err:
        if isinstance(err, KDError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise KDError(
            f"{where}: {spec.model}({_kwargs_text(spec.kwargs)}) cannot be built: {first}"
        ) from None
    if not isinstance(module, nn.Module):
        raise KDError(f"{where}: {spec.model} returned {type(module).__name__}, not an nn.Module")
    return module


# The weights-file half (strip_wrapper_prefixes, read_state_dict, load_weights) lives next to
# the checkpoint code in kdkit.load, which imports this module: re-exported lazily.
_MOVED_TO_LOAD = ("strip_wrapper_prefixes", "read_state_dict", "load_weights")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_LOAD:  # kdkit.load imports this module: no import back
        raise KDError(f"kdkit.registry.{name} moved to kdkit.load.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
