"""cab's import graph has no cycle, counting the imports inside functions: data flows one way (config ->
cells -> executor -> runner -> check | bench | training -> store -> report), and the low-level modules
(cells, status, failures, registries) import nothing above them."""

import ast
import subprocess
import sys

from tests.paths import ROOT

PACKAGE = ROOT / "cab"


def _modules() -> "dict[str, object]":
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(name: str, modules: dict) -> "str | None":
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> "dict[str, set[str]]":
    """module -> the cab modules it imports anywhere in its body (`from cab.x import y` names cab.x.y when
    y is a module, else cab.x)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {r for t in targets if t.startswith("cab") and (r := _resolve(t, modules)) and r != name}
    return graph


def cycles(graph: "dict[str, set[str]]") -> "list[list[str]]":
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_finder_sees_a_cycle_through_a_function_local_import():
    graph = {"cab.a": {"cab.b"}, "cab.b": {"cab.c"}, "cab.c": {"cab.a"}, "cab.d": {"cab.a"}}
    assert cycles(graph) == [["cab.a", "cab.b", "cab.c"]]
    assert cycles({"cab.a": {"cab.b"}, "cab.b": set()}) == []


def test_cab_has_no_import_cycle():
    graph = import_graph()
    assert graph["cab.runner"] >= {"cab.kinds", "cab.failures"}  # the parser reads the real edges
    assert cycles(graph) == []


def test_low_level_modules_import_nothing_above_them():
    graph = import_graph()
    allowed = {"cab.cells": {"cab.status"}, "cab.status": set(), "cab.registries": set(),
               "cab.failures": {"cab.cells", "cab.status"}, "cab.kinds": {"cab.cells", "cab.registries"}}
    for module, imports in allowed.items():
        assert graph[module] <= imports, (module, graph[module] - imports)


def test_loading_a_config_or_listing_loads_no_check_executor_or_training():
    code = ("import sys\nfrom cab.config import loads_config\nfrom cab.grid import expand\n"
            "cells = expand(loads_config('name: t\\nattentions: [vanilla]\\ncheck: {}\\n'))\n"
            "assert cells and cells[0].versions == {'attention': 1}\n"
            "heavy = [m for m in sys.modules if m.startswith(('cab.check', 'cab.bench', 'cab.training.loop',\n"
            "         'cab.executors.', 'cab.report')) and m != 'cab.executors.base']\nassert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
