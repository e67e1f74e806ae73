"""Peak memory of a region of code: GPU memory through NVML (nvidia-ml-py) and host resident memory.

GPU memory is three different numbers, reported apart and never mixed up:

* what **NVML** says the device uses (``device_peak_bytes``, everything on the GPU, every process) and, where
  NVML can see this process, what this process uses (``process_peak_bytes``).  Inside containers NVML
  often lists processes under host PIDs that do not match ``os.getpid()``; then the process figure is
  None with a note saying so, never 0;
* the framework **allocator's** own peak (``torch.cuda.max_memory_allocated``, CuPy's memory pool), which
  an implementation reports itself (:meth:`harness.registry.Implementation.allocator_peak_bytes`);
* the **CUDA context** overhead, measured once per process by the asv suite.

NVML peaks come from a sampling thread, so they can miss a spike shorter than the interval; the interval is
recorded with every result.  Without an NVIDIA driver the sampler reports ``unavailable: <reason>`` and
nothing else breaks.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

DEFAULT_INTERVAL_S = 0.001
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Reading:
    """One sample: total bytes in use, and this process's own bytes where visible (else None)."""

    total_bytes: int
    process_bytes: int | None = None


@dataclass(frozen=True)
class PeakMemory:
    """Result of sampling a region.  ``available`` False means the figures are absent, see ``reason``."""

    available: bool
    reason: str = ""
    peak_bytes: int | None = None
    baseline_bytes: int | None = None
    process_peak_bytes: int | None = None
    process_note: str = ""
    interval_s: float = DEFAULT_INTERVAL_S
    samples: int = 0
    duration_s: float | None = None

    @property
    def achieved_interval_s(self) -> float | None:
        """The region's duration divided by the samples taken in it: the interval actually achieved."""
        if self.duration_s is None or self.samples < 2:
            return None
        return self.duration_s / (self.samples - 1)

    @property
    def increase_bytes(self) -> int | None:
        """Peak minus the reading at the start of the region."""
        if self.peak_bytes is None or self.baseline_bytes is None:
            return None
        return self.peak_bytes - self.baseline_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "increase_bytes": self.increase_bytes, "achieved_interval_s": self.achieved_interval_s}


