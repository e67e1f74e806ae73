"""The machine's attainable float32 peak, measured in the same run as the other benchmarks: a large GEMM
through each framework's own BLAS, with the benchmarks' thread count.  The report divides every achieved
GFLOP/s by the peak of the implementation's own backend (see harness.peak.backend_of)."""

from benchmarks.common import IMPLEMENTATIONS, THREADS, require_available
from harness import registry
from harness.peak import backend_of, gemm_peak_gflops
from harness.threads import set_threads


def backends_in_use() -> list[str]:
    return sorted({backend_of(registry.get(name).framework, registry.get(name).device) for name in IMPLEMENTATIONS})


class GemmPeak:
    params = [backends_in_use()]
    param_names = ["backend"]
    timeout = 600

    def setup(self, backend):
        reasons = []
        for name in IMPLEMENTATIONS:
            if backend_of(registry.get(name).framework, registry.get(name).device) != backend:
                continue
            try:
                require_available(name)
                break
            except NotImplementedError as reason:
                reasons.append(str(reason))
        else:  # no implementation of this backend runs here (or is selected): skipped with the first reason
            raise NotImplementedError(reasons[0] if reasons else f"no implementation uses {backend}")
        set_threads(THREADS)

    def track_gemm_peak_gflops(self, backend):
        """Best of 3 float32 GEMMs (4096^3 on the CPU, 8192^3 on a GPU) after a warm-up one."""
        return gemm_peak_gflops(backend)

    track_gemm_peak_gflops.unit = "GFLOP/s"
