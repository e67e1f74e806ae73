"""The memory sampler: peak logic with a scripted reader, host RSS for real, NVML unavailability."""

import threading
import time
import types

import numpy as np
import pytest

from harness.measure import memory
from harness.measure.memory import PeakSampler, Reading


class ScriptedReader:
    """Returns the scripted readings in order (the last one repeats), counting calls."""

    def __init__(self, readings):
        self.readings = list(readings)
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            reading = self.readings[min(self.calls, len(self.readings) - 1)]
            self.calls += 1
            return reading


def test_peak_baseline_and_process_figure():
    reader = ScriptedReader([Reading(100, 10), Reading(400, 40), Reading(250, 25), Reading(120, 12)])
    sampler = PeakSampler(reader, interval_s=0.0005)
    with sampler:
        while reader.calls < 4:
            pass
    result = sampler.result
    assert result.available and result.baseline_bytes == 100
    assert result.peak_bytes == 400 and result.process_peak_bytes == 40
    assert result.increase_bytes == 300
    assert result.samples == reader.calls >= 5  # entry, thread samples, exit
    assert result.interval_s == 0.0005
    assert result.duration_s > 0 and result.achieved_interval_s == result.duration_s / (result.samples - 1)


def test_a_region_shorter_than_the_interval_still_has_entry_and_exit_samples():
    reader = ScriptedReader([Reading(5), Reading(9)])
    with PeakSampler(reader, interval_s=10.0) as sampler:
        pass
    assert sampler.result.samples == 2 and sampler.result.peak_bytes == 9


def test_invisible_process_is_said_not_reported_as_zero():
    reader = ScriptedReader([Reading(100, None), Reading(300, None)])
    with PeakSampler(reader, interval_s=0.001, process_note=memory.PROCESS_NOT_VISIBLE) as sampler:
        pass
    assert sampler.result.process_peak_bytes is None
    assert "host PIDs" in sampler.result.process_note


def test_a_failing_reader_is_reported():
    calls = {"n": 0}

    def read():
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("device lost")
        return Reading(1)

    with pytest.raises(RuntimeError, match="memory sampling failed: device lost"):
        with PeakSampler(read, interval_s=0.0005) as sampler:
            sampler._thread.join(timeout=5)  # the thread ends at its first failed read


def test_sampler_works_as_a_decorator_and_again():
    reader = ScriptedReader([Reading(1), Reading(7)])
    sampler = PeakSampler(reader, interval_s=10.0)
    assert sampler(lambda x: x * 2)(21) == 42
    assert sampler.result.peak_bytes == 7
    busy = PeakSampler(ScriptedReader([Reading(3)]), interval_s=0.0005)
    for _ in range(2):  # the second region is sampled as often as the first
        with busy:
            memory_wait = threading.Event()
            memory_wait.wait(0.02)
        assert busy.result.samples > 5


def test_invalid_interval():
    with pytest.raises(ValueError, match="interval_s must be positive"):
        PeakSampler(lambda: Reading(0), interval_s=0)


def test_host_sampler_sees_a_large_allocation():
    with memory.host_sampler(interval_s=0.001) as sampler:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block += 1
    assert sampler.result.increase_bytes >= 60 * 2**20
    del block


def test_nvml_without_a_driver_says_unavailable():
    if memory.nvml_status() is None:
        pytest.skip("NVML works on this machine")
    with memory.nvml_sampler() as sampler:
        pass
    assert not sampler.result.available
    assert sampler.result.reason.startswith("unavailable: ")
    assert sampler.result.peak_bytes is None
    facts = memory.nvml_device_facts()
    assert facts["available"] is False and facts["reason"]
    assert memory.nvml_used_bytes() is None


def test_nvml_on_a_gpu_machine():
    if memory.nvml_status() is not None:
        pytest.skip(f"no NVML here: {memory.nvml_status()}")
    facts = memory.nvml_device_facts()
    assert facts["available"] and facts["memory_total_bytes"] > 0
    with memory.nvml_sampler() as sampler:
        pass
    assert sampler.result.available and sampler.result.peak_bytes > 0


