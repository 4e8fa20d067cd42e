"""ModelOpt's promise that a converted model "dynamically becomes a subclass of the original's",
kept without swapping the student's class.

ModelOpt changes ``student.__class__`` in place. kdkit never does (STYLE.md, habit 4): instead
the wrapper around the student is an instance of a class made once per student class,
``DistillationModel[ResNet]``, whose bases are ``(DistillationModel, ResNet)``. So
``isinstance(wrapper, ResNet)`` holds while the student itself stays exactly what it was.

Inheriting would also let ResNet's methods run with ``self`` being the wrapper, where they
would read and write the wrapper's module tree instead of the student's. To avoid that, every
name the student's class defines beyond ``nn.Module`` is *forwarded*: reading it returns the
student's attribute (a bound method of the student, the student's property value), writing
it writes the student's. Where the student's class overrides an ``nn.Module`` method
(``train``, ``state_dict``...), the wrapper keeps ``nn.Module``'s own, which reaches the
student's override through the module tree. Instance attributes (``model.fc``,
``model.layer4``) are forwarded by ``DistillationModel.__getattr__``. The one thing the
wrapper cannot be is the student: ``type(wrapper) is not type(student)``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

__all__ = ["wrapper_class"]

# names a class body defines that describe the class itself, not its instances' behaviour
_CLASS_ONLY = frozenset(
    {
        "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
        "__init__", "__new__", "__init_subclass__", "__class_getitem__", "__slots__",
        "__getattr__", "__getattribute__", "__setattr__", "__delattr__", "__static_attributes__",
        "__firstlineno__", "__orig_bases__", "__parameters__", "__abstractmethods__",
        "_abc_impl", "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__",
    }
)  # fmt: skip


class _Forwarded:
    """A data descriptor: ``wrapper.NAME`` reads and writes ``wrapper.student.NAME``."""

    def __init__(self, name: str, owner: type) -> None:
        self.name, self.owner = name, owner

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:  # on the class: the student class's own attribute
            return inspect.getattr_static(self.owner, self.name)
        return getattr(obj.student, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.student, self.name, value)

    def __delete__(self, obj: Any) -> None:
        delattr(obj.student, self.name)


def _forward_dunder(name: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.student, name)(*args, **kwargs)

    method.__name__ = name
    return method


#: what every module instance holds (``training``, ``_modules``...): the wrapper's own
_MODULE_STATE = frozenset(vars(nn.Module()))


def _defined(cls: type) -> set[str]:
    """Every name ``cls`` and its bases below ``nn.Module`` define."""
    base = set(nn.Module.__mro__)
    return {n for k in cls.__mro__ if k not in base for n in vars(k)}


@functools.cache
def wrapper_class(wrapper: type, student_cls: type) -> type:
    """``wrapper`` (a DistillationModel class) made a subclass of ``student_cls`` too; one
    class per pair, so two conversions of the same student class share it. Falls back to
    ``wrapper`` itself when ``student_cls`` cannot be a base (a TorchScript module, a class
    with its own ``__new__`` or ``__slots__`` layout, a class that redefines module state)."""
    if student_cls is nn.Module or not issubclass(student_cls, nn.Module):
        return wrapper
    if issubclass(student_cls, wrapper) or student_cls.__new__ is not object.__new__:
        return wrapper
    if _defined(student_cls) & _MODULE_STATE:  # e.g. torch.compile's wrapper: a property
        return wrapper  # ``training`` that reads another module; it cannot be a base
    own = {n for k in wrapper.__mro__ if k not in nn.Module.__mro__ for n in vars(k)}
    own |= set(getattr(wrapper, "_OWN", ()))  # its instance attributes
    namespace: dict[str, Any] = {"__module__": wrapper.__module__}
    for name in _defined(student_cls) - _CLASS_ONLY - own:
        if hasattr(nn.Module, name):  # an override of nn.Module's: keep nn.Module's own
            namespace[name] = inspect.getattr_static(nn.Module, name)
        elif name.startswith("__") and name.endswith("__"):  # len(), iter(), [i] ...
            if callable(inspect.getattr_static(student_cls, name)):
                namespace[name] = _forward_dunder(name)
        else:
            namespace[name] = _Forwarded(name, student_cls)
    try:
        return type(
            f"{wrapper.__name__}[{student_cls.__name__}]", (wrapper, student_cls), namespace
        )
    except Exception:  # incompatible layouts or metaclasses, a refusing __init_subclass__
        return wrapper
