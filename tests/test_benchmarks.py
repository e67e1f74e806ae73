"""The asv suite: every benchmark runs once in its quickest form (so a broken benchmark fails CI), and the
suite's own helpers skip what cannot run instead of crashing."""

import itertools
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from harness import registry, report, settings
from implementations.torch_capsnet import TorchCapsNet

from conftest import REPO_ROOT

BENCHMARK_NAMES = [
    "time_forward", "time_inference", "time_train_step", "time_backward", "time_routing", "time_routing_backward",
    "peakmem_train_step", "track_host_memory_train_step", "track_host_memory_before_model", "track_max_rel_error",
    "track_threads", "track_gemm_peak_gflops", "track_compile_seconds", "track_plan_seconds",
    "track_hardware_peak_gflops",
]


@pytest.fixture(scope="module")
def asv_env(tmp_path_factory):
    """asv's environment with a HOME of its own, holding the machine description `asv machine --yes`
    writes (asv refuses to run without one; the user's own ~/.asv-machine.json stays untouched), and a
    copy of asv.conf.json whose results and environments go to a temporary folder (even a dry run
    rewrites results/asv/benchmarks.json, which the committed results need as they are)."""
    home = tmp_path_factory.mktemp("home")
    lines = (REPO_ROOT / "asv.conf.json").read_text().splitlines()
    conf = json.loads("\n".join(line for line in lines if not line.strip().startswith("//")))
    conf.update(repo=str(REPO_ROOT), benchmark_dir=str(REPO_ROOT / "benchmarks"), results_dir=str(home / "results"),
                env_dir=str(home / "env"), html_dir=str(home / "html"))
    (home / "asv.conf.json").write_text(json.dumps(conf))
    env = {**os.environ, "HOME": str(home), "CAPSBENCH_PROFILE": "smoke", "ASV_CONFIG": str(home / "asv.conf.json")}
    subprocess.run(["asv", "machine", "--yes"], cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=120)
    return env