class FakeNvml:
    """pynvml's calls the harness makes, on two GPUs of a machine, with scripted memory readings: GPU
    '00000000:3B:00.0' has 8 GiB used and 32 GiB free, the other 1 GiB used; its process list holds
    another process and this one (whose figure can be unknown: None)."""

    BUS = {"00000000:3B:00.0": "gpu-b", "00000000:1A:00.0": "gpu-a"}

    def __init__(self, own_pid: int, own_bytes: int | None = 3 * 2**30):
        self.own_pid, self.own_bytes, self.opened = own_pid, own_bytes, []

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        self.opened.append(("pci", bus_id))
        return self.BUS[bus_id]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.opened.append(("uuid", uuid))
        return "gpu-uuid"

    def nvmlDeviceGetHandleByIndex(self, index):
        self.opened.append(("index", index))
        return "gpu-a"

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = {"gpu-b": 8 * 2**30}.get(handle, 2**30)
        return types.SimpleNamespace(used=used, free=40 * 2**30 - used, total=40 * 2**30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [types.SimpleNamespace(pid=self.own_pid + 1, usedGpuMemory=5 * 2**30),
                types.SimpleNamespace(pid=self.own_pid, usedGpuMemory=self.own_bytes)]


def test_nvml_opens_the_gpu_the_framework_uses_by_its_pci_bus_id():
    """CUDA and NVML number GPUs differently: the handle comes from the framework's PCI bus id (in NVML's
    8-digit-domain form), never from an index."""
    nvml = FakeNvml(own_pid=100)
    assert memory.nvml_pci_bus_id("0000:3b:00.0") == "00000000:3B:00.0"
    read = memory.nvml_reader(nvml, "0000:3b:00.0", pid=100)
    assert nvml.opened == [("pci", "00000000:3B:00.0")]
    assert read() == Reading(8 * 2**30, 3 * 2**30)  # the used memory (not the free), and this PID's own


def test_nvml_process_figure_is_none_when_unknown_or_not_listed():
    unknown = FakeNvml(own_pid=100, own_bytes=None)
    assert memory.nvml_reader(unknown, "0000:3B:00.0", pid=100)() == Reading(8 * 2**30, None)
    assert memory.nvml_reader(FakeNvml(own_pid=100), "0000:3B:00.0", pid=7)() == Reading(8 * 2**30, None)


class RefusingNvml(FakeNvml):
    """A GPU whose process list NVML refuses (NotSupported in containers, MIG and vGPU)."""

    def __init__(self):
        super().__init__(own_pid=100)
        self.process_queries = 0

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self.process_queries += 1
        raise type("NVMLError_NotSupported", (Exception,), {})("Not Supported")


def test_a_refused_process_list_makes_the_process_figure_unknown_and_keeps_the_device_figure():
    nvml = RefusingNvml()
    read = memory.nvml_reader(nvml, "0000:3B:00.0", pid=100)
    with PeakSampler(read, interval_s=0.001, process_note=read.process_note) as sampler:
        time.sleep(0.01)
    result = sampler.result
    assert result.available and result.peak_bytes == 8 * 2**30 and result.process_peak_bytes is None
    assert "NVMLError_NotSupported: Not Supported" in result.process_note
    assert "device-wide figure" in result.process_note
    assert nvml.process_queries == 1  # refused once, not asked again at every sample


def test_an_unlisted_pid_keeps_the_container_note():
    read = memory.nvml_reader(FakeNvml(own_pid=100), "0000:3B:00.0", pid=7)
    read()
    assert read.process_note() == memory.PROCESS_NOT_VISIBLE


@pytest.mark.parametrize("visible, expected", [
    (None, ("index", 0)), ("3,1", ("index", 0)), ("GPU-8f2a-11", ("uuid", "GPU-8f2a-11")), ("", ("index", 0)),
])
def test_without_a_framework_device_nvml_falls_back_to_a_uuid_or_its_first_gpu(monkeypatch, visible, expected):
    """An index in CUDA_VISIBLE_DEVICES is CUDA's numbering, not NVML's: it is not used."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    nvml = FakeNvml(own_pid=1)
    memory._device_handle(nvml, None)
    assert nvml.opened == [expected]
