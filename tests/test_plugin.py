"""An implementation installed as a separate package is found through the entry point group."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from asv_helpers import asv_environment, implementations_with_figures, run_asv, run_saved, saved_results

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
    from harness.check import quantities
    from harness.spec import SMALL
    from harness.tolerances import TOLERANCES

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


def test_the_manual_shows_the_tested_example_verbatim():
    readme = (REPO_ROOT / "docs" / "plugins.md").read_text()
    source = (EXAMPLE / "capsbench_plugin_example.py").read_text()
    assert source.strip() in readme
    entry_point = ('[project.entry-points."capsbench.implementations"]\n'
                   'example-torch-einsum = "capsbench_plugin_example"')
    assert entry_point in (EXAMPLE / "pyproject.toml").read_text() and entry_point in readme


def test_the_example_plugin_gets_its_routing_rows_in_a_profile_for_free(plugin_path, tmp_path):
    """The example overrides `route` and opens no range: the base class's range around the hook times its
    routing, forward and (through autograd) backward, with the FLOPs of all iterations."""
    import pandas as pd

    from harness.measure import flops
    from harness.spec import SMALL

    out = tmp_path / "profile"
    result = run_module("harness.profile", "--impl", "example-torch-einsum", "--config", "small", "--batch-size", "2",
                        "--steps", "1", "--warmup", "0", "--gemm-size", "64", "--no-memory", "--out", str(out),
                        env=with_plugin(plugin_path))
    assert result.returncode == 0, result.stdout + result.stderr
    frame = pd.read_csv(out / "profile.csv").set_index(["phase", "layer"])
    table = flops.step_layer_flops(SMALL, 2)
    for phase in ("forward", "backward"):
        row = frame.loc[(phase, "routing")]
        assert row["time_s"] > 0, phase
        assert row["flops"] == sum(table[(phase, layer)] for layer in flops.routing_layers(SMALL))
        assert pd.isna(frame.loc[(phase, "routing_iteration_1"), "time_s"])  # the plugin opened no such range
    assert frame["share"].sum() <= 1.0 + 1e-9  # nothing counted twice


def test_a_numpy_plugins_routing_functions_run_inside_the_routing_range():
    """A NumpyCapsNet subclass with its own routing_functions: the base class opens the whole-routing range
    around their forward and backward; around the built-in routing it opens none (its iterations have theirs)."""
    import contextlib

    from harness import ranges, registry
    from harness.data import synthetic_batch
    from harness.params import init_parameters
    from harness.spec import SMALL
    from implementations.numpy.capsnet import NumpyCapsNet
    from implementations.numpy.routing import ROUTING, RoutingFunctions

    class Logger:
        def __init__(self):
            self.opened = []

        def range(self, layer, phase):
            self.opened.append((phase, layer))
            return contextlib.nullcontext()

    class OwnRouting(NumpyCapsNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built_in = ROUTING[("dynamic", "vectorised", "full")]
            self.routing_functions = RoutingFunctions(lambda *a, **k: built_in.forward(*a, **k),
                                                      lambda *a, **k: built_in.backward(*a, **k))

    opened = {}
    with registry.registered("numpy-own-routing", OwnRouting):
        for name in ("numpy-own-routing", "numpy-vectorised"):
            impl = registry.create(name, SMALL, init_parameters(SMALL), "float32")
            with ranges.recording(Logger()) as logger:
                impl.forward_loss(impl.to_device(*synthetic_batch(SMALL, 2)))
                impl.backward()
            opened[name] = logger.opened
    assert ("forward", "routing") in opened["numpy-own-routing"]
    assert ("backward", "routing") in opened["numpy-own-routing"]
    assert not {("forward", "routing"), ("backward", "routing")} & set(opened["numpy-vectorised"])


def test_the_asv_suite_benchmarks_an_installed_plugin_where_it_is_installed_and_names_it_missing_elsewhere(
        plugin_path, tmp_path):
    """Issue 42, point 6: docs/plugins.md's command (asv run --python=same, from the environment the plugin is
    installed in) measures the plugin, its facts say where it comes from; the same command where the plugin
    is not installed (as in the environment a plain asv run builds) ends before any benchmark, non-zero,
    naming the plugin, the known implementations and the command that reaches it, and writes nothing."""
    manual = (REPO_ROOT / "docs" / "plugins.md").read_text()
    assert "CAPSBENCH_IMPLEMENTATIONS=example-torch-einsum" in manual
    assert "asv run --python=same --set-commit-hash $(git rev-parse HEAD)" in manual
    env = {**asv_environment(tmp_path), **with_plugin(plugin_path)}
    bench, benchmark = "TrainStep", "bench_phases.TrainStep.time_train_step"

    result = run_saved(env, "example-torch-einsum", bench)
    assert result.returncode == 0, result.stdout + result.stderr
    [path] = saved_results(tmp_path / "results")
    assert implementations_with_figures(path, benchmark) == {"example-torch-einsum"}
    [facts] = (tmp_path / "asv-facts").glob("*/*.json")
    assert json.loads(facts.read_text())["implementations"]["example-torch-einsum"]["source"] == \
        "entry point capsbench_plugin_example"

    saved = {file: file.read_bytes() for file in (tmp_path / "results").rglob("*.json")}
    missing = run_saved({**env, "PYTHONPATH": str(REPO_ROOT)}, "example-torch-einsum", bench)
    output = missing.stdout + missing.stderr
    assert missing.returncode != 0, output
    line = next(line for line in output.splitlines() if "'example-torch-einsum', which no implementation" in line)
    known = line.split("known implementations: ")[1].split(". ")[0].split(", ")
    assert "torch-vectorised" in known and "example-torch-einsum" not in known
    assert "asv run --python=same" in line and "docs/plugins.md" in line
    assert "Running " not in output  # before any benchmark
    assert {file: file.read_bytes() for file in (tmp_path / "results").rglob("*.json")} == saved


def test_a_run_in_an_environment_asv_builds_names_the_plugins_it_cannot_measure(plugin_path, tmp_path):
    """Plain asv run builds its own environment, without the plugins installed where asv runs: before such a run
    harness/suite/asv_plugin_reach.py names them with the command that measures them; --python=same, which measures
    them, says nothing.  (`asv run EXISTING` with no results yet ends before building anything.)"""
    env = {**asv_environment(tmp_path), **with_plugin(plugin_path)}
    built = run_asv(env, "run", "EXISTING")
    assert "No commit hashes selected" in built.stdout + built.stderr  # it went no further
    [warning] = [line for line in (built.stdout + built.stderr).splitlines() if "capsbench: the implementation" in line]
    assert "(example-torch-einsum)" in warning and "asv run --python=same --set-commit-hash" in warning
    same = run_asv(env, "run", "EXISTING", "--python=same")
    assert "capsbench: the implementation" not in same.stdout + same.stderr
    without = run_asv({**env, "PYTHONPATH": str(REPO_ROOT)}, "run", "EXISTING")
    assert "capsbench: the implementation" not in without.stdout + without.stderr  # no plugin installed
