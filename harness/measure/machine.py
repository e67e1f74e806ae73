"""Facts about the machine and libraries that a result needs beside it to be interpreted.

asv records the CPU, OS and Python; this adds what it does not: thread counts, BLAS, library versions,
and the GPU, driver and CUDA version where there is one.  Every fact is best effort and never raises.
"""

from __future__ import annotations

import importlib
import os
import platform
import socket
from importlib import metadata

from harness.threads import THREAD_ENV_VARIABLES

LIBRARIES = ("numpy", "torch", "cupy", "nvidia-ml-py", "pandas", "matplotlib", "asv")
_CUPY_DISTRIBUTIONS = ("cupy", "cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x")


def library_versions() -> dict[str, str | None]:
    """Installed version of each library the harness can use (None where absent)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        candidates = _CUPY_DISTRIBUTIONS if name == "cupy" else (name,)
        versions[name] = None
        for distribution in candidates:
            try:
                versions[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numpy_blas() -> str:
    try:
        import numpy

        config = numpy.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception as error:  # numpy < 1.25 or an unusual build
        return f"unknown ({type(error).__name__})"


def torch_facts() -> dict:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return {}
    facts = {
        "torch_threads": torch.get_num_threads(),
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        facts["cuda_device"] = torch.cuda.get_device_name(0)
        facts["cudnn"] = torch.backends.cudnn.version()
    return facts


def gpu_facts() -> dict:
    """GPU name, memory and driver through NVML, or the reason NVML could not be read."""
    from harness.measure.memory import nvml_device_facts

    return nvml_device_facts()


def machine_facts() -> dict:
    """Everything above in one flat-ish dict, for results files."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy_blas": numpy_blas(),
        "thread_env": {key: os.environ[key] for key in THREAD_ENV_VARIABLES if key in os.environ},
        **torch_facts(),
        "gpu": gpu_facts(),
        "versions": library_versions(),
        "hardware_peak": hardware_peak_facts(),
    }


def hardware_peak_facts() -> dict:
    """The CPU's float32 peak and its derivation (:func:`harness.measure.peak.machine_hardware_peak`), never raising."""
    from harness.measure.peak import machine_hardware_peak

    try:
        return machine_hardware_peak()
    except Exception as error:  # an unusual /proc/cpuinfo
        return {"gflops": None, "note": f"unknown: {type(error).__name__}: {error}"}
