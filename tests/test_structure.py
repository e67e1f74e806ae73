"""How the harness hangs together: no two of its modules import each other, directly or around a circle
(counting the imports inside functions, which only hide a circle until the function runs)."""

from __future__ import annotations

import ast

from conftest import REPO_ROOT

HARNESS = REPO_ROOT / "harness"


def harness_imports() -> dict[str, set[str]]:
    """Each module of harness/ -> the modules of harness/ it imports anywhere in its text."""
    modules = {f"harness.{path.stem}" for path in HARNESS.glob("*.py")}
    graph = {}
    for path in HARNESS.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "harness":
                found |= {f"harness.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[f"harness.{path.stem}"] = found & modules
    return graph


def circles(graph: dict[str, set[str]]) -> list[str]:
    """The modules from which their own imports lead back to themselves."""
    found = []
    for start in sorted(graph):
        seen, stack = set(), list(graph[start])
        while stack:
            module = stack.pop()
            if module not in seen:
                seen.add(module)
                stack.extend(graph.get(module, ()))
        if start in seen:
            found.append(start)
    return found


def test_the_circle_finder_finds_a_planted_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c"]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_harness_imports_itself_around_a_circle():
    graph = harness_imports()
    assert graph["harness.scaling"] >= {"harness.distributed"}  # the graph sees imports inside functions
    assert circles(graph) == []
