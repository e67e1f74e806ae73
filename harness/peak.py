"""The attainable float32 peak of this machine, measured the way the implementations compute: a GEMM large
enough to saturate the device, through each framework's own BLAS, with the threads the benchmarks use.

Every "% of peak" in capsbench divides an achieved GFLOP/s by this measured figure, never by a datasheet
number: on a 2-core VM the datasheet says little about what BLAS actually reaches.
"""

from __future__ import annotations

import time

BACKENDS = ("numpy", "torch", "torch-cuda", "cupy")
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
