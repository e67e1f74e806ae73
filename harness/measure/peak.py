"""The float32 peaks of this machine: the hardware's, derived from what the CPU reports (cores x lanes x FMA
units x 2 x clock) and checked against a measured FMA microbenchmark (:mod:`harness.measure.fma_peak`), the one
figure every "% of peak" on the CPU divides by; and a large GEMM through each framework's own BLAS with the
threads the benchmarks use, the practical ceiling shown beside it (and divided by where the hardware peak
is unknown, and on a GPU).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

BACKENDS = ("numpy", "torch", "torch-cuda", "cupy")
GPU_BACKENDS = ("torch-cuda", "cupy")
CPU_SIZE, GPU_SIZE = 4096, 8192
REPEATS = 3


def backend_of(framework: str, device: str) -> str:
    """The GEMM backend that an implementation of ``framework`` on ``device`` uses."""
    if framework in ("torch", "jax"):  # JAX: the machine's peak as torch measures it (no JAX GEMM backend here)
        return "torch-cuda" if device == "cuda" else "torch"
    return framework


def _best_seconds(run, synchronize, repeats: int) -> float:
    run()
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_peak_gflops(backend: str, size: int | None = None, repeats: int = REPEATS) -> float:
    """Best GFLOP/s of an n x n x n float32 matrix product (2 n^3 FLOPs) after one warm-up product."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown GEMM backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    n = size or (GPU_SIZE if backend in ("torch-cuda", "cupy") else CPU_SIZE)
    if backend == "numpy":
        import numpy as np

        rng = np.random.default_rng(0)
        a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
        seconds = _best_seconds(lambda: a @ b, lambda: None, repeats)
    elif backend in ("torch", "torch-cuda"):
        import torch

        device = "cuda" if backend == "torch-cuda" else "cpu"
        a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        seconds = _best_seconds(lambda: a @ b, sync, repeats)
    else:
        import cupy

        a, b = cupy.random.random((n, n), dtype=cupy.float32), cupy.random.random((n, n), dtype=cupy.float32)
        seconds = _best_seconds(lambda: a @ b, cupy.cuda.get_current_stream().synchronize, repeats)
    return 2 * n**3 / seconds / 1e9


# The hardware's float32 peak ----------------------------------------------------------------------------------

FLOAT32_LANES = (("avx512f", 16), ("avx", 8), ("sse", 4))  # float32 values per vector register
TURBO_MARGIN = 1.10  # a measured clock this much above the reported one is the clock the cores run at


