"""An implementation installed as a separate package is found through the entry point group; so is a routing
algorithm that a package brings with its reference, and its implementation is checked against that reference."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from asv_helpers import asv_environment, figures, implementations_with_figures, run_asv, run_saved, saved_results

from conftest import REPO_ROOT, run_module

EXAMPLE = REPO_ROOT / "examples" / "capsbench-plugin-example"
ALGORITHM_EXAMPLE = REPO_ROOT / "examples" / "capsbench-inverted-attention"
ALGORITHM, ALGORITHM_IMPL = "inverted-attention", "example-inverted-attention"


def install(example, tmp_path_factory):
    """``example`` pip-installed into a folder of its own (the test environment is left untouched)."""
    target = tmp_path_factory.mktemp("site")
    source = shutil.copytree(example, tmp_path_factory.mktemp("source") / example.name)  # builds leave files behind
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    assert list(target.glob(f"{example.name.replace('-', '_')}-*.dist-info/entry_points.txt"))
    return target


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """The example plugin, installed into its own folder."""
    return install(EXAMPLE, tmp_path_factory)


@pytest.fixture(scope="module")
def algorithm_plugin_path(tmp_path_factory):
    """The routing-algorithm example (inverted dot-product attention routing and its implementation), installed
    into its own folder."""
    return install(ALGORITHM_EXAMPLE, tmp_path_factory)


def with_plugin(plugin_path):
    return {"PYTHONPATH": os.pathsep.join([str(plugin_path), str(REPO_ROOT)])}


def run_python(code: str, plugin_path) -> dict:
    """``code`` run by a Python of its own with the plugin installed (importing a plugin in the test process
    would register it for every test after this one); what it prints last, read as JSON."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, **with_plugin(plugin_path)}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


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
    assert ALGORITHM_IMPL not in result.stdout and ALGORITHM not in result.stdout


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


# A routing algorithm brought by a plugin (examples/capsbench-inverted-attention) --------------------------------


def test_an_installed_routing_algorithm_plugin_is_listed_with_its_algorithm(algorithm_plugin_path):
    """Its implementation computes its algorithm alone; torch-vectorised computes it too, by its reference."""
    result = run_module("harness", "list", env=with_plugin(algorithm_plugin_path))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    own = rows[ALGORITHM_IMPL]
    assert own.split()[1:5] == ["torch", "cpu", "vectorised", ALGORITHM], own
    assert "entry point capsbench_inverted_attention" in own and own.endswith("available")
    assert f"dynamic, self-attention, {ALGORITHM}" in rows["torch-vectorised"]
    assert ALGORITHM not in rows["torch-looped"]  # it runs a plugin's reference in the vectorised variant only
    assert "failed to load" not in result.stdout


def check_command(dtype: str) -> list[str]:
    return ["harness.check", "--impl", ALGORITHM_IMPL, "--routing-algorithm", ALGORITHM, "--config", "small",
            "--dtype", dtype]


