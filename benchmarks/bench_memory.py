"""Memory of one training step: host memory on every machine, and on GPUs three figures kept apart:
what NVML sees the device (and, where visible, this process) use, the framework allocator's own peak,
and the CUDA context overhead on its own."""

from benchmarks.common import IMPLEMENTATIONS, ModelBenchmark
from harness import registry
from harness.memory import PROCESS_NOT_VISIBLE, host_sampler, nvml_sampler, nvml_status, nvml_used_bytes

NVML_INTERVAL_S = 0.0005


class HostMemory(ModelBenchmark):
    def peakmem_train_step(self, *params):
        """asv's own figure: the peak resident memory of the benchmark process (model, data and set-up
        included), over a training step."""
        self.impl.train_step(self.batch)
        self.impl.synchronize()

    def track_host_memory_train_step(self, *params):
        """Peak resident memory of the process during one training step, sampled every 1 ms."""
        with host_sampler(interval_s=0.001) as sampler:
            self.impl.train_step(self.batch)
            self.impl.synchronize()
        return sampler.result.peak_bytes

    track_host_memory_train_step.unit = "bytes"


def require_gpu_measurement(name: str) -> None:
    if registry.get(name).device != "cuda":
        raise NotImplementedError(f"{name} runs on the CPU: no GPU memory to measure")
    problem = nvml_status()
    if problem:
        raise NotImplementedError(f"NVML unavailable: {problem}")


class GpuMemory(ModelBenchmark):
    """One training step sampled through NVML, with the allocator's peak over the same step."""

    def setup(self, name, batch_size, iterations):
        require_gpu_measurement(name)
        super().setup(name, batch_size, iterations)
        self.impl.reset_peak_memory()
        with nvml_sampler(interval_s=NVML_INTERVAL_S) as sampler:
            self.impl.train_step(self.batch)
            self.impl.synchronize()
        self.nvml = sampler.result
        self.allocator_peak = self.impl.allocator_peak_bytes()

    def track_gpu_memory_nvml(self, *params):
        """Peak device memory in use (all processes, CUDA context included) during the step, from NVML."""
        return self.nvml.peak_bytes

    def track_gpu_memory_nvml_increase(self, *params):
        """That peak minus NVML's reading just before the step."""
        return self.nvml.increase_bytes

    def track_gpu_memory_allocator_peak(self, *params):
        """The framework allocator's peak (torch.cuda.max_memory_allocated, CuPy pool) over the step."""
        return self.allocator_peak

    def track_nvml_sampling_interval(self, *params):
        return self.nvml.interval_s

    track_gpu_memory_nvml.unit = track_gpu_memory_nvml_increase.unit = "bytes"
    track_gpu_memory_allocator_peak.unit = "bytes"
    track_nvml_sampling_interval.unit = "seconds"


class GpuProcessMemory(GpuMemory):
    """NVML's figure for this process alone, where NVML can see it (not inside most containers)."""

    def setup(self, *params):
        super().setup(*params)
        if self.nvml.process_peak_bytes is None:
            raise NotImplementedError(PROCESS_NOT_VISIBLE)

    def track_gpu_memory_nvml_process(self, *params):
        return self.nvml.process_peak_bytes

    track_gpu_memory_nvml_process.unit = "bytes"


def create_cuda_context(framework: str) -> None:
    """Make the framework create its CUDA context without allocating anything."""
    if framework == "torch":
        import torch

        torch.empty(0, device="cuda")
        torch.cuda.synchronize()
    elif framework == "cupy":
        import cupy

        cupy.cuda.runtime.free(0)
        cupy.cuda.Device(0).synchronize()
    else:
        raise NotImplementedError(f"no CUDA context recipe for framework {framework!r}")


class CudaContext:
    """Device memory the CUDA context of each framework takes at creation (NVML, before and after).

    With CUDA's lazy module loading, kernels loaded later add to this; that part is in the step figures.
    """

    params = [sorted({registry.get(name).framework for name in IMPLEMENTATIONS if registry.get(name).device == "cuda"})
              or ["none"]]
    param_names = ["framework"]

    def setup(self, framework):
        candidates = [name for name in IMPLEMENTATIONS
                      if registry.get(name).framework == framework and registry.get(name).device == "cuda"]
        if not candidates:
            raise NotImplementedError("no CUDA implementation is registered")
        require_gpu_measurement(candidates[0])
        status = registry.get(candidates[0]).availability()
        if not status:
            raise NotImplementedError(f"{candidates[0]} is unavailable here: {status.reason}")
        before = nvml_used_bytes()
        create_cuda_context(framework)
        self.context_bytes = nvml_used_bytes() - before

    def track_cuda_context_bytes(self, framework):
        return self.context_bytes

    track_cuda_context_bytes.unit = "bytes"
