"""harness.settings names every environment variable and every results folder once: no other module spells
a ``CAPSBENCH_*`` name or defines a results folder, every variable has its line in the table of
docs/development.md (generated from :data:`harness.settings.ENVIRONMENT`, checked by tests/test_readme.py),
and nothing is left out of it."""

from __future__ import annotations

import ast
import re

from harness import settings

from conftest import REPO_ROOT

SOURCES = [path for folder in ("harness", "benchmarks", "implementations")
           for path in (REPO_ROOT / folder).rglob("*.py")]


def string_constants(path):
    return [node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_only_settings_spells_an_environment_variable():
    spelled = {path.relative_to(REPO_ROOT).as_posix(): name for path in SOURCES if path.name != "settings.py"
               for text in string_constants(path) for name in re.findall(r"^CAPSBENCH_[A-Z_]+$", text)}
    assert spelled == {}


def test_every_environment_variable_is_described():
    names = {value for key, value in vars(settings).items() if key.endswith("_ENV")}
    assert names == set(settings.ENVIRONMENT) and all(name.startswith("CAPSBENCH_") for name in names)
    assert all(settings.ENVIRONMENT.values())


def test_every_results_folder_is_named_once():
    folders = {value for key, value in vars(settings).items() if key.endswith("_SUBDIR")}
    assert folders == set(settings.RESULTS_FOLDERS)
    elsewhere = [path.relative_to(REPO_ROOT).as_posix() for path in SOURCES if path.name != "settings.py"
                 and re.search(r"^\w+_SUBDIR\w* = ", path.read_text(encoding="utf-8"), re.M)]
    assert elsewhere == []


def test_the_manual_lists_every_environment_variable():
    page = (REPO_ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in page for name in settings.ENVIRONMENT)
