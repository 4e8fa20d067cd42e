"""Import a script of ``benchmarks/`` as a module for a test (the scripts are not a package).

The folder goes on ``sys.path`` as ``python benchmarks/X.py`` has it (scripts import their
siblings: ``_harness``, ``_gpu_kd_steps``), the module is registered in ``sys.modules`` (its
dataclasses look their module up there), and both are undone afterwards.
"""

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str, siblings: tuple[str, ...] = ()) -> Iterator[ModuleType]:
    """Yield ``benchmarks/<name>.py`` imported; a fixture's body (``yield from``)."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for mod in (name, *siblings):
            sys.modules.pop(mod, None)
        sys.path.remove(str(BENCHMARKS))
