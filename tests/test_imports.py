"""No import cycles inside ``starflow_trt``: the module graph is a DAG.

What counts as an import (the choice this test makes):

* every import statement that runs when the module is imported — at module level, inside
  ``if`` / ``try`` blocks and class bodies;
* imports under ``if TYPE_CHECKING:`` too: they never run, but a module that needs another's
  types while that one needs it back is the same design cycle, only hidden from the interpreter;
* **not** imports inside functions: a function-local import is the project's way to defer a
  heavy or optional dependency (onnx, diffusers) to call time, and it cannot take part in an
  import-time cycle. Under ``starflow_trt/serving`` they count too
  (:func:`test_no_cycles_through_function_local_imports_in_serving`): there a function-local import
  once tied ``app`` ↔ ``deployment`` ↔ ``ingress`` into a circle the interpreter never saw.

Edges go to the module named: ``from .a import b`` is an edge to ``pkg.a.b`` when that is a
module, else to ``pkg.a`` (a package's ``__init__``). The source is parsed, never imported.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path
from typing import Iterator, Optional

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


def _import_nodes(tree: ast.Module, inside_functions: bool = False) -> Iterator[ast.stmt]:
    """Import statements outside function bodies (module level, if / try / with blocks, class bodies);
    ``inside_functions``: those in function bodies too."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if not inside_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
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


def import_graph(function_local_under: Optional[str] = None) -> dict[str, set[str]]:
    """Module → the package modules it imports at import time (see the module docstring), and for the
    modules under the package ``function_local_under`` also those it imports inside functions."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        local = function_local_under is not None and (name + ".").startswith(function_local_under + ".")
        for node in _import_nodes(ast.parse(path.read_text(), str(path)), inside_functions=local):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = _resolve(name, is_pkg, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods and t.startswith(PACKAGE):   # ``import a.b.c`` of a name inside a module
                    t = t.rpartition(".")[0]
                if t in mods:
                    graph[name].add(t)
    return graph


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


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert cycles(graph) == [["a", "b", "c"], ["d"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in starflow_trt (module-level and TYPE_CHECKING imports):\n" + "\n".join(
        " <-> ".join(c) for c in found)


SERVING = f"{PACKAGE}.serving"


def test_the_walker_sees_function_local_imports_when_asked():
    assert f"{SERVING}.deployment" not in import_graph()[f"{SERVING}.app"]       # build_app imports it inside
    assert f"{SERVING}.deployment" in import_graph(SERVING)[f"{SERVING}.app"]


def test_no_cycles_through_function_local_imports_in_serving():
    found = [c for c in cycles(import_graph(SERVING)) if any(m.startswith(SERVING) for m in c)]
    assert not found, "import cycles through starflow_trt.serving, function-local imports included:\n" + "\n".join(
        " <-> ".join(c) for c in found)
