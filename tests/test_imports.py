"""No import cycles inside ``starflow_trt``: the module graph is a DAG.

What counts as an import (the choice this test makes):

* every import statement that runs when the module is imported — at module level, inside
  ``if`` / ``try`` blocks and class bodies;
* imports under ``if TYPE_CHECKING:`` too: they never run, but a module that needs another's
  types while that one needs it back is the same design cycle, only hidden from the interpreter;
* **not** imports inside functions: a function-local import is the project's way to defer a
  heavy or optional dependency (onnx, diffusers) to call time, and it cannot take part in an
  import-time cycle.

Two checks count function-local imports too, because deferring an import does not change which
layer depends on which: ``export/`` imports nothing of the layers built on it, and the modules
of ``calibration/`` and of ``serving/`` form no cycle.

Edges go to the module named: ``from .a import b`` is an edge to ``pkg.a.b`` when that is a
module, else to ``pkg.a`` (a package's ``__init__``). The source is parsed, never imported.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path
from typing import Iterator, Optional

import pytest

import starflow_trt

PACKAGE = "starflow_trt"
ROOT = Path(starflow_trt.__file__).resolve().parent


def modules() -> dict[str, Path]:
    """Every module of the package (name → source file), packages' ``__init__`` included."""
    found = {PACKAGE: ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix=f"{PACKAGE}."):
        base = ROOT.joinpath(*info.name.split(".")[1:])
        found[info.name] = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
    return found


def _all_import_nodes(tree: ast.Module) -> Iterator[ast.stmt]:
    """Every import statement, function-local ones included."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


def _import_time_nodes(tree: ast.Module) -> Iterator[ast.stmt]:
    """Import statements outside function bodies (module level, if / try / with blocks, class bodies)."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> Optional[str]:
    """The absolute module an ``ImportFrom`` names (relative levels resolved)."""
    if node.level == 0:
        return node.module
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, mods: dict[str, Path],
               function_local: bool = False) -> Iterator[tuple[int, str]]:
    """(line, package module) of every import of module ``name`` (see the module docstring)."""
    is_pkg = path.name == "__init__.py"
    walk = _all_import_nodes if function_local else _import_time_nodes
    for node in walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = _resolve(name, is_pkg, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for t in targets:
            while t and t not in mods and t.startswith(PACKAGE):   # ``import a.b.c`` of a name inside a module
                t = t.rpartition(".")[0]
            if t in mods:
                yield node.lineno, t


def import_graph(function_local: bool = False) -> dict[str, set[str]]:
    """Module → the package modules it imports (at import time, or anywhere with ``function_local``)."""
    mods = modules()
    return {name: {t for _, t in imports_of(name, path, mods, function_local)} for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:   # recursion depth is bounded by the package's module count
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_the_package():
    graph = import_graph()
    assert "starflow_trt.sampling.block" in graph and "starflow_trt.export.kinds" in graph
    assert "starflow_trt.sampling.kv" in graph["starflow_trt.sampling.block"]   # a relative import, resolved
    assert "starflow_trt.export.names" in graph["starflow_trt.export.kinds"]    # ``from . import names``
    deferred = import_graph(function_local=True)["starflow_trt.export.media_kinds"]
    assert "starflow_trt.media.graphs" in deferred - graph["starflow_trt.export.media_kinds"]   # inside a method


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert cycles(graph) == [["a", "b", "c"], ["d"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in starflow_trt (module-level and TYPE_CHECKING imports):\n" + "\n".join(
        " <-> ".join(c) for c in found)


#: the layers built on the export contract: export/ must not import them, not even inside a function
#: each layer and the layers built on it, which it must not import (function-local imports included)
ABOVE = {"export": ("calibration", "runtime", "bench", "serving", "commands"),
         "runtime": ("calibration", "bench", "serving", "commands")}


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_a_layer_imports_no_layer_above_it(layer):
    mods, above = modules(), [f"{PACKAGE}.{a}" for a in ABOVE[layer]]
    found = sorted({f"{name} line {line} imports {target}"
                    for name, path in mods.items() if _inside(name, f"{PACKAGE}.{layer}")
                    for line, target in imports_of(name, path, mods, function_local=True)
                    if any(_inside(target, a) for a in above)})
    assert not found, f"{layer}/ imports a layer above it (function-local imports included):\n" + "\n".join(found)


@pytest.mark.parametrize("layer", ["calibration", "serving"])
def test_no_import_cycles_inside_a_layer_function_local_included(layer):
    """calibration/: int8 <-> qdq once; serving/: app <-> deployment <-> ingress once, both tied by
    function-local imports the interpreter never saw."""
    package = f"{PACKAGE}.{layer}"
    graph = {m: {t for t in targets if _inside(t, package)}
             for m, targets in import_graph(function_local=True).items() if _inside(m, package)}
    found = cycles(graph)
    assert not found, f"import cycles in {layer}/ (function-local imports included):\n" + "\n".join(
        " <-> ".join(c) for c in found)
