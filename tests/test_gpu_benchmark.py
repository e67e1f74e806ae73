"""The one command for a GPU lease, tested on the CPU: it refuses at once without a GPU; its stages run in
order under a budget, a failing stage is recorded with its log's last line and the run goes on, a hanging
one is killed at its cap, one that cannot fit is skipped with the reason, a run killed with SIGKILL leaves
its archive and steps.json, a missing asv skips the suite only; and the real stages run on the CPU with the
smoke sizes.  Slow stages are replaced by fake actions that run small commands through the same runner."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from harness import gpu_benchmark, registry

from conftest import REPO_ROOT


def make_plan(tmp_path: Path, budget: float = 300.0) -> gpu_benchmark.Plan:
    return gpu_benchmark.Plan(tmp_path / "run", "cpu", ["numpy-vectorised"], True, None, "m", budget,
                              tmp_path / "out" / "run.tar.gz")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def command_stage(name: str, code: str, estimate: float = 1.0) -> gpu_benchmark.Stage:
    """A stage whose action runs a small Python program through the stage's runner, as real stages do."""
    return gpu_benchmark.Stage(name, estimate, lambda plan, runner: runner.run(python(code)) and None)


def archived(plan: gpu_benchmark.Plan) -> dict:
    """steps.json as the archive holds it."""
    with tarfile.open(plan.archive_path) as tar:
        return json.load(tar.extractfile("run/steps.json"))


@pytest.mark.skipif(bool(registry.available("cuda")), reason="this machine has a usable GPU")
def test_without_a_gpu_it_ends_within_seconds_with_one_line(tmp_path):
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "harness.gpu_benchmark", str(tmp_path / "run")], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and time.perf_counter() - start < 30
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no usable GPU: ") and "nothing was run" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_failing_stage_is_recorded_with_its_last_line_and_the_run_goes_on(tmp_path):
    plan = make_plan(tmp_path)
    (plan.out / "training").mkdir(parents=True)
    (plan.out / "training" / "accuracy.checkpoint.npz").write_bytes(b"a checkpoint stays on the machine")
    stages = [command_stage("facts", "print('facts ok')"),
              command_stage("parity", "import sys; print('checking'); print('ValueError: parity broke'); sys.exit(3)"),
              command_stage("report", "print('report ok')")]
    stream = io.StringIO()
    assert gpu_benchmark.run_stages(plan, stages, stream) == 1
    recorded = archived(plan)["stages"]
    assert [recorded[name]["status"] for name in ("facts", "parity", "report")] == ["ok", "failed", "ok"]
    assert "exited 3: ValueError: parity broke" in recorded["parity"]["reason"]
    lines = stream.getvalue().splitlines()
    assert lines[0] == "stage 1/4 facts: estimate 1 s, budget left 300 s"
    assert lines[3].startswith("stage 2/4 parity: failed in ") and lines[3].endswith("(log: parity.log)")
    assert gpu_benchmark.last_line("ValueError: real\nasv: skipped: NotImplementedError('x')\ndone") == \
        "ValueError: real"
    assert lines[-1].startswith("stage 4/4 archive: ")
    beside = json.loads((tmp_path / "out" / "run.steps.json").read_text())
    assert beside["stages"] == recorded
    with tarfile.open(plan.archive_path) as tar:
        assert not any(name.endswith(".checkpoint.npz") for name in tar.getnames())


