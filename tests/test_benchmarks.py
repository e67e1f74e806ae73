"""The asv suite: every benchmark runs once in its quickest form (so a broken benchmark fails CI), and the
suite's own helpers skip what cannot run instead of crashing."""

import itertools
import json
import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
from asv_helpers import (
    asv_environment,
    figures,
    implementations_with_figures,
    measured_commit,
    run_asv,
    run_saved,
    saved_results,
    write_asv_config,
)

from harness import registry, report, settings
from implementations.torch.autograd import TorchCapsNet

from conftest import REPO_ROOT

BENCHMARK_NAMES = [
    "time_forward", "time_inference", "time_train_step", "time_backward", "time_routing", "time_routing_backward",
    "peakmem_train_step", "track_host_memory_train_step", "track_host_memory_before_model", "track_max_rel_error",
    "track_threads", "track_gemm_peak_gflops", "track_compile_seconds", "track_plan_seconds",
    "track_hardware_peak_gflops",
]


@pytest.fixture(scope="module")
def asv_env(tmp_path_factory):
    """asv's environment with a HOME of its own and a configuration writing into it
    (:func:`asv_helpers.asv_environment`)."""
    return asv_environment(tmp_path_factory.mktemp("home"))


def test_asv_check_accepts_the_suite(asv_env):
    result = run_asv(asv_env, "check", "--python=same")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_benchmark_runs_once_on_the_small_configuration(asv_env):
    """The smoke profile leaves the compiling implementations out (they would compile again in every
    benchmark's process): the contract tests hold them, test_torch_compiled.py runs the compile benchmark."""
    result = run_asv(asv_env, "run", "--quick", "--dry-run", "--python=same", "--launch-method", "forkserver",
                     "--show-stderr")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert " failed" not in output, output
    for name in BENCHMARK_NAMES:
        assert name in output
    assert "skipped: NotImplementedError('torch-vectorised-cuda is unavailable here" in output or \
        registry.get("torch-vectorised-cuda").availability()
    assert "torch-vectorised-compiled compiles again in every benchmark process: the smoke profile leaves it out" \
        in output
    # the smoke profile measures both routing algorithms: torch-vectorised's train step under self-attention ran
    assert re.search(r"\btorch-vectorised\s+4\s+3\s+full\s+self-attention\s+[\d.]+(±[\d.]+)?[μm]?s\b", output), output


def test_profiles_choose_the_grid(monkeypatch):
    from harness.suite.sizes import load_suite_profile

    monkeypatch.delenv("CAPSBENCH_PROFILE", raising=False)
    name, profile = load_suite_profile()
    assert name == "fast" and profile["config"] == "paper"
    assert 128 in profile["batch_sizes"] and 3 in profile["routing_iterations"]
    monkeypatch.setenv("CAPSBENCH_PROFILE", "smoke")
    assert load_suite_profile()[1]["config"] == "small"
    with pytest.raises(ValueError, match="unknown benchmark profile 'huge'.*smoke, fast, regular, large"):
        load_suite_profile("huge")


def test_implementations_can_be_narrowed_and_unknown_names_are_one_line(monkeypatch):
    from benchmarks import common

    monkeypatch.setenv(settings.IMPLEMENTATIONS_ENV, "numpy-vectorised, torch-looped")
    assert common.selected_implementations() == {"numpy-vectorised", "torch-looped"}
    monkeypatch.setenv(settings.IMPLEMENTATIONS_ENV, "numpy-vectorized,torch-looped")
    with pytest.raises(common.UnknownImplementationsError) as raised:
        common.selected_implementations()
    problem = str(raised.value)
    assert "\n" not in problem
    assert "'numpy-vectorized'" in problem and "known implementations: " + ", ".join(registry.names()) in problem
    assert "asv run --python=same" in problem  # where a plugin reaches the suite


