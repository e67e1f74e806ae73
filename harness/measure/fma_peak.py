"""The float32 FMA throughput this CPU sustains, measured by a compiled kernel: the check on the derived
hardware peak (:func:`harness.measure.peak.hardware_peak`), and its FMA-unit count where the CPU does not report it.

A Python-level loop cannot come near the FMA peak, so the kernel is a few lines of C compiled here with the
system's C compiler (``cc``, or ``$CC``) for this CPU (``-march=native``): independent vector accumulators,
enough of them to hide the FMA latency on two units, each updated ``x = x * a + b`` (a fused multiply-add,
2 FLOPs per lane).  One call per physical core runs in parallel threads (ctypes releases the GIL).  The
compiled library and the measured figure are cached per machine in capsbench's cache folder
(:func:`harness.settings.cache_dir`, as torch-fused's plans), so a benchmark process measures it once.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.settings import cache_dir

ACCUMULATORS = 12  # independent FMA chains: >= latency (4 cycles) x 2 units, within 16 vector registers
REPEATS = 3
CACHE_FILE = "fma-peak.json"

KERNEL_SOURCE = """
typedef float vec __attribute__((vector_size(4 * LANES)));
float fma_chains(long iterations, float a, float b) {
    vec zero = {0}, acc[ACCUMULATORS];
    vec va = zero + a, vb = zero + b;  /* a and b in every lane, held in registers */
    for (int k = 0; k < ACCUMULATORS; k++) acc[k] = zero + (float)k / ACCUMULATORS;
    for (long i = 0; i < iterations; i++) {
#pragma GCC unroll 16
        for (int k = 0; k < ACCUMULATORS; k++) acc[k] = acc[k] * va + vb;
    }
    float total = 0.0f;
    for (int k = 0; k < ACCUMULATORS; k++) for (int l = 0; l < LANES; l++) total += acc[k][l];
    return total;
}
"""


class FmaUnavailable(RuntimeError):
    """The kernel cannot be built or run here (no C compiler, or it failed); the message says which."""


def flops(iterations: int, lanes: int, calls: int = 1) -> float:
    """FLOPs of ``calls`` kernel calls: every accumulator's lanes do one FMA (2 FLOPs) per iteration."""
    return 2.0 * ACCUMULATORS * lanes * iterations * calls


def compile_kernel(lanes: int, folder: Path | None = None) -> ctypes.CDLL:
    """The kernel for ``lanes`` float32 values per vector, compiled for this CPU (cached by source and flags)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not shutil.which(compiler):
        raise FmaUnavailable(f"no C compiler ({compiler or 'cc'}) found: install gcc, or set CC, "
                             "to measure the FMA peak")
    flags = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC",
             f"-DLANES={lanes}", f"-DACCUMULATORS={ACCUMULATORS}"]
    digest = hashlib.sha256((KERNEL_SOURCE + " ".join(flags) + compiler).encode()).hexdigest()[:16]
    folder = folder or cache_dir()
    library = folder / f"fma-kernel-{digest}.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch) / "fma.c"
            source.write_text(KERNEL_SOURCE, encoding="utf-8")
            built = Path(scratch) / library.name
            result = subprocess.run([compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True)
            if result.returncode:
                first = (result.stderr.strip().splitlines() or ["no message"])[0]
                raise FmaUnavailable(f"the FMA kernel did not compile with {compiler}: {first}")
            os.replace(built, library)  # atomic: a concurrent process sees the whole library or none
    kernel = ctypes.CDLL(str(library)).fma_chains
    kernel.argtypes, kernel.restype = [ctypes.c_long, ctypes.c_float, ctypes.c_float], ctypes.c_float
    return kernel


def measure_gflops(lanes: int, cores: int, seconds: float = 0.2, repeats: int = REPEATS,
                   folder: Path | None = None) -> float:
    """Best GFLOP/s of ``cores`` parallel kernel calls of about ``seconds`` each, after a calibrating call."""
    kernel = compile_kernel(lanes, folder)
    iterations = 1 << 16
    while True:  # calibrate: double until one call takes a tenth of the target
        start = time.perf_counter()
        kernel(iterations, 0.999999, 1e-6)
        if time.perf_counter() - start >= seconds / 10:
            break
        iterations *= 2
    iterations = int(iterations * seconds / max(time.perf_counter() - start, 1e-9))
    best = float("inf")
    with ThreadPoolExecutor(max_workers=cores) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda _: kernel(iterations, 0.999999, 1e-6), range(cores)))
            best = min(best, time.perf_counter() - start)
    return flops(iterations, lanes, cores) / best / 1e9


def machine_fma_gflops(lanes: int, cores: int, cpu: str) -> dict:
    """``{"gflops": ..., "core_gflops": ..., "note": ...}`` (every core, one core) of this machine (``cpu``: its
    model name), measured once and then read from the cache file (keyed by CPU, lanes and cores); ``gflops``
    None with the reason where it cannot run."""
    key = json.dumps({"cpu": cpu, "lanes": lanes, "cores": cores, "accumulators": ACCUMULATORS},
                     sort_keys=True)
    path = cache_dir() / CACHE_FILE
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), dict):
        return cached[key]
    try:
        entry = {"gflops": measure_gflops(lanes, cores), "core_gflops": measure_gflops(lanes, 1),
                 "note": f"{ACCUMULATORS} x {lanes}-lane FMA chains compiled with -march=native, {cores} threads "
                         f"(and 1 for core_gflops), best of {REPEATS}"}
    except (FmaUnavailable, OSError) as error:
        return {"gflops": None, "note": f"FMA microbenchmark unavailable: {error}"}
    cached = {**(cached if isinstance(cached, dict) else {}), key: entry}
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(cached, indent=1), encoding="utf-8")
    os.replace(scratch, path)
    return entry