def test_the_check_passes_the_algorithm_plugin_against_the_reference_in_float64(algorithm_plugin_path):
    """`capsbench check --routing-algorithm` (issue 44): every quantity, the algorithm's own parameters' gradients
    and values after Adam included, against torch-vectorised float64 computing the plugin's reference."""
    result = run_module(*check_command("float64"), env=with_plugin(algorithm_plugin_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "grad digit.norm.weight" in result.stdout and "param digit.norm.bias" in result.stdout
    assert "all " in result.stdout and " quantities within tolerance" in result.stdout


def test_the_check_passes_the_algorithm_plugin_against_the_reference_in_float32(algorithm_plugin_path):
    result = run_module(*check_command("float32"), env=with_plugin(algorithm_plugin_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all " in result.stdout and " quantities within tolerance" in result.stdout


def test_the_algorithm_plugin_matches_its_reference_under_both_routing_gradients(algorithm_plugin_path):
    """The check's own comparison, by its Python API (what the command runs), in float64 where the two routing
    gradients are told apart; and an implementation that let the gradient through the early iterations under
    ``final`` (here: the same implementation computing ``full``) fails it."""
    errors = run_python(f"""
import json
from harness.check import compare, observe, quantities, reference_observation
from harness.spec import SMALL
full = SMALL.replace(routing_algorithm={ALGORITHM!r})
out = {{}}
for gradient in ("full", "final"):
    config = full.replace(routing_gradient=gradient)
    rows = compare("x", "float64", observe({ALGORITHM_IMPL!r}, config, "float64"), reference_observation(config))
    failed = [row.quantity for row in rows if not row.passed]
    out[gradient] = [[row.quantity for row in rows], quantities(config), failed]
wrong = compare("x", "float64", observe({ALGORITHM_IMPL!r}, full, "float64"),
                reference_observation(full.replace(routing_gradient="final")))
out["full against final"] = [row.quantity for row in wrong if not row.passed]
print(json.dumps(out))
""", algorithm_plugin_path)
    for gradient in ("full", "final"):
        compared, expected, failed = errors[gradient]
        assert compared == expected and "grad digit.norm.weight" in compared and "param digit.norm.bias" in compared
        assert failed == [], gradient
    assert "grad digit.weight" in errors["full against final"]


def test_the_algorithm_on_a_hand_worked_case(algorithm_plugin_path):
    """Two children and two parents of dimension 2 (the other children's votes zero), R = 1 and 2, the answer
    worked out by hand, for the reference and for the implementation.

    Votes for parent 1: v_11 = (m, 0), v_21 = (0, m); for parent 2: zero.  Iteration 1: r = 1/2, the sum for
    parent 1 is (m/2, m/2), whose LayerNorm is beta (nothing left after the mean), and parent 2's is beta too.
    Agreements: a_11 = beta . v_11 / sqrt(2) = m b_1 / sqrt(2), a_21 = m b_2 / sqrt(2), a_i2 = 0, so
    r_11 = sigmoid(a_11) and r_21 = sigmoid(a_21).  Iteration 2: parent 1's sum is (m r_11, m r_21), centred
    (d, -d) with d = m (r_11 - r_21) / 2 and variance d^2, so p_1 = gamma * (k, -k) + beta with
    k = d / sqrt(d^2 + 1e-5); parent 2 stays beta.  With m = 0.1, d^2 is 8e-7, below LayerNorm's eps, so p_1
    depends on the scale 1 / sqrt(D), the softmax's axis and the eps."""
    m, gamma, beta = 0.1, (2.0, 3.0), (0.5, -0.5)
    got = run_python(f"""
import json
import numpy as np
import torch
import capsbench_inverted_attention as plugin
from harness import registry
from harness.params import init_parameters
from harness.spec import SMALL
out = {{}}
for iterations in (1, 2):
    config = SMALL.replace(routing_algorithm=plugin.NAME, num_classes=2, digit_caps_dim=2,
                           routing_iterations=iterations)
    u_hat = np.zeros((1, config.num_primary_caps, 2, 2))
    u_hat[0, 0, 0, 0] = u_hat[0, 1, 0, 1] = {m}
    params = init_parameters(config, dtype=np.float64)
    params[plugin.NORM_WEIGHT][:], params[plugin.NORM_BIAS][:] = {gamma}, {beta}
    tensors = {{name: torch.tensor(value) for name, value in params.items()}}
    reference = plugin.reference(torch.tensor(u_hat), tensors, config)
    impl = registry.create({ALGORITHM_IMPL!r}, config, params, "float64")
    own = impl.to_numpy(impl.routing_forward(impl.from_numpy(u_hat)))
    out[iterations] = [reference.tolist(), own.tolist()]
print(json.dumps(out))
""", algorithm_plugin_path)
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    d = m * (sigmoid(m * beta[0] / math.sqrt(2)) - sigmoid(m * beta[1] / math.sqrt(2))) / 2
    k = d / math.sqrt(d * d + 1e-5)
    expected = {"1": [[beta, beta]], "2": [[(gamma[0] * k + beta[0], -gamma[1] * k + beta[1]), beta]]}
    for iterations, (reference, own) in got.items():
        np.testing.assert_allclose(reference, expected[iterations], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(own, expected[iterations], rtol=1e-12, atol=1e-15)
    assert abs(k - 0.2692) < 1e-4  # far from the k = 1 that a LayerNorm without eps would give


def test_the_hand_written_backward_against_finite_differences(algorithm_plugin_path):
    """The implementation's backward (votes, gamma and beta), by torch.autograd.gradcheck: central differences
    of its own forward in float64, independent of the reference."""
    passed = run_python("""
import json
import torch
from capsbench_inverted_attention import InvertedAttentionRouting
generator = torch.Generator().manual_seed(0)
votes = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
gamma = (1.0 + 0.3 * torch.randn(4, dtype=torch.float64, generator=generator)).requires_grad_(True)
beta = (0.3 * torch.randn(4, dtype=torch.float64, generator=generator)).requires_grad_(True)
print(json.dumps([torch.autograd.gradcheck(lambda *args: InvertedAttentionRouting.apply(*args, iterations, False),
                                           (votes, gamma, beta)) for iterations in (1, 2, 3)]))
""", algorithm_plugin_path)
    assert passed == [True, True, True]


def test_the_algorithm_adds_its_parameters_to_the_canonical_set(algorithm_plugin_path):
    """LayerNorm's gamma and beta come last, start at 1 and 0, and leave every other parameter the number it is
    under dynamic routing; the plugin's implementation refuses dynamic routing rather than computing its own."""
    got = run_python(f"""
import json
import numpy as np
from harness import registry
from harness.params import init_parameters, parameter_shapes
from harness.spec import SMALL
config = SMALL.replace(routing_algorithm={ALGORITHM!r})
params, dynamic = init_parameters(config), init_parameters(SMALL)
try:
    registry.create({ALGORITHM_IMPL!r}, SMALL, dynamic)
    refused = None
except registry.UnsupportedRoutingAlgorithmError as error:
    refused = str(error)
print(json.dumps({{"names": list(parameter_shapes(config)), "dynamic": list(dynamic),
                  "shapes": [list(params[name].shape) for name in ("digit.norm.weight", "digit.norm.bias")],
                  "values": [params["digit.norm.weight"].tolist(), params["digit.norm.bias"].tolist()],
                  "same": all(np.array_equal(params[name], dynamic[name]) for name in dynamic),
                  "refused": refused}}))
""", algorithm_plugin_path)
    assert got["names"] == [*got["dynamic"], "digit.norm.weight", "digit.norm.bias"]
    dim = 8  # SMALL.digit_caps_dim
    assert got["shapes"] == [[dim], [dim]] and got["values"] == [[1.0] * dim, [0.0] * dim]
    assert got["same"]
    assert "computes the routing algorithm inverted-attention only, not 'dynamic'" in got["refused"]


def registration_block() -> str:
    """The part of the example that registers the algorithm: from its name to the registration."""
    source = (ALGORITHM_EXAMPLE / "capsbench_inverted_attention.py").read_text()
    start = source.index('NAME = "inverted-attention"')
    return source[start : source.index("reference=reference))", start) + len("reference=reference))")]


def test_the_manual_shows_the_algorithm_example_verbatim():
    manual = (REPO_ROOT / "docs" / "plugins.md").read_text()
    assert registration_block() in manual
    entry_point = ('[project.entry-points."capsbench.implementations"]\n'
                   f'{ALGORITHM_IMPL} = "capsbench_inverted_attention"')
    assert entry_point in (ALGORITHM_EXAMPLE / "pyproject.toml").read_text() and entry_point in manual


def test_the_asv_suite_measures_a_plugins_routing_algorithm_where_it_is_installed(algorithm_plugin_path, tmp_path):
    """docs/plugins.md's command: the plugin's implementation measured under its algorithm, torch-vectorised
    under it too (by the reference), the plugin's implementation skipped under the algorithms it lacks."""
    manual = (REPO_ROOT / "docs" / "plugins.md").read_text()
    assert f"CAPSBENCH_IMPLEMENTATIONS={ALGORITHM_IMPL},torch-vectorised" in manual
    env = {**asv_environment(tmp_path), **with_plugin(algorithm_plugin_path)}
    benchmark = "bench_phases.TrainStep.time_train_step"
    result = run_saved(env, f"{ALGORITHM_IMPL},torch-vectorised", "TrainStep")
    assert result.returncode == 0, result.stdout + result.stderr
    names = json.loads((tmp_path / "results" / "benchmarks.json").read_text())[benchmark]["param_names"]
    [path] = saved_results(tmp_path / "results")
    measured = {(json.loads(cell[0].replace("'", '"')), json.loads(cell[names.index("routing_algorithm")]
                                                                   .replace("'", '"')))
                for cell in figures(path, benchmark)}
    assert {(ALGORITHM_IMPL, ALGORITHM), ("torch-vectorised", ALGORITHM), ("torch-vectorised", "dynamic")} <= measured
    assert not {(ALGORITHM_IMPL, "dynamic"), (ALGORITHM_IMPL, "self-attention")} & measured