class PeakSampler:
    """Context manager (or decorator) that samples ``read()`` in a thread and keeps the peaks.

    ``read`` returns a :class:`Reading`; it is called once on entry (the baseline), every ``interval_s``
    while the region runs, and once on exit, so even a region shorter than the interval has two samples.
    """

    def __init__(self, read: Callable[[], Reading], interval_s: float = DEFAULT_INTERVAL_S, process_note: str = ""):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._read = read
        self.interval_s = interval_s
        self._process_note = process_note
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0
        self._process_peak: int | None = None
        self._baseline: int | None = None
        self._samples = 0
        self._error: BaseException | None = None
        self.result: PeakMemory | None = None

    def _take(self) -> None:
        reading = self._read()
        self._samples += 1
        self._peak = max(self._peak, reading.total_bytes)
        if reading.process_bytes is not None:
            self._process_peak = max(self._process_peak or 0, reading.process_bytes)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._take()
        except BaseException as error:  # surfaced in __exit__
            self._error = error

    def __enter__(self) -> "PeakSampler":
        self._stop.clear()  # a sampler can measure one region after another
        self._error = None
        self._start = time.perf_counter()
        first = self._read()
        self._baseline = first.total_bytes
        self._peak = first.total_bytes
        self._process_peak = first.process_bytes
        self._samples = 1
        self._thread = threading.Thread(target=self._run, name="capsbench-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"memory sampling failed: {self._error}") from self._error
        self._take()
        note = self._process_note if self._process_peak is None else ""
        self.result = PeakMemory(
            True,
            peak_bytes=self._peak,
            baseline_bytes=self._baseline,
            process_peak_bytes=self._process_peak,
            process_note=note,
            interval_s=self.interval_s,
            samples=self._samples,
            duration_s=time.perf_counter() - self._start,
        )

    def __call__(self, function):
        def wrapped(*args, **kwargs):
            with self:
                return function(*args, **kwargs)

        return wrapped


class UnavailableSampler:
    """Stands in for a sampler that cannot run here; its result says why."""

    def __init__(self, reason: str, interval_s: float = DEFAULT_INTERVAL_S):
        self.result = PeakMemory(False, reason=reason, interval_s=interval_s)

    def __enter__(self) -> "UnavailableSampler":
        return self

    def __exit__(self, *exc) -> None:
        return None


# Host memory ----------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; ru_maxrss elsewhere, a lifetime peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def host_sampler(interval_s: float = DEFAULT_INTERVAL_S) -> PeakSampler:
    """Peak resident memory of this process over a region."""

    def read() -> Reading:
        rss = current_rss_bytes()
        return Reading(rss, rss)

    return PeakSampler(read, interval_s)


# NVML ---------------------------------------------------------------------------------------------


def _nvml():
    """The initialised pynvml module, or a string saying why it cannot be used."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return f"NVML cannot start: {type(error).__name__}: {error} (no NVIDIA driver on this machine?)"
    return pynvml


def nvml_status() -> str | None:
    """None where NVML works, else the reason it does not."""
    nvml = _nvml()
    return nvml if isinstance(nvml, str) else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _device_handle(nvml, index: int | None):
    """NVML's handle of GPU ``index``; by default the first GPU in CUDA_VISIBLE_DEVICES (NVML ignores that
    variable and numbers every GPU of the machine), given as an index or a GPU-/MIG- UUID, else GPU 0."""
    if index is None:
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if first.startswith(("GPU-", "MIG-")):
            return nvml.nvmlDeviceGetHandleByUUID(first)
        index = int(first) if first.isdigit() else 0
    return nvml.nvmlDeviceGetHandleByIndex(index)


def nvml_device_facts(index: int | None = None) -> dict:
    """Name, total memory, driver and CUDA driver version of one GPU, or why they cannot be read."""
    nvml = _nvml()
    if isinstance(nvml, str):
        return {"available": False, "reason": nvml}
    try:
        handle = _device_handle(nvml, index)
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        return {
            "available": True,
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            "driver": _text(nvml.nvmlSystemGetDriverVersion()),
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}",
            "device_count": int(nvml.nvmlDeviceGetCount()),
        }
    except Exception as error:
        return {"available": False, "reason": f"NVML query failed: {type(error).__name__}: {error}"}


def _nvml_reader(nvml, index: int | None, pid: int) -> Callable[[], Reading]:
    handle = _device_handle(nvml, index)

    def read() -> Reading:
        used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        process = None
        for entry in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if entry.pid == pid and entry.usedGpuMemory is not None:
                process = int(entry.usedGpuMemory)
        return Reading(used, process)

    return read


PROCESS_NOT_VISIBLE = (
    "NVML lists no process with this PID (inside a container NVML reports host PIDs): "
    "only the device-wide figure is available"
)


def nvml_sampler(index: int | None = None, interval_s: float = DEFAULT_INTERVAL_S) -> PeakSampler | UnavailableSampler:
    """Peak GPU memory over a region through NVML; an :class:`UnavailableSampler` where NVML cannot run."""
    nvml = _nvml()
    if isinstance(nvml, str):
        return UnavailableSampler(f"unavailable: {nvml}", interval_s)
    try:
        read = _nvml_reader(nvml, index, os.getpid())
    except Exception as error:
        return UnavailableSampler(f"unavailable: NVML cannot find the GPU ({error})", interval_s)
    return PeakSampler(read, interval_s, process_note=PROCESS_NOT_VISIBLE)


def nvml_used_bytes(index: int | None = None) -> int | None:
    """Device memory in use now, by every process (None without NVML)."""
    nvml = _nvml()
    if isinstance(nvml, str):
        return None
    return int(nvml.nvmlDeviceGetMemoryInfo(_device_handle(nvml, index)).used)