def run_asv(env, command, *args):
    return subprocess.run(["asv", command, "--config", env["ASV_CONFIG"], *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=env, timeout=900, stdin=subprocess.DEVNULL)


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


def test_profiles_choose_the_grid(monkeypatch):
    from harness.suite_profiles import load_suite_profile

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
    problem = common.selected_implementations()
    assert isinstance(problem, str) and "\n" not in problem
    assert "'numpy-vectorized'" in problem and "known implementations: " + ", ".join(registry.names()) in problem


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


def test_the_main_job_times_the_train_step_at_the_full_routing_gradient_alone():
    """asv matches --bench against each grid point, `name(parameters)`: on the fast profile's grid, README's
    pattern picks every implementation and batch of the train step at the full gradient (the headline's), no
    point at final (which would double the main job), and the peaks and host-memory figures whole."""
    from asv.benchmarks import Benchmarks

    from harness.suite_profiles import PROFILES, routing_gradients

    fast = PROFILES["fast"]
    names = [repr(name) for name in registry.names()]
    grid = {"bench_phases.TrainStep.time_train_step": [names, [repr(b) for b in fast["batch_sizes"]],
                                                       [repr(i) for i in fast["step_routing_iterations"]],
                                                       [repr(g) for g in routing_gradients(fast)]],
            "bench_phases.Backward.time_backward": [names, ["32"], ["3"], ["'full'"]],
            "bench_memory.HostMemory.track_host_memory_train_step": [names, ["32"], ["3"]],
            "bench_memory.HostMemory.track_host_memory_before_model": [names, ["32"], ["3"]],
            "bench_memory.HostMemory.peakmem_train_step": [names, ["32"], ["3"]],
            "bench_peak.GemmPeak.track_gemm_peak_gflops": [["'numpy'", "'torch'"]],
            "bench_peak.HardwarePeak.track_hardware_peak_gflops": []}
    described = [{"name": name, "params": params} for name, params in grid.items()]
    chosen = Benchmarks(type("Conf", (), {"benchmark_dir": "benchmarks"})(), described,
                        regex=readme_main_job_option("--bench"))
    assert set(chosen) == set(grid) - {"bench_phases.Backward.time_backward",
                                       "bench_memory.HostMemory.peakmem_train_step"}
    points = list(itertools.product(*grid["bench_phases.TrainStep.time_train_step"]))
    picked = [points[index] for index in chosen.benchmark_selection["bench_phases.TrainStep.time_train_step"]]
    assert sorted(picked) == sorted(point for point in points if point[-1] == "'full'")
    for name in ("bench_memory.HostMemory.track_host_memory_train_step", "bench_peak.GemmPeak.track_gemm_peak_gflops"):
        assert len(chosen.benchmark_selection[name]) == len(list(itertools.product(*grid[name])))


def test_a_narrowed_run_keeps_the_grid_and_writes_the_facts(asv_env, tmp_path):
    """CAPSBENCH_IMPLEMENTATIONS and --bench narrow what runs, never the grid: benchmarks.json still names
    every implementation, the others are skipped with the reason, and the machine facts are written beside
    the saved results although the MachineFacts benchmark did not run.  The run is README's main job's
    (its --bench and samples): its report has the train step with README's number of samples and a spread,
    the host memory of a step beside the memory before the model, the machine's peak, and no other phase."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    env = {**asv_env, "CAPSBENCH_IMPLEMENTATIONS": "numpy-vectorised", "CAPSBENCH_ASV_COMMIT": head,
           "CAPSBENCH_ASV_CONFIG": asv_env["ASV_CONFIG"]}
    result = subprocess.run(["asv", "run", "--config", env["ASV_CONFIG"], *readme_main_job_options(), "--python=same",
                             "--set-commit-hash", head, "--show-stderr"],
                            cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=900,
                            stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    results = Path(env["HOME"]) / "results"
    described = json.loads((results / "benchmarks.json").read_text())
    grid = described["bench_phases.TrainStep.time_train_step"]["params"][0]
    assert sorted(json.loads(name.replace("'", '"')) for name in grid) == registry.names()
    assert "torch-looped is left out by CAPSBENCH_IMPLEMENTATIONS" in output
    facts = list((results.parent / "asv-facts").glob(f"*/{head[:8]}*.json"))
    assert len(facts) == 1, output
    recorded = json.loads(facts[0].read_text())
    assert recorded["profile"] == "smoke" and set(recorded["implementations"]) == set(registry.names())
    assert recorded["implementations"]["numpy-looped"] == registry.get("numpy-looped").describe()
    assert recorded["left_out"] == {name: "is left out by CAPSBENCH_IMPLEMENTATIONS" for name in registry.names()
                                    if name != "numpy-vectorised"}

    saved = [path for path in results.glob("*/*.json") if path.name != "machine.json"]
    assert len(saved) == 1, saved
    assert set(json.loads(saved[0].read_text())["results"]) == {
        "bench_phases.TrainStep.time_train_step", "bench_peak.GemmPeak.track_gemm_peak_gflops",
        "bench_peak.HardwarePeak.track_hardware_peak_gflops", "bench_memory.HostMemory.track_host_memory_train_step",
        "bench_memory.HostMemory.track_host_memory_before_model"}, output
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
    assert "(skipped in every benchmark: it is left out by CAPSBENCH_IMPLEMENTATIONS)" in \
        (root / "report" / report.REPORT_MD).read_text()


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


def test_a_misspelt_implementation_ends_with_the_known_names(asv_env):
    env = {**asv_env, "CAPSBENCH_IMPLEMENTATIONS": "numpy-vectorized"}
    result = subprocess.run(["asv", "run", "--config", env["ASV_CONFIG"], "--quick", "--dry-run", "--python=same",
                             "--bench", "TrainStep", "--show-stderr"],
                            cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=900,
                            stdin=subprocess.DEVNULL)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert "known implementations: " + ", ".join(registry.names()) in lines[-1], lines[-5:]


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
    from harness import asv_facts

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