def readme_main_job_options() -> list[str]:
    """The options of the `asv run` in README's first command: the main job's benchmarks and samples."""
    command = next(line for line in (REPO_ROOT / "README.md").read_text().splitlines() if "asv run" in line)
    words = shlex.split(command)
    start = next(index for index in range(len(words) - 1) if words[index:index + 2] == ["asv", "run"]) + 2
    return words[start:words.index("&&", start)]


def readme_main_job_option(name: str) -> str:
    """The value README's main job gives an option (``--bench``, or an attribute such as ``repeat``)."""
    options = readme_main_job_options()
    pairs = [(options[index], options[index + 1]) for index in range(len(options) - 1)]
    return next(value.split("=", 1)[1] if flag == "-a" else value for flag, value in pairs
                if flag == name or (flag == "-a" and value.startswith(f"{name}=")))


def test_the_main_job_times_the_train_step_at_full_and_dynamic_and_routing_under_both_algorithms():
    """asv matches --bench against each grid point, `name(parameters)`: on the fast profile's grid, README's
    pattern picks every implementation and batch of the train step and the host memory at the full gradient and
    dynamic routing (the headline's), no point at final or self-attention (which would double the main job),
    routing forward + backward alone at batch 128, 3 iterations and full under both algorithms for the
    vectorised and fused implementations (self-attention beside dynamic routing where it costs least), and the
    peaks and parity figures whole."""
    from asv.benchmarks import Benchmarks

    from harness.suite.sizes import PROFILES, routing_algorithms, routing_gradients

    fast = PROFILES["fast"]
    names = [repr(name) for name in registry.names()]
    algorithms = [repr(name) for name in routing_algorithms(fast)]
    assert algorithms == ["'dynamic'", "'self-attention'"]
    batches = [repr(b) for b in fast["batch_sizes"]]
    grid = {"bench_phases.TrainStep.time_train_step": [names, batches,
                                                       [repr(i) for i in fast["step_routing_iterations"]],
                                                       [repr(g) for g in routing_gradients(fast)], algorithms],
            "bench_phases.RoutingBackward.time_routing_backward": [names, batches,
                                                                   [repr(i) for i in fast["routing_iterations"]],
                                                                   [repr(g) for g in routing_gradients(fast)],
                                                                   algorithms],
            "bench_phases.Routing.time_routing": [names, batches, ["3"], algorithms],
            "bench_phases.Backward.time_backward": [names, ["32"], ["3"], ["'full'"], algorithms],
            "bench_memory.HostMemory.track_host_memory_train_step": [names, batches, ["3"], algorithms],
            "bench_memory.HostMemory.track_host_memory_before_model": [names, batches, ["3"], algorithms],
            "bench_memory.HostMemory.peakmem_train_step": [names, ["32"], ["3"], algorithms],
            "bench_peak.GemmPeak.track_gemm_peak_gflops": [["'numpy'", "'torch'"]],
            "bench_peak.HardwarePeak.track_hardware_peak_gflops": [],
            "bench_correctness.Correctness.track_max_rel_error": [names]}
    described = [{"name": name, "params": params} for name, params in grid.items()]
    chosen = Benchmarks(type("Conf", (), {"benchmark_dir": "benchmarks"})(), described,
                        regex=readme_main_job_option("--bench"))
    assert set(chosen) == set(grid) - {"bench_phases.Backward.time_backward", "bench_phases.Routing.time_routing",
                                       "bench_memory.HostMemory.peakmem_train_step"}

    def picked(name):
        points = list(itertools.product(*grid[name]))
        return sorted(points[index] for index in chosen.benchmark_selection[name])

    for name in ("bench_phases.TrainStep.time_train_step", "bench_memory.HostMemory.track_host_memory_train_step",
                 "bench_memory.HostMemory.track_host_memory_before_model"):
        assert picked(name) == sorted(point for point in itertools.product(*grid[name])
                                      if point[-1] == "'dynamic'" and "'final'" not in point), name
    routed = picked("bench_phases.RoutingBackward.time_routing_backward")
    assert {point[-1] for point in routed} == {"'dynamic'", "'self-attention'"}
    assert {point[1:4] for point in routed} == {("128", "3", "'full'")}
    assert {json.loads(point[0].replace("'", '"')) for point in routed} == {
        name for name in registry.names() if name.endswith(("vectorised", "fused"))}
    assert {"torch-fused", "numpy-vectorised"} <= {json.loads(point[0].replace("'", '"')) for point in routed}
    for name in ("bench_peak.GemmPeak.track_gemm_peak_gflops", "bench_correctness.Correctness.track_max_rel_error"):
        assert len(chosen.benchmark_selection[name]) == len(list(itertools.product(*grid[name])))


