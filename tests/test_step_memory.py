"""GPU step memory measured by one rule for every framework, each implementation in a process of its own:
the rule's order of calls, the per-point failures, and the fresh process, checked on the CPU with a stand-in
GPU implementation and a scripted NVML sampler."""

from __future__ import annotations

import gc
import os
import signal
import time
import weakref

import pytest

from harness import registry
from harness.contract import AllocatorPeaks
from harness.measure import step_memory
from harness.measure.memory import PeakMemory
from harness.spec import SMALL
from implementations.numpy.capsnet import NumpyCapsNet

CALLS: list[str] = []
BUILT: list[weakref.ref] = []


class GpuStandIn(NumpyCapsNet):
    """A 'GPU' implementation that runs on NumPy and logs the memory calls made to it."""

    framework = "stand-in"

    def __init__(self, *args, **kwargs):
        gc.collect()  # anything unreachable is gone now: what is still alive is held
        CALLS.append(f"build ({sum(ref() is not None for ref in BUILT)} earlier alive)")
        super().__init__(*args, **kwargs)
        self.cycle = self  # torch models sit in a reference cycle (module.route)
        BUILT.append(weakref.ref(self))

    def release_cached_memory(self):
        CALLS.append("release")

    def reset_peak_memory(self):
        CALLS.append("reset")

    def allocator_peaks(self):
        CALLS.append("peaks")
        return AllocatorPeaks(live=100, reserved=150)

    def pci_bus_id(self):
        return "0000:3b:00.0"

    def train_step(self, batch):
        CALLS.append(f"step {len(batch.labels)}")
        if len(batch.labels) > 8:
            raise MemoryError("out of memory")
        return super().train_step(batch)


class ScriptedSampler:
    """NVML's sampler as a context manager that logs when it starts and stops."""

    def __init__(self, pci_bus_id, interval_s):
        CALLS.append(f"nvml {pci_bus_id}")
        self.result = None

    def __enter__(self):
        CALLS.append("enter")
        return self

    def __exit__(self, *exc):
        CALLS.append("exit")
        self.result = PeakMemory(True, peak_bytes=900, baseline_bytes=600, samples=3, duration_s=0.01)


def test_every_point_follows_one_rule_and_a_failing_point_is_skipped(monkeypatch):
    monkeypatch.setattr(step_memory, "nvml_sampler", ScriptedSampler)
    CALLS.clear()
    with registry.registered("gpu-stand-in", GpuStandIn, device="cuda"):
        results = step_memory.measure_points("gpu-stand-in", SMALL, "float32", [(2, 3), (16, 3), (4, 1)])
    assert CALLS[:8] == ["build (0 earlier alive)", "step 2",  # warm-up
                         "release", "reset", "nvml 0000:3b:00.0", "enter", "step 2", "exit"]
    assert CALLS[8:10] == ["peaks", "build (0 earlier alive)"]  # the previous model is gone before the next
    assert CALLS.count("build (0 earlier alive)") == 3
    assert results[(2, 3)] == {"nvml": results[(2, 3)]["nvml"], "allocator_live": 100, "allocator_reserved": 150}
    assert results[(2, 3)]["nvml"]["increase_bytes"] == 300
    assert results[(16, 3)] == "gpu-stand-in runs out of memory at batch 16: MemoryError: out of memory"
    assert isinstance(results[(4, 1)], dict)  # the point after the failure is still measured


def test_each_gpu_implementation_is_measured_in_a_process_of_its_own(monkeypatch):
    launched = []
    monkeypatch.setattr(step_memory, "nvml_status", lambda: None)
    monkeypatch.setattr(step_memory, "in_fresh_process",
                        lambda function, name, *args, **options: launched.append(name) or {(2, 3): "measured"})
    with registry.registered("gpu-stand-in", GpuStandIn, device="cuda"), \
            registry.registered("gpu-stand-in-2", GpuStandIn, device="cuda"):
        grid = step_memory.measure_grid(["numpy-vectorised", "gpu-stand-in", "gpu-stand-in-2"], SMALL, "float32",
                                        [(2, 3)])
    assert launched == ["gpu-stand-in", "gpu-stand-in-2"]
    assert grid[("numpy-vectorised", 2, 3)] == "numpy-vectorised runs on the CPU: no GPU memory to measure"
    assert grid[("gpu-stand-in", 2, 3)] == "measured"


def test_without_nvml_every_gpu_point_says_why(monkeypatch):
    monkeypatch.setattr(step_memory, "nvml_status", lambda: "NVML cannot start: no driver")
    with registry.registered("gpu-stand-in", GpuStandIn, device="cuda"):
        grid = step_memory.measure_grid(["gpu-stand-in"], SMALL, "float32", [(2, 3), (4, 3)])
    assert set(grid.values()) == {"NVML unavailable: NVML cannot start: no driver"}


def test_a_fresh_process_is_another_process():
    assert step_memory.in_fresh_process(os.getpid) != os.getpid()


@pytest.mark.parametrize("function, args, expected", [
    (os._exit, (3,), "died (exit status 3)"), (signal.raise_signal, (signal.SIGKILL,), "died (killed by SIGKILL)")])
def test_a_worker_that_dies_is_a_failure_within_seconds(function, args, expected):
    start = time.perf_counter()
    with pytest.raises(step_memory.WorkerDied, match=expected.replace("(", r"\(").replace(")", r"\)")):
        step_memory.in_fresh_process(function, *args, timeout_s=60)
    assert time.perf_counter() - start < 30


def test_a_worker_that_hangs_is_killed_at_its_timeout():
    with pytest.raises(step_memory.WorkerDied, match="no answer within 0.5 s"):
        step_memory.in_fresh_process(time.sleep, 60, timeout_s=0.5)


def test_an_error_in_the_worker_comes_back_as_one_line():
    with pytest.raises(RuntimeError, match="ValueError: invalid literal"):
        step_memory.in_fresh_process(int, "x")


def test_a_dead_worker_fails_every_point_of_its_implementation(monkeypatch):
    monkeypatch.setattr(step_memory, "nvml_status", lambda: None)

    def dies(*args, **kwargs):
        raise step_memory.WorkerDied("the measuring process died (killed by SIGKILL) before it answered")

    monkeypatch.setattr(step_memory, "in_fresh_process", dies)
    with registry.registered("gpu-stand-in", GpuStandIn, device="cuda"):
        grid = step_memory.measure_grid(["gpu-stand-in"], SMALL, "float32", [(2, 3), (4, 3)])
    assert set(grid.values()) == {"gpu-stand-in failed: WorkerDied: the measuring process died (killed by SIGKILL) "
                                  "before it answered"}


@pytest.mark.parametrize("error, expected", [(MemoryError(), True), (RuntimeError("CUDA out of memory."), True),
                                             (type("OutOfMemoryError", (Exception,), {})(), True),
                                             (ValueError("shapes do not match"), False)])
def test_out_of_memory_is_recognised(error, expected):
    assert step_memory.is_out_of_memory(error) is expected
