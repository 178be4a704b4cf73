"""The package's structure: no import cycle between modules, and no import of this package inside a
function (such imports hide cycles); optional heavy dependencies alone may be imported lazily."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import robustunlearn

SOURCE = Path(robustunlearn.__file__).parent
# Imported on use because most runs never need them and they are large or optional extras.
OPTIONAL_DEPENDENCIES = {"peft", "lm_eval", "optimum", "hqq", "bitsandbytes", "torchao", "datasets"}


def strongly_connected_components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively: the groups of modules that import each other in a loop."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = lowlink[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    lowlink[node] = min(lowlink[node], index[child])
                continue
            work.pop()
            if work:
                lowlink[work[-1][0]] = min(lowlink[work[-1][0]], lowlink[node])
            if lowlink[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [c for c in strongly_connected_components(graph) if len(c) > 1] == [{"a", "b", "c"}]


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("robustunlearn")
    imports = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    # A package's __init__ importing its own modules is no cycle unless a module imports the package back.
    cycles = [sorted(c) for c in strongly_connected_components(imports) if len(c) > 1]
    assert cycles == []


def _lazy_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            found += [(node.lineno, name) for name in names if name.split(".")[0] not in OPTIONAL_DEPENDENCIES]
    return found


def test_imports_inside_functions_are_only_optional_dependencies():
    lazy = {str(p.relative_to(SOURCE)): _lazy_imports(p) for p in sorted(SOURCE.rglob("*.py"))}
    assert {path: found for path, found in lazy.items() if found} == {}
