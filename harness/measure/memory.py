"""Peak memory of a region of code: GPU memory through NVML (nvidia-ml-py) and host resident memory.

GPU memory is three different numbers, reported apart and never mixed up:

* what **NVML** says the device uses (``peak_bytes``: everything on the GPU, every process, CUDA contexts
  included) and, where NVML can see this process, what this process uses (``process_peak_bytes``).
  Inside containers NVML often lists processes under host PIDs that do not match ``os.getpid()``; then
  the process figure is None with a note saying so, never 0;
* the framework **allocator's** own peaks (:class:`harness.contract.AllocatorPeaks`: bytes in live arrays,
  bytes reserved from the device), which an implementation reports itself;
* the **CUDA context** overhead, measured on its own by the asv suite.

NVML numbers its GPUs by PCI bus, CUDA fastest-first and through ``CUDA_VISIBLE_DEVICES`` (indices or
UUIDs), so an index means different GPUs to the two: the NVML handle is opened by the PCI bus id of the
device the framework computes on (:meth:`harness.contract.Implementation.pci_bus_id`).  NVML peaks come
from a sampling thread, so they can miss a spike shorter than the interval; the interval achieved is
recorded with every result.  Without an NVIDIA driver the sampler reports ``unavailable: <reason>`` and
nothing else breaks.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

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
    ``process_note`` (a string, or a function giving one at the end of the region) says why the
    per-process figure is absent, where it is.
    """

    def __init__(self, read: Callable[[], Reading], interval_s: float = DEFAULT_INTERVAL_S,
                 process_note: str | Callable[[], str] = ""):
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

    def __enter__(self) -> PeakSampler:
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
        note = self._process_note() if callable(self._process_note) else self._process_note
        note = note if self._process_peak is None else ""
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

    def __enter__(self) -> UnavailableSampler:
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


def nvml_pci_bus_id(pci_bus_id: str) -> str:
    """A PCI bus id in NVML's form, 'DDDDDDDD:BB:DD.F' (CUDA and torch write the domain with 4 digits)."""
    domain, rest = pci_bus_id.strip().split(":", 1)
    return f"{int(domain, 16):08X}:{rest.upper()}"


def _device_handle(nvml, pci_bus_id: str | None):
    """NVML's handle of the GPU with this PCI bus id; without one (no framework has chosen a device yet),
    the first GPU of CUDA_VISIBLE_DEVICES when that names a UUID, else NVML's GPU 0."""
    if pci_bus_id:
        return nvml.nvmlDeviceGetHandleByPciBusId(nvml_pci_bus_id(pci_bus_id))
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if first.startswith(("GPU-", "MIG-")):
        return nvml.nvmlDeviceGetHandleByUUID(first)
    return nvml.nvmlDeviceGetHandleByIndex(0)


def nvml_device_facts(pci_bus_id: str | None = None) -> dict:
    """Name, total memory, driver and CUDA driver version of one GPU, or why they cannot be read."""
    nvml = _nvml()
    if isinstance(nvml, str):
        return {"available": False, "reason": nvml}
    try:
        handle = _device_handle(nvml, pci_bus_id)
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        return {
            "available": True,
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            "driver": _text(nvml.nvmlSystemGetDriverVersion()),
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}",
            "device_count": int(nvml.nvmlDeviceGetCount()),
            "pci_bus_id": _text(nvml.nvmlDeviceGetPciInfo(handle).busId),
        }
    except Exception as error:
        return {"available": False, "reason": f"NVML query failed: {type(error).__name__}: {error}"}


class NvmlReader:
    """A reading of the device's used memory and, where NVML lists ``pid`` with a known figure, that
    process's own (``usedGpuMemory`` is None where the driver cannot tell, e.g. under some containers).

    Where NVML refuses to list the device's processes (NotSupported or NoPermission: containers, MIG,
    vGPU), the per-process figure is unknown, :attr:`process_problem` says why, and the device-wide
    figure still stands: the process list is not asked again."""

    def __init__(self, nvml, pci_bus_id: str | None, pid: int) -> None:
        self.nvml, self.pid = nvml, pid
        self.handle = _device_handle(nvml, pci_bus_id)
        self.process_problem: str | None = None

    def process_bytes(self) -> int | None:
        if self.process_problem is not None:
            return None
        try:
            entries = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception as error:  # NVMLError_NotSupported, NVMLError_NoPermission, ...
            self.process_problem = (f"NVML cannot list this GPU's processes ({type(error).__name__}: {error}; "
                                    "usual in containers, MIG and vGPU): only the device-wide figure is available")
            return None
        process = None
        for entry in entries:
            if entry.pid == self.pid and entry.usedGpuMemory is not None:
                process = int(entry.usedGpuMemory)
        return process

    def process_note(self) -> str:
        """Why the per-process figure is absent: NVML's refusal, else the PID not being listed."""
        return self.process_problem or PROCESS_NOT_VISIBLE

    def __call__(self) -> Reading:
        return Reading(int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used), self.process_bytes())


def nvml_reader(nvml, pci_bus_id: str | None, pid: int) -> NvmlReader:
    """The :class:`NvmlReader` of the GPU with this PCI bus id, for process ``pid``."""
    return NvmlReader(nvml, pci_bus_id, pid)


PROCESS_NOT_VISIBLE = (
    "NVML lists no process with this PID (inside a container NVML reports host PIDs): "
    "only the device-wide figure is available"
)


def nvml_sampler(pci_bus_id: str | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S) -> PeakSampler | UnavailableSampler:
    """Peak GPU memory of the device with this PCI bus id over a region, through NVML; an
    :class:`UnavailableSampler` where NVML cannot run."""
    nvml = _nvml()
    if isinstance(nvml, str):
        return UnavailableSampler(f"unavailable: {nvml}", interval_s)
    try:
        read = nvml_reader(nvml, pci_bus_id, os.getpid())
    except Exception as error:
        return UnavailableSampler(f"unavailable: NVML cannot find the GPU ({error})", interval_s)
    return PeakSampler(read, interval_s, process_note=read.process_note)


def nvml_used_bytes(pci_bus_id: str | None = None) -> int | None:
    """Device memory in use now, by every process (None without NVML)."""
    nvml = _nvml()
    if isinstance(nvml, str):
        return None
    return int(nvml.nvmlDeviceGetMemoryInfo(_device_handle(nvml, pci_bus_id)).used)