def test_the_dry_run_prints_the_estimates_and_runs_nothing(tmp_path, capsys):
    assert gpu_benchmark.main([str(tmp_path / "run"), "--dry-run", "--budget", "480"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "9 implementation(s) on cuda: 6 eager, 3 compiling"
    assert lines[1].startswith("left out to fit the 480 s budget: ")
    assert [line.split()[0] for line in lines[2:]] == ["facts", "parity", "gpu-tests", "suite", "suite-compiled",
                                                       "profile", "report", "archive", "total"]
    assert lines[-1].endswith("s of a 480 s budget") and not (tmp_path / "run").exists()


def test_a_hanging_stage_is_killed_at_its_cap_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_benchmark, "CAP_MINIMUM_S", 1.0)
    plan = make_plan(tmp_path)
    stages = [command_stage("suite", "import time; print('measuring', flush=True); time.sleep(120)", estimate=0.5),
              command_stage("report", "print('report ok')")]
    start = time.monotonic()
    assert gpu_benchmark.run_stages(plan, stages, io.StringIO()) == 1
    assert time.monotonic() - start < 30
    recorded = archived(plan)["stages"]
    assert recorded["suite"]["status"] == "timed out" and recorded["suite"]["cap_s"] == 1.0
    assert "killed at its cap" in recorded["suite"]["reason"] and "measuring" in recorded["suite"]["reason"]
    assert recorded["report"]["status"] == "ok"


def test_a_stage_that_cannot_fit_is_skipped_with_the_reason(tmp_path):
    plan = make_plan(tmp_path, budget=50)
    ran = []
    stages = [gpu_benchmark.Stage("suite", 100, lambda plan, runner: ran.append("suite")),
              gpu_benchmark.Stage("profile", 5, lambda plan, runner: ran.append("profile")),
              gpu_benchmark.Stage("report", 10, lambda plan, runner: ran.append("report"))]
    stream = io.StringIO()
    assert gpu_benchmark.run_stages(plan, stages, stream) == 0
    assert ran == ["profile", "report"]
    recorded = archived(plan)["stages"]
    assert recorded["suite"] == {"status": "skipped", "estimate_s": 100,
                                 "reason": "does not fit: needs about 100 s (+12 s for the report and archive), "
                                           "50 s left"}
    assert "stage 1/4 suite: skipped: does not fit" in stream.getvalue()


KILLED_RUN = """
import sys, time
from pathlib import Path
from harness import gpu_benchmark as g
tmp = Path(sys.argv[1])
plan = g.Plan(tmp / "run", "cpu", ["numpy-vectorised"], True, None, "m", 300.0, tmp / "out" / "run.tar.gz")
plan.out.mkdir(parents=True)
stages = [g.Stage("facts", 1, lambda plan, runner: (plan.out / "facts.json").write_text("{}")),
          g.Stage("parity", 1, lambda plan, runner: runner.run([sys.executable, "-c", "import time; time.sleep(120)"]))]
g.run_stages(plan, stages)
"""


def test_a_run_killed_mid_stage_leaves_the_archive_and_says_what_was_running(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path)], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, start_new_session=True)
    beside = tmp_path / "out" / "run.steps.json"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stages = json.loads(beside.read_text())["stages"] if beside.exists() else {}
            if stages.get("parity", {}).get("status") == "running":
                break
            time.sleep(0.1)
        else:
            pytest.fail("the run never reached its second stage")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and the stage's command, as the lease's end does
        process.wait()
    stages = json.loads(beside.read_text())["stages"]
    assert stages["facts"]["status"] == "ok" and stages["parity"]["status"] == "running"
    with tarfile.open(tmp_path / "out" / "run.tar.gz") as tar:
        assert {"run/facts.json", "run/steps.json"} <= set(tar.getnames())
        assert json.load(tar.extractfile("run/steps.json"))["stages"]["facts"]["status"] == "ok"


def test_without_asv_the_suite_is_skipped_and_everything_else_runs(tmp_path, monkeypatch, capsys, mnist_path):
    monkeypatch.setattr(gpu_benchmark.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "asv" else object())
    ran = []
    for stage in ("stage_parity", "stage_gpu_tests", "stage_profile", "stage_report"):
        monkeypatch.setattr(gpu_benchmark, stage, lambda plan, runner, stage=stage: ran.append(stage) or "faked")
    status = gpu_benchmark.main([str(tmp_path / "run"), "--device", "cpu", "--smoke", "--impl", "numpy-vectorised",
                                 "--data-dir", str(mnist_path), "--machine", "m", "--budget", "200"])
    assert status == 0
    out = capsys.readouterr().out
    assert "missing: asv is not installed: the suite stages are skipped" in out
    assert ran == ["stage_parity", "stage_gpu_tests", "stage_profile", "stage_report"]
    with tarfile.open(tmp_path / "run.tar.gz") as tar:
        recorded = json.load(tar.extractfile("run/steps.json"))
        assert "run/facts.json" in tar.getnames() and "run/list.txt" in tar.getnames()
    assert recorded["missing"]["asv"].startswith("asv is not installed")
    assert recorded["stages"]["suite"]["status"] == "skipped"
    assert recorded["stages"]["suite"]["reason"].startswith("asv is not installed")
    assert recorded["stages"]["facts"]["status"] == recorded["stages"]["parity"]["status"] == "ok"


def test_missing_things_are_named_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_benchmark.importlib.util, "find_spec",
                        lambda name, *rest: None if name in ("asv", "matplotlib") else object())
    missing = gpu_benchmark.missing_things("cpu", str(tmp_path))
    assert set(missing) == {"asv", "mnist", "report"}
    assert "MNIST file train-images-idx3-ubyte[.gz] not found" in missing["mnist"]
    assert missing["report"] == "matplotlib not installed: the report stage is skipped"


def test_the_lease_grid_selects_only_its_points():
    """asv matches --bench against name(params): only the chosen implementations' step and memory points
    start a process."""
    import re

    patterns = gpu_benchmark.suite_selection(["torch-fused-cuda", "cupy-vectorised"], memory=True)

    def chosen(name):
        return any(re.search(pattern, name) for pattern in patterns)

    assert chosen("bench_phases.TrainStep.time_train_step('cupy-vectorised', 512, 3)")
    assert chosen("bench_memory.GpuMemory.track_gpu_memory_nvml('torch-fused-cuda', 32, 3)")
    assert not chosen("bench_phases.TrainStep.time_train_step('torch-looped-cuda', 128, 3)")
    assert not chosen("bench_phases.TrainStep.time_train_step('torch-fused-cuda-x', 128, 3)")
    assert not chosen("bench_phases.Inference.time_inference('cupy-vectorised', 128, 3)")
    assert not any("GpuMemory" in pattern for pattern in gpu_benchmark.suite_selection(["cupy-vectorised"], False))


