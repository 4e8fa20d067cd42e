"""The floors of docs/architecture.md, held against the code by reading every import statement.

Counted as ``python3 ../shared/tools/import_circles.py`` counts: an import written inside a
function still runs and still ties two rooms together, so it counts like one at the top of a
module (imports under ``if TYPE_CHECKING:`` never run and are skipped). Pure AST reads: no
kdkit module is imported here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: docs/architecture.md's floors, lowest first; a module is on the floor of its longest prefix
FLOORS = (
    "kdkit kdkit.errors kdkit._io kdkit._fingerprint kdkit._ort kdkit.models kdkit.registry "
    "kdkit.load kdkit.capture kdkit.task kdkit.outputs kdkit.metrics kdkit.export kdkit._args "
    "kdkit._cache_meta kdkit._compile kdkit._precision kdkit._device kdkit._optim "
    "kdkit._sharding kdkit._lazy",
    "kdkit.data kdkit.losses kdkit.teachers kdkit.balance kdkit.pairs kdkit._embedding "
    "kdkit._distiller_checks",
    "kdkit.distiller kdkit.lm kdkit.cache kdkit.bench kdkit.report kdkit.config",
    "kdkit.train",
    "kdkit.run kdkit.demo",
    "kdkit.cli kdkit.compat kdkit.__main__",
)


def _floor(module: str) -> int:
    best = None
    for level, names in enumerate(FLOORS):
        for prefix in names.split():
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (level, len(prefix))
    assert best is not None, f"{module} is on no floor of docs/architecture.md"
    return best[0]


def _modules(package: str = "kdkit") -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):  # imports that never run
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
                node.body = []
        out[name] = (path, tree)
    return out


def _imports(name: str, path: Path, tree: ast.Module, known: set[str]):
    """``(line, target module)`` of every kdkit import in ``tree`` (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:  # from P import M: the module P.M when it is one
                full = f"{base}.{alias.name}"
                targets.append(full if full in known else base)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            if target.startswith("kdkit") and not name.startswith(target + "."):
                yield node.lineno, target


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    known = set(modules)
    edges = {
        name: list(_imports(name, path, tree, known)) for name, (path, tree) in modules.items()
    }
    return modules, edges


def test_no_import_runs_up_the_floors(graph):
    modules, edges = graph
    up = [
        f"{modules[name][0].relative_to(ROOT)}:{line} imports {target}"
        for name, found in edges.items()
        for line, target in found
        if _floor(target) > _floor(name)
    ]
    assert not up, "\n".join(up)


def test_no_import_circle(graph):
    _, edges = graph
    succ = {n: {t for _, t in found if t in edges and t != n} for n, found in edges.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan: each strongly connected component of > 1 is a circle
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_no_private_name_is_imported_across_modules():
    """A piece two modules share is public in its module (``_common.upcast``, not
    ``_common._upcast``); tests may reach into privates, kdkit and its benchmarks may not."""
    found = []
    for folder in ("kdkit", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdkit"):
                    found += [
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                        for a in node.names
                        if a.name.startswith("_")
                    ]
    assert not found, "\n".join(found)


def test_no_module_over_450_lines():
    long = [
        f"{path.relative_to(ROOT)} ({n} lines)"
        for folder in ("kdkit", "benchmarks", "tests")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 450
    ]
    assert not long, long


def test_only_the_task_tables_name_a_task():
    """The front doors dispatch through kdkit.config.SCHEMAS and kdkit.run.recipes.RECIPES:
    no other module compares a config's or checkpoint's task with a task's name."""
    hits = []
    for path in sorted((ROOT / "kdkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value in ("lm", "classify")
                for c in (node.left, *node.comparators)
            ):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not hits, hits
