"""The machine's float32 peaks: the hardware's (derived from what the CPU reports, the one figure every
"% of peak" on the CPU divides by) and, measured in the same run as the other benchmarks, a large GEMM
through each framework's own BLAS with the benchmarks' thread count (the practical ceiling shown beside it;
where the hardware peak is unknown, the best of these is the figure divided by)."""

from benchmarks.common import IMPLEMENTATIONS, THREADS, record_facts, setup_benchmark
from harness import registry
from harness.measure.peak import backend_of, gemm_peak_gflops
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
                setup_benchmark(name)
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


class HardwarePeak:
    """The CPU's float32 peak from what the machine reports (harness.measure.peak.hardware_peak: cores x lanes x FMA
    units x 2 x clock; the inputs are in the run's facts under ``hardware_peak``): the one figure every "% of
    peak" on the CPU divides by.  Skipped, with the reason, where an input cannot be read."""

    timeout = 60

    def setup(self):
        from harness.measure.machine import hardware_peak_facts

        record_facts()
        self.peak = hardware_peak_facts()
        if not self.peak.get("gflops"):
            raise NotImplementedError(f"hardware peak {self.peak.get('note', 'unknown')}")

    def track_hardware_peak_gflops(self):
        """cores x float32 lanes x FMA units x 2 x GHz of this machine."""
        return self.peak["gflops"]

    track_hardware_peak_gflops.unit = "GFLOP/s"