def test_the_default_budget_fits_the_h200_estimates():
    """Every CUDA implementation but the compiling looped ones fits the first command's budget; those are
    left out, the costliest first, only as far as the budget needs, and an --impl selection is never trimmed."""
    names = [info.name for info in registry.entries() if info.device == "cuda"]
    kept, left_out = gpu_benchmark.fit_to_budget("cuda", names, False, gpu_benchmark.DEFAULT_BUDGET_S)
    plan = gpu_benchmark.Plan(Path("/nonexistent"), "cuda", kept, False, None, "m")
    assert gpu_benchmark.plan_estimate(plan) <= gpu_benchmark.DEFAULT_BUDGET_S < 600
    assert left_out and set(kept) | set(left_out) == set(names) and not set(kept) & set(left_out)
    for name in left_out:
        assert registry.get(name).cls.first_call_compiles and registry.get(name).routing_variant == "looped"
    back = kept + left_out[-1:]  # the last one dropped was needed: with it the plan does not fit
    assert gpu_benchmark.plan_estimate(gpu_benchmark.Plan(Path("/x"), "cuda", back, False, None, "m")) > \
        gpu_benchmark.DEFAULT_BUDGET_S
    assert gpu_benchmark.fit_to_budget("cuda", names, False, 10_000) == (names, [])


def test_the_accuracy_stage_trains_the_fastest_that_passed_parity(tmp_path):
    first = tmp_path / "first"
    (first / "profile").mkdir(parents=True)
    (first / "parity.json").write_text(json.dumps({"a": {"small": "passed", "paper": "passed"},
                                                   "b": {"small": "passed", "paper": "failed: x"},
                                                   "c": {"small": "passed", "paper": "passed"}}))
    (first / "profile" / "profile.csv").write_text("implementation,phase,layer,time_s\na,forward,conv1,0.003\n"
                                                   "a,backward,conv1,0.004\nb,forward,conv1,0.001\n"
                                                   "c,forward,conv1,0.002\nc,backward,conv1,0.002\n")
    name, why = gpu_benchmark.fastest_passing(first)
    assert name == "c" and "4.00 ms" in why
    (first / "profile" / "profile.csv").unlink()
    assert gpu_benchmark.fastest_passing(first)[0] == "a"


def test_every_stage_runs_on_the_cpu_with_the_smoke_sizes(tmp_path, mnist_path):
    out, archive = tmp_path / "run", tmp_path / "run.tar.gz"
    env = {**{key: value for key, value in os.environ.items() if key != "HOME"}, "HOME": str(tmp_path)}
    completed = subprocess.run(
        [sys.executable, "-m", "harness.gpu_benchmark", str(out), "--device", "cpu", "--smoke", "--impl",
         "numpy-vectorised", "--data-dir", str(mnist_path), "--machine", "smoke-machine", "--budget", "500"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    recorded = json.loads((out / "steps.json").read_text())["stages"]
    assert {name: step["status"] for name, step in recorded.items()} == {
        "facts": "ok", "parity": "ok", "gpu-tests": "ok", "suite": "ok", "suite-compiled": "skipped",
        "profile": "ok", "report": "ok"}
    assert json.loads((out / "parity.json").read_text()) == {"numpy-vectorised": {"small": "passed"}}
    assert list((out / "asv" / "smoke-machine").glob("*-*.json")) and list((out / "asv-facts").glob("*/*.json"))
    assert (out / "profile" / "profile.csv").is_file() and (out / "report" / "report.md").is_file()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert {"run/report/report.md", "run/profile/profile.csv", "run/steps.json"} <= set(names)
    assert not any("asv-env" in name for name in names)
    assert archive.stat().st_size < gpu_benchmark.ARCHIVE_LIMIT_BYTES
    # the second command: the paper recipe (small network here) on the one that passed, resumable
    second = tmp_path / "accuracy"
    command = [sys.executable, "-m", "harness.gpu_benchmark", str(second), "--stage", "accuracy", "--from",
               str(archive), "--device", "cpu", "--smoke", "--data-dir", str(mnist_path), "--max-epochs", "1",
               "--budget", "300"]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    recorded = json.loads((second / "steps.json").read_text())["stages"]
    assert recorded["accuracy"]["status"] == "ok" and "numpy-vectorised" in recorded["accuracy"]["note"]
    assert len(json.loads((second / gpu_benchmark.ACCURACY_RESULTS).read_text())["epochs"]) == 1