def _cpuinfo_fields(cpuinfo: str) -> list[dict[str, str]]:
    processors, current = [], {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if current:
                processors.append(current)
            current = {}
            continue
        key, _, value = line.partition(":")
        current[key.strip()] = value.strip()
    if current:
        processors.append(current)
    return processors


def fma_units(vendor: str, family: int | None, flags: set[str], model_name: str) -> tuple[int | None, str]:
    """Full-width float32 FMA operations a core issues per cycle, and why that number (common cases only)."""
    if "fma" not in flags:
        return None, "no fma flag: FMA units per core unknown"
    if vendor == "AuthenticAMD":
        if family == 25 and "avx512f" in flags:
            return 1, "Zen 4 executes AVX-512 as 2 x 256-bit: one 512-bit FMA per cycle"
        if family is not None and family >= 26:
            return 2, "Zen 5: two 512-bit FMA pipes (assumed; the mobile parts have 256-bit ones)"
        if family == 23 and "Ryzen" not in model_name and "EPYC 7" not in model_name:
            return 1, "Zen 1: 256-bit FMA as 2 x 128-bit (assumed)"
        return 2, "Zen 2/3: two 256-bit FMA pipes"
    if "avx512f" in flags:
        if any(word in model_name for word in ("Silver", "Bronze")):
            return 1, "Xeon Silver/Bronze: one 512-bit FMA unit"
        return 2, "Intel AVX-512 server core: two 512-bit FMA units (assumed: the CPU does not report it)"
    return 2, "two 256-bit FMA units (Haswell and later)"


def hardware_peak(cpuinfo: str, max_mhz: float | None = None, cores: int | None = None,
                  fma_gflops: float | None = None, fma_note: str = "",
                  fma_core_gflops: float | None = None) -> dict:
    """The float32 peak cores x lanes x FMA units x 2 x clock from /proc/cpuinfo text, with its inputs.

    ``cores``: physical cores (default: distinct (physical id, core id) pairs of the text, else its
    processors); ``max_mhz``: lscpu's "CPU max MHz" where known, else cpuinfo's "cpu MHz" (a VM's nominal
    clock; turbo not counted).  ``fma_gflops``: the measured FMA microbenchmark (:mod:`harness.measure.fma_peak`),
    the check on the derived figure; where the FMA units are only assumed it decides their count (the
    nearer of 1 and 2; from ``fma_core_gflops``, one core's figure, where measured: another process on a
    core lowers it less); where one core's figure implies a clock above the reported one by more than
    ``TURBO_MARGIN`` (a VM's nominal clock, cores in turbo), that measured clock replaces it; and where the clock is
    unknown the measured figure is the peak.  ``gflops`` is None, with the reason in
    ``note``, where an input is unknown and nothing was measured."""
    processors = _cpuinfo_fields(cpuinfo)
    first = processors[0] if processors else {}
    flags = set(first.get("flags", "").split())
    vendor, model_name = first.get("vendor_id", ""), first.get("model name", "")
    family = int(first["cpu family"]) if first.get("cpu family", "").isdigit() else None
    if cores is None:
        pairs = {(p.get("physical id"), p.get("core id")) for p in processors if "core id" in p}
        cores = len(pairs) or len(processors) or None
    lanes = next((count for flag, count in FLOAT32_LANES if flag in flags), None)
    units, why = fma_units(vendor, family, flags, model_name)
    if max_mhz:
        clock_ghz, clock_source = max_mhz / 1000, "lscpu CPU max MHz"
    elif first.get("cpu MHz"):
        clock_ghz, clock_source = float(first["cpu MHz"]) / 1000, "/proc/cpuinfo cpu MHz (nominal, no turbo)"
    else:
        clock_ghz, clock_source = None, "clock unknown"
    units_source = "assumed" if units is None or "assumed" in why else "reported by the CPU family"
    if fma_gflops and None not in (cores, lanes, clock_ghz) and units_source == "assumed":
        ratio = (fma_core_gflops * cores if fma_core_gflops else fma_gflops) / (cores * lanes * 2 * clock_ghz)
        units, units_source = (1 if ratio < 1.5 else 2), "measured"
        why = (f"FMA units from the FMA microbenchmark: {ratio:.2f} full-width FMAs per cycle per core (the CPU "
               f"does not report them)")
    known = None not in (cores, lanes, units, clock_ghz)
    gflops = cores * lanes * units * 2 * clock_ghz if known else None
    if not known:
        missing = [name for name, value in (("FMA units", units), ("clock", clock_ghz), ("vector lanes", lanes),
                                            ("cores", cores)) if value is None]
        why = f"unknown {', '.join(missing)}" + (f" ({why})" if units is None else "")
        if fma_gflops:
            gflops, units_source = fma_gflops, "measured"
            why += f": the FMA microbenchmark's {fma_gflops:.0f} GFLOP/s is the peak"
    elif fma_gflops:
        core_clock = (fma_core_gflops or fma_gflops / cores) / (lanes * units * 2)
        if core_clock > TURBO_MARGIN * clock_ghz:  # a peak the hardware beats is not its peak
            clock_source = (f"measured: one core's FMA microbenchmark / (lanes x FMA units x 2); {clock_source} says "
                            f"{clock_ghz:.2f} GHz, below what the cores run at (turbo)")
            clock_ghz = core_clock
            gflops = cores * lanes * units * 2 * clock_ghz
        why += f"; FMA microbenchmark {fma_gflops:.0f} GFLOP/s = {100 * fma_gflops / gflops:.0f} % of it"
    return {"gflops": gflops,
            "formula": "cores x float32 lanes x FMA units x 2 x GHz", "cores": cores, "lanes": lanes,
            "fma_units": units, "fma_units_source": units_source, "clock_ghz": clock_ghz,
            "clock_source": clock_source, "cpu": model_name, "fma_measured_gflops": fma_gflops,
            "fma_measured_core_gflops": fma_core_gflops, "fma_measured_note": fma_note, "note": why}


def machine_hardware_peak() -> dict:
    """:func:`hardware_peak` of this machine (/proc/cpuinfo, lscpu's max MHz, the usable cores)."""
    import subprocess

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            cpuinfo = stream.read()
    except OSError as error:
        return {"gflops": None, "note": f"unknown: /proc/cpuinfo unreadable ({error})"}
    max_mhz = None
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("CPU max MHz:"):
                max_mhz = float(line.split(":", 1)[1])
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    derived = hardware_peak(cpuinfo, max_mhz)
    if not (derived.get("lanes") and derived.get("cores")):
        return derived
    from harness.measure.fma_peak import machine_fma_gflops

    measured = machine_fma_gflops(derived["lanes"], derived["cores"], f"{derived['cpu']} @ {derived['clock_ghz']} GHz")
    return hardware_peak(cpuinfo, max_mhz, fma_gflops=measured["gflops"], fma_note=measured["note"],
                         fma_core_gflops=measured.get("core_gflops"))


def one_peak(device: str, hardware: dict, gemms: dict[str, float]) -> float | None:
    """The figure every "% of peak" of ``device`` divides by, the same for every implementation: on the CPU the
    hardware float32 peak where it is known, else the best CPU GEMM measured; on a GPU the best GPU GEMM."""
    if device == "cpu" and hardware.get("gflops"):
        return hardware["gflops"]
    on_device = [value for backend, value in gemms.items() if (backend in GPU_BACKENDS) == (device != "cpu")]
    return max(on_device) if on_device else None


def peak_sentence(hardware: dict | None, gemms: dict[str, float]) -> str:
    """What every "% of peak" of a run divides by, in words: the hardware peak and its derivation (``hardware``,
    :func:`hardware_peak` 's dict from the run's facts) with the best GEMM per backend beside it as the
    practical ceiling; or, where the hardware peak is unknown, the best GEMM measured (``gemms``)."""
    measured = ", ".join(f"{value:.0f} GFLOP/s through {backend}" for backend, value in
                         sorted(gemms.items(), key=lambda item: -item[1]))
    if hardware and hardware.get("gflops") and not hardware.get("clock_ghz"):
        return (f"% of peak divides every implementation by one figure, this machine's measured FMA peak: "
                f"{hardware['gflops']:.0f} GFLOP/s ({hardware['note']})."
                + (f" Best GEMM measured in the same run (the practical ceiling): {measured}." if measured else ""))
    if hardware and hardware.get("gflops"):
        h = hardware
        return (f"% of peak divides every implementation by one figure, this machine's float32 peak: "
                f"{h['gflops']:.0f} GFLOP/s = {h['cores']} cores x {h['lanes']} lanes x {h['fma_units']} FMA units "
                f"x 2 x {h['clock_ghz']:.2f} GHz ({h['clock_source']}; {h['note']})."
                + (f" Best GEMM measured in the same run (the practical ceiling): {measured}." if measured else ""))
    reason = (hardware or {}).get("note") or "this run's facts predate it"
    if measured:
        best = max(gemms.values())
        return (f"% of peak divides every implementation by one figure, the best GEMM measured in the run "
                f"({best:.0f} GFLOP/s; measured: {measured}): the hardware peak is unknown ({reason}).")
    return f"% of peak is n/a: neither the hardware peak ({reason}) nor a GemmPeak result is in this run."


def with_one_peak(frame: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """Every row's % of peak over one figure per device, the same for every implementation
    (:func:`harness.measure.peak.one_peak`): the hardware peak of profile.json where it has one, else the best GEMM it
    (or, for older profiles, the CSV's per-backend ``peak_gflops``) records on that device."""
    gemms = dict(meta.get("gemm_peak_gflops") or {})
    if not gemms:  # an older profile.json: the CSV's per-backend peaks, the best per device
        gemms = {("numpy" if device == "cpu" else "torch-cuda"): float(peak)
                 for device, peak in frame.groupby("device")["peak_gflops"].max().items() if peak == peak}  # not NaN
    peaks = {device: one_peak(device, meta.get("hardware_peak") or {}, gemms) for device in frame["device"].unique()}
    frame = frame.copy()
    frame["peak_gflops"] = frame["device"].map(peaks).astype(float)
    frame["pct_of_peak"] = 100 * frame["gflops_per_s"] / frame["peak_gflops"]
    return frame

