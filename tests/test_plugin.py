"""An implementation installed as a separate package is found through the entry point group."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, run_module

EXAMPLE = REPO_ROOT / "examples" / "capsbench-plugin-example"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """The example plugin, pip-installed into its own folder (the test environment is left untouched)."""
    target = tmp_path_factory.mktemp("site")
    source = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("source") / EXAMPLE.name)  # builds leave files behind
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    assert list(target.glob("capsbench_plugin_example-*.dist-info/entry_points.txt"))
    return target


def with_plugin(plugin_path):
    return {"PYTHONPATH": os.pathsep.join([str(plugin_path), str(REPO_ROOT)])}


def test_installed_plugin_is_listed(plugin_path):
    result = run_module("harness", "list", env=with_plugin(plugin_path))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("example-torch-einsum"))
    assert "torch" in line and "available" in line
    assert "entry point capsbench_plugin_example" in line


def test_installed_plugin_passes_the_parity_check(plugin_path):
    result = run_module("harness.check", "--impl", "example-torch-einsum", env=with_plugin(plugin_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "example-torch-einsum" in result.stdout
    from harness.check import TOLERANCES, quantities
    from harness.spec import SMALL

    assert f"all {len(quantities(SMALL)) * len(TOLERANCES)} quantities within tolerance" in result.stdout


def test_plugin_is_absent_without_the_package():
    result = run_module("harness", "list")
    assert result.returncode == 0
    assert "example-torch-einsum" not in result.stdout


def test_a_broken_plugin_is_reported_and_the_rest_still_works(tmp_path):
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[capsbench.implementations]\nbroken = no_such_module_anywhere\n")
    result = run_module("harness", "list", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"})
    assert result.returncode == 0, result.stderr
    failure = "entry point 'broken' of group 'capsbench.implementations' failed to load: ModuleNotFoundError"
    assert failure in result.stdout
    assert "torch-vectorised" in result.stdout


def test_readme_shows_the_tested_example_verbatim():
    readme = (REPO_ROOT / "README.md").read_text()
    source = (EXAMPLE / "capsbench_plugin_example.py").read_text()
    assert source.strip() in readme
    entry_point = ('[project.entry-points."capsbench.implementations"]\n'
                   'example-torch-einsum = "capsbench_plugin_example"')
    assert entry_point in (EXAMPLE / "pyproject.toml").read_text() and entry_point in readme