def test_a_narrowed_run_keeps_the_grid_and_writes_the_facts(asv_env, tmp_path):
    """CAPSBENCH_IMPLEMENTATIONS and --bench narrow what runs, never the grid: benchmarks.json still names
    every implementation, the others are skipped with the reason, and the machine facts are written beside
    the saved results although the MachineFacts benchmark did not run.  The run is README's main job's
    (its --bench and samples): its report has the train step with README's number of samples and a spread,
    the host memory of a step beside the memory before the model, the parity figure (so the implementation is
    ranked without a "parity not measured" mark), the machine's peak, and no other phase."""
    head = measured_commit(asv_env)
    env = {**asv_env, "CAPSBENCH_IMPLEMENTATIONS": "numpy-vectorised", "CAPSBENCH_ASV_COMMIT": head,
           "CAPSBENCH_ASV_CONFIG": asv_env["ASV_CONFIG"]}
    result = run_asv(env, "run", *readme_main_job_options(), "--python=same", "--set-commit-hash", head,
                     "--show-stderr")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    results = Path(asv_env["HOME"]) / "results"
    described = json.loads((results / "benchmarks.json").read_text())
    grid = described["bench_phases.TrainStep.time_train_step"]["params"][0]
    assert sorted(json.loads(name.replace("'", '"')) for name in grid) == registry.names()
    assert "torch-looped is left out by CAPSBENCH_IMPLEMENTATIONS" in output
    facts = list((results.parent / "asv-facts").glob(f"*/{head[:8]}*.json"))
    assert len(facts) == 1, output
    recorded = json.loads(facts[0].read_text())
    assert recorded["profile"] == "smoke" and set(recorded["implementations"]) == set(registry.names())
    assert recorded["implementations"]["numpy-looped"] == registry.get("numpy-looped").describe()
    assert recorded["routing_algorithms"]["self-attention"]["iterative"] is False  # the report reads it there
    assert recorded["routing_algorithms"]["dynamic"]["routing_gradients"] == ["full", "final"]
    assert recorded["left_out"] == {name: "is left out by CAPSBENCH_IMPLEMENTATIONS" for name in registry.names()
                                    if name != "numpy-vectorised"}

    saved = saved_results(results)
    assert len(saved) == 1, saved
    assert set(json.loads(saved[0].read_text())["results"]) == {
        "bench_phases.TrainStep.time_train_step", "bench_peak.GemmPeak.track_gemm_peak_gflops",
        "bench_peak.HardwarePeak.track_hardware_peak_gflops", "bench_memory.HostMemory.track_host_memory_train_step",
        "bench_memory.HostMemory.track_host_memory_before_model",
        "bench_correctness.Correctness.track_max_rel_error"}, output
    root = tmp_path / "runs"
    shutil.copytree(results, root / "asv")
    shutil.copytree(results.parent / "asv-facts", root / "asv-facts")
    assert report.main(["--results", str(root)]) == 0
    tidy = pd.read_csv(root / "report" / report.TIDY_CSV)
    assert set(tidy["benchmark"]) >= {"time_train_step", "track_hardware_peak_gflops"}, set(tidy["benchmark"])
    trained = tidy[(tidy["benchmark"] == "time_train_step") & tidy["value"].notna()]
    assert set(trained["implementation"]) == {"numpy-vectorised"} and (trained["value"] > 0).all()
    assert (trained["samples"] == int(readme_main_job_option("repeat"))).all() and (trained["samples"] >= 5).all()
    assert ((trained["q25"] <= trained["value"]) & (trained["value"] <= trained["q75"])).all()
    memory = tidy[tidy["metric"].isin(["host_memory", "host_memory_before_model"]) & tidy["value"].notna()]
    memory = memory.pivot_table(index="implementation", columns="metric", values="value")
    assert list(memory.index) == ["numpy-vectorised"], memory
    assert (memory["host_memory"] > memory["host_memory_before_model"]).all() and \
        (memory["host_memory_before_model"] > 0).all()
    written = (root / "report" / report.REPORT_MD).read_text()
    assert "(skipped in every benchmark: it is left out by CAPSBENCH_IMPLEMENTATIONS)" in written
    assert "numpy-vectorised" in written and "numpy-vectorised (parity" not in written


