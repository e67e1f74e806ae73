"""How the harness hangs together: the commands (``python -m harness.X``: the modules at the top of harness/
that run as a program) apart from the library (every other module, the subpackages included). The library
never imports a command, no command imports another, and no two modules import each other around a circle
(counting the imports inside functions, which only hide an import until the function runs)."""

from __future__ import annotations

import ast

from conftest import REPO_ROOT

HARNESS = REPO_ROOT / "harness"


def module_name(path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, name: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the module ``name`` (parsed as ``tree``) imports anywhere in its text."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                package = name.rsplit(".", node.level)[0]
                base = f"{package}.{base}" if base else package
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found & modules - {name}


def harness_modules() -> dict[str, ast.AST]:
    return {module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in HARNESS.rglob("*.py")}


def harness_imports() -> dict[str, set[str]]:
    """Each module of harness/ -> the modules of harness/ it imports anywhere in its text."""
    trees = harness_modules()
    return {name: imported(tree, name, set(trees)) for name, tree in trees.items()}


def runs_as_a_program(tree: ast.AST) -> bool:
    """Whether the module has an ``if __name__ == "__main__":`` block."""
    return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
               and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
               for node in tree.body)


def commands() -> set[str]:
    """The commands: every module of harness/ that runs as a program (``python -m harness.X``)."""
    return {name for name, tree in harness_modules().items() if runs_as_a_program(tree)}


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


def crossings(graph: dict[str, set[str]], command_names: set[str]) -> list[str]:
    """Each import of a command by another module (a library module or another command), as 'A imports B'."""
    return [f"{module} imports {target}" for module in sorted(graph) for target in sorted(graph[module])
            if target in command_names and target != module]


def test_the_circle_finder_finds_a_planted_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c"]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_crossing_finder_finds_a_library_and_a_command_importing_a_command():
    graph = {"lib": {"cmd"}, "cmd": {"lib"}, "other": {"cmd", "lib"}, "lib2": {"lib"}}
    assert crossings(graph, {"cmd", "other"}) == ["lib imports cmd", "other imports cmd"]


def test_the_graph_sees_imports_inside_functions_and_from_subpackages():
    tree = ast.parse("def f():\n    from harness.a import x\n    from harness import b\n    import harness.c.d\n"
                     "from .e import y\n")
    modules = {"harness.a", "harness.b", "harness.c.d", "harness.c.e", "harness.z"}
    assert imported(tree, "harness.c.here", modules) == {"harness.a", "harness.b", "harness.c.d", "harness.c.e"}


def test_the_commands_are_the_modules_that_readme_runs():
    names = commands()
    assert {"harness.__main__", "harness.check", "harness.train", "harness.profile", "harness.report",
            "harness.scaling", "harness.figures", "harness.gpu_benchmark"} <= names
    assert all(name.count(".") == 1 for name in names), "a command lives at the top of harness/, not in a subpackage"


def test_no_module_of_the_harness_imports_itself_around_a_circle():
    graph = harness_imports()
    assert circles(graph) == []


def test_the_library_s_parts_import_each_other_in_one_direction():
    """measure/, training/, suite/ and reporting/: no two import each other around a circle (the API at the top
    is below them all, but for results.py reading a profile through measure/peak.py's one peak per device)."""
    graph, names = harness_imports(), commands()

    def part(module: str) -> str:
        return module.split(".")[1] if module.count(".") >= 2 else "top"

    parts: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module not in names and part(module) != "top":
            parts.setdefault(part(module), set()).update(part(target) for target in targets if part(target) != "top")
    assert circles({name: targets - {name} for name, targets in parts.items()}) == []


def test_no_command_is_imported_by_the_library_or_by_another_command():
    assert crossings(harness_imports(), commands()) == []


def test_the_map_names_every_module_in_its_part_and_no_module_that_is_gone():
    """docs/architecture.md stays true: each module of harness/ is in its part's row (a subpackage's modules in
    the row of that package), and every ``name.py`` the map names exists."""
    import re

    text = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    missing = []
    for path in HARNESS.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        part = path.parent.relative_to(HARNESS).as_posix()
        where = rows.get(f"{part}/", "") if part != "." else text.split("## Around harness/")[0]
        if f"`{path.name}`" not in where and f"{path.name}`" not in where:
            missing.append(path.relative_to(REPO_ROOT).as_posix())
    assert missing == []
    named = set(re.findall(r"`(\w+\.py)`", text.split("## Around harness/")[0]))
    assert {name for name in named if not list(HARNESS.rglob(name))} == set()
