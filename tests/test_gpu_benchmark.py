"""The one command for a GPU machine, tested on the CPU: it refuses at once without a GPU, runs its steps in
order on the CPU implementations with the smoke sizes, stops at the first failing step keeping what was
written, and packs one archive."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time

import pytest

from harness import gpu_benchmark, registry

from conftest import REPO_ROOT


@pytest.mark.skipif(bool(registry.available("cuda")), reason="this machine has a usable GPU")
def test_without_a_gpu_it_ends_within_seconds_with_one_line(tmp_path):
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "harness.gpu_benchmark", str(tmp_path / "run")], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and time.perf_counter() - start < 30
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no usable GPU: ") and "nothing was run" in lines[0]
    assert not (tmp_path / "run").exists()


def test_the_first_failing_step_ends_the_run_and_keeps_the_earlier_ones(tmp_path):
    ran = []

    def ok(name):
        return lambda plan: ran.append(name)

    def fails(plan):
        ran.append("suite")
        raise gpu_benchmark.StepFailed("asv exited 2: something broke")

    actions = {name: ok(name) for name in gpu_benchmark.STEPS} | {"suite": fails}
    plan = gpu_benchmark.Plan(tmp_path, "cpu", ["numpy-vectorised"], [], True, None, "m")
    stream = io.StringIO()
    assert gpu_benchmark.run_steps(plan, tmp_path / "a.tar.gz", actions, stream) == 1
    assert ran == ["facts", "check", "suite"]
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("step 1/7 facts: ok in ") and lines[1].startswith("step 2/7 check: ok in ")
    assert lines[2].startswith("step 3/7 suite: FAILED after ") and lines[2].endswith("asv exited 2: something broke")
    recorded = json.loads((tmp_path / "steps.json").read_text())
    assert recorded["failed"] == "suite" and list(recorded["steps"]) == ["facts", "check"]


def test_every_step_runs_on_the_cpu_with_the_smoke_sizes(tmp_path, mnist_path):
    out, archive = tmp_path / "run", tmp_path / "run.tar.gz"
    completed = subprocess.run(
        [sys.executable, "-m", "harness.gpu_benchmark", str(out), "--device", "cpu", "--smoke", "--impl",
         "numpy-vectorised", "torch-vectorised", "--data-dir", str(mnist_path), "--machine", "smoke-machine"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env={"HOME": str(tmp_path), **_environment()})
    assert completed.returncode == 0, completed.stdout + completed.stderr
    steps = [line.split(":")[0] for line in completed.stdout.splitlines() if line.startswith("step ")]
    assert steps == [f"step {n}/7 {name}" for n, name in enumerate(gpu_benchmark.STEPS, start=1)]
    assert (out / "facts.json").is_file() and "numpy-vectorised" in (out / "list.txt").read_text()
    assert "quantities within tolerance" in (out / "logs" / "check.log").read_text()
    assert list((out / "asv" / "smoke-machine").glob("*-*.json")) and list((out / "asv-facts").glob("*/*.json"))
    assert (out / "profile" / "profile.csv").is_file()
    assert sorted(path.name for path in (out / "training").glob("*.json")) == [
        "numpy-vectorised_epoch1.json", "torch-vectorised_epoch1.json"]
    assert (out / "report" / "report.md").is_file()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "run/report/report.md" in names and "run/profile/profile.csv" in names and "run/steps.json" in names
    assert not any("asv-env" in name for name in names)
    assert archive.stat().st_size < gpu_benchmark.ARCHIVE_LIMIT_BYTES


def _environment() -> dict:
    import os

    return {key: value for key, value in os.environ.items() if key != "HOME"}