def test_the_suite_says_why_it_leaves_an_implementation_out(monkeypatch):
    """What the facts record for the report: the compiling implementations left out by a quick profile,
    those CAPSBENCH_IMPLEMENTATIONS leaves out, nothing for one that runs."""
    from benchmarks import common

    monkeypatch.delenv(settings.IMPLEMENTATIONS_ENV, raising=False)
    monkeypatch.setattr(common, "SELECTED", set(registry.names()))
    monkeypatch.setitem(common.PROFILE, "compiled", False)
    assert common.left_out_reason("numpy-vectorised") is None
    assert common.left_out_reason("torch-vectorised-compiled") == (
        f"compiles again in every benchmark process: the {common.PROFILE_NAME} profile leaves it out "
        f"(CAPSBENCH_PROFILE=regular, or name it in CAPSBENCH_IMPLEMENTATIONS)")
    monkeypatch.setitem(common.PROFILE, "compiled", True)
    assert common.left_out_reason("torch-vectorised-compiled") is None
    monkeypatch.setattr(common, "SELECTED", {"numpy-vectorised"})
    assert common.left_out_reason("torch-looped") == "is left out by CAPSBENCH_IMPLEMENTATIONS"


def started_at(path: Path, benchmark: str) -> int:
    """When the run that last measured ``benchmark`` started it (asv's results file)."""
    saved = json.loads(path.read_text())
    return dict(zip(saved["result_columns"], saved["results"][benchmark]))["started_at"]


def test_a_narrowed_or_misspelt_rerun_keeps_every_earlier_figure(asv_env, tmp_path):
    """Issue 42, point 1, with real asv runs at one commit and environment: a run of two implementations,
    then one narrowed to one of them, which measures it again and keeps the other's figure (asv alone would
    store the skipped cell as n/a: harness/suite/asv_keep_figures.py keeps it), then a misspelt one, which ends
    at discovery with the known names and a non-zero status, the results as they were."""
    env = {**asv_env, "ASV_CONFIG": str(write_asv_config(tmp_path, tmp_path / "results"))}
    bench, benchmark = "TrainStep", "bench_phases.TrainStep.time_train_step"

    first = run_saved(env, "numpy-vectorised,torch-looped", bench)
    assert first.returncode == 0, first.stdout + first.stderr
    [path] = saved_results(tmp_path / "results")
    before = figures(path, benchmark)
    assert implementations_with_figures(path, benchmark) == {"numpy-vectorised", "torch-looped"}
    started = started_at(path, benchmark)

    narrowed = run_saved(env, "numpy-vectorised", bench)
    assert narrowed.returncode == 0, narrowed.stdout + narrowed.stderr
    assert "torch-looped is left out by CAPSBENCH_IMPLEMENTATIONS" in narrowed.stdout  # skipped in this run
    after = figures(path, benchmark)
    assert implementations_with_figures(path, benchmark) == {"numpy-vectorised", "torch-looped"}
    looped = [cell for cell in before if "torch-looped" in cell[0]]
    assert {cell[-1] for cell in looped} == {"'dynamic'", "'self-attention'"}  # torch-looped computes both
    assert {cell: after[cell] for cell in looped} == {cell: before[cell] for cell in looped}  # untouched
    assert started_at(path, benchmark) > started  # and numpy-vectorised measured again

    saved = {file: file.read_bytes() for file in (tmp_path / "results").rglob("*.json")}
    misspelt = run_saved(env, "numpy-vectorized", bench)
    output = misspelt.stdout + misspelt.stderr
    assert misspelt.returncode != 0, output
    assert "CAPSBENCH_IMPLEMENTATIONS names 'numpy-vectorized', which no implementation registers" in output
    assert "known implementations: " + ", ".join(registry.names()) in output
    assert "Running " not in output  # ended at discovery, before any benchmark
    assert {file: file.read_bytes() for file in (tmp_path / "results").rglob("*.json")} == saved


def test_unavailable_implementation_is_skipped_with_its_reason():
    from benchmarks import common

    if registry.get("cupy-vectorised").availability():
        pytest.skip("CuPy runs here")
    with pytest.raises(NotImplementedError, match="cupy-vectorised is unavailable here: "):
        common.prepare("cupy-vectorised", 2, 3, "train_step")


class RunsOutOfMemory(TorchCapsNet):
    def train_step(self, batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 755.00 MiB")


def test_out_of_memory_is_a_skip_not_a_crash(monkeypatch):
    from benchmarks import common

    with registry.registered("oom", RunsOutOfMemory):
        monkeypatch.setattr(common, "SELECTED", set(registry.names()))
        with pytest.raises(NotImplementedError, match="oom runs out of memory at batch 512"):
            common.prepare("oom", 512, 3, "train_step")
    assert common.is_out_of_memory(MemoryError())
    assert not common.is_out_of_memory(ValueError("shapes do not match"))


def test_the_plan_an_implementation_chose_goes_into_the_facts_and_stays(monkeypatch, tmp_path):
    """torch-fused's plan per batch size is added to the run's facts; a later benchmark process rewriting
    the facts keeps it."""
    from benchmarks import common
    from harness.suite import asv_facts

    path = tmp_path / "facts.json"
    monkeypatch.setattr(asv_facts, "measured_commit", lambda: "abcdef12")
    monkeypatch.setattr(asv_facts, "facts_path", lambda commit: path)
    monkeypatch.setattr(asv_facts, "_facts_written", False)

    class Chose:
        def plan_facts(self):
            return {"32": {"primary_caps": {"forward": "library"}, "source": "measured"}}

    common.record_plan_facts("torch-fused", Chose())
    common.record_plan_facts("numpy-vectorised", object())  # no plan: nothing recorded
    monkeypatch.setattr(asv_facts, "_facts_written", False)  # the next benchmark process
    common.record_facts()
    plans = json.loads(path.read_text())["plans"]
    assert plans == {"torch-fused": {"32": {"primary_caps": {"forward": "library"}, "source": "measured"}}}


def test_a_skip_keeps_the_earlier_figure_and_a_new_figure_or_a_failure_replaces_it(monkeypatch):
    """harness/suite/asv_keep_figures.py on asv's own Results, cell by cell: a skipped cell (NaN) keeps the earlier
    figure, a measured one replaces it, a failed one (None) too; a benchmark whose code changed (another
    version) keeps nothing; setting up twice wraps once; an asv without ``selected_idx`` is refused by name."""
    from asv import util
    from asv.results import Results
    from asv.runner import BenchmarkResult

    from harness.suite import asv_keep_figures

    monkeypatch.setattr(Results, "add_result", Results.add_result)  # undone after the test
    asv_keep_figures.setup()
    wrapped = Results.add_result
    asv_keep_figures.setup()
    assert Results.add_result is wrapped

    def run(values, version="1"):
        benchmark = {"name": "bench_phases.TrainStep.time_train_step", "version": version,
                     "params": [["'a'", "'b'", "'c'", "'d'"]]}
        results.add_result(benchmark, BenchmarkResult(result=values, samples=[None] * 4, number=[None] * 4,
                                                      errcode=0, stderr="", profile=None))
        return results.get_result_value(benchmark["name"], benchmark["params"])

    nan = float("nan")
    results = Results.unnamed()
    assert run([1.0, 2.0, 3.0, nan])[:3] == [1.0, 2.0, 3.0]
    after = run([nan, 5.0, None, nan])
    assert after[:3] == [1.0, 5.0, None] and util.is_nan(after[3])
    assert util.is_nan(run([nan, nan, nan, nan], version="2")[0])

    monkeypatch.setattr(Results, "add_result", lambda self, benchmark, result: None)
    with pytest.raises(util.UserError, match=r"selected_idx.*install asv>=0\.6\.4,<0\.7"):
        asv_keep_figures.setup()


def test_the_documented_routing_comparison_measures_both_algorithms_of_its_two_implementations_alone():
    """docs/benchmarks.md's 7-sample comparison of the routing algorithms: on the fast grid, torch-fused and
    numpy-vectorised (and no other implementation: no process is started for a skip) at batches 32 and 128,
    train step and routing forward + backward at 3 iterations and full, host memory, under both algorithms;
    their parity figures and the peaks."""
    from asv.benchmarks import Benchmarks

    from benchmarks import bench_memory, bench_phases

    command = next(line for line in (REPO_ROOT / "docs" / "benchmarks.md").read_text().splitlines()
                   if line.startswith("CAPSBENCH_IMPLEMENTATIONS=torch-fused,numpy-vectorised asv run"))
    words = shlex.split(command)
    assert words[words.index("-a") + 1] == "repeat=7"
    pattern = words[words.index("--bench") + 1]
    grid = {"bench_phases.TrainStep.time_train_step": bench_phases.TrainStep,
            "bench_phases.RoutingBackward.time_routing_backward": bench_phases.RoutingBackward,
            "bench_phases.Routing.time_routing": bench_phases.Routing,
            "bench_memory.HostMemory.track_host_memory_train_step": bench_memory.HostMemory,
            "bench_memory.HostMemory.track_host_memory_before_model": bench_memory.HostMemory}
    from harness.suite.sizes import PROFILES

    fast = PROFILES["fast"]
    params = {name: [[repr(name) for name in registry.names()], [repr(b) for b in fast["batch_sizes"]],
                     [repr(i) for i in fast["routing_iterations" if "Routing" in name else "step_routing_iterations"]],
                     *([["'full'", "'final'"]] if "routing_gradient" in cls.param_names else []),
                     ["'dynamic'", "'self-attention'"]] for name, cls in grid.items()}
    described = [{"name": name, "params": value} for name, value in params.items()]
    described.append({"name": "bench_correctness.Correctness.track_max_rel_error",
                      "params": [[repr(name) for name in registry.names()]]})
    chosen = Benchmarks(type("Conf", (), {"benchmark_dir": "benchmarks"})(), described, regex=pattern)
    for name in grid:
        points = list(itertools.product(*params[name]))
        picked = {points[index] for index in chosen.benchmark_selection.get(name, [])}
        if name.endswith("time_routing"):
            assert not picked
            continue
        assert {point[0] for point in picked} == {"'torch-fused'", "'numpy-vectorised'"}, name
        assert {point[1] for point in picked} == {"32", "128"} and {point[2] for point in picked} == {"3"}, name
        assert {point[-1] for point in picked} == {"'dynamic'", "'self-attention'"}, name
        assert len(picked) == 8 and "'final'" not in {word for point in picked for word in point}, name
    assert len(chosen.benchmark_selection["bench_correctness.Correctness.track_max_rel_error"]) == 2
