"""Memory of one training step: host memory on every machine, and on GPUs three figures kept apart:
what NVML sees the device (and, where visible, this process) use, the framework allocator's own peak,
and the CUDA context overhead on its own."""

import gc
import sys

from benchmarks.common import BATCH_SIZES, IMPLEMENTATIONS, STEP_ROUTING_ITERATIONS, ModelBenchmark, build
from harness import registry
from harness.memory import (
    PROCESS_NOT_VISIBLE,
    current_rss_bytes,
    host_sampler,
    nvml_sampler,
    nvml_status,
    nvml_used_bytes,
)

NVML_INTERVAL_S = 0.0005


_rss_before_model: dict[tuple, int] = {}


class HostMemory(ModelBenchmark):
    """Host memory of a training step.  With the resident memory of the process before the model was
    built, the difference is what the model, its data and one step take; the report sets it beside
    the analytic figure of harness.activations."""

    def setup(self, *params):
        _rss_before_model.setdefault(params, current_rss_bytes())
        super().setup(*params)

    def track_host_memory_before_model(self, *params):
        """Resident memory of the benchmark process before the model was built (libraries, interpreter)."""
        return _rss_before_model[params]

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

    track_host_memory_train_step.unit = track_host_memory_before_model.unit = "bytes"


def measure_gpu_steps() -> dict:
    """For every CUDA implementation and grid point: NVML's samples over one training step and the
    allocator's peak over the same step; or, per point, the reason it was not measured (a point that
    fails, out of memory or otherwise, is skipped, and the rest of the grid is still measured)."""
    problem = nvml_status()
    measured = {}
    for name in IMPLEMENTATIONS:
        for batch_size in BATCH_SIZES:
            for iterations in STEP_ROUTING_ITERATIONS:
                key = (name, batch_size, iterations)
                if registry.get(name).device != "cuda":
                    measured[key] = f"{name} runs on the CPU: no GPU memory to measure"
                    continue
                if problem:
                    measured[key] = f"NVML unavailable: {problem}"
                    continue
                try:
                    measured[key] = measure_gpu_step(name, batch_size, iterations)
                except NotImplementedError as reason:
                    measured[key] = str(reason)
                except Exception as error:
                    measured[key] = f"{name} failed at batch {batch_size}: {type(error).__name__}: {error}"
                release_device_memory()
    return measured


def measure_gpu_step(name: str, batch_size: int, iterations: int) -> dict | str:
    prepared = build(name, batch_size, iterations, "train_step")
    impl = prepared.impl
    impl.reset_peak_memory()
    with nvml_sampler(interval_s=NVML_INTERVAL_S) as sampler:
        impl.train_step(prepared.batch)
        impl.synchronize()
    if not sampler.result.available:
        return sampler.result.reason
    return {"nvml": sampler.result.as_dict(), "allocator_peak": impl.allocator_peak_bytes()}


def shared_setup_cache(benchmark) -> dict:
    """One measurement of the GPU grid for both GPU-memory classes: asv runs a setup_cache once per
    function, so both classes name this same function."""
    return measure_gpu_steps()


def release_device_memory() -> None:
    """Return what the allocators cache to the device, so one model's memory is not in the next's figure."""
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        sys.modules["torch"].cuda.empty_cache()
    if "cupy" in sys.modules and sys.modules["cupy"] is not None:
        try:
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
        except Exception:  # no device: nothing was cached
            pass


def measured_point(measured: dict, params: tuple) -> dict:
    """The figures of one grid point of :func:`measure_gpu_steps`, or NotImplementedError (asv: skipped)
    with the reason it was not measured."""
    figures = measured[params]
    if isinstance(figures, str):
        raise NotImplementedError(figures)
    return figures


class GpuMemory:
    """One training step sampled through NVML, with the allocator's peak over the same step.  All grid
    points are measured once, in ``setup_cache`` (one process for the whole grid)."""

    params = [IMPLEMENTATIONS, BATCH_SIZES, STEP_ROUTING_ITERATIONS]
    param_names = ["implementation", "batch_size", "routing_iterations"]
    timeout = 1800

    setup_cache = shared_setup_cache

    def setup(self, measured, *params):
        figures = measured_point(measured, params)
        self.nvml, self.allocator_peak = figures["nvml"], figures["allocator_peak"]

    def track_gpu_memory_nvml(self, measured, *params):
        """Peak device memory in use (all processes, CUDA context included) during the step, from NVML."""
        return self.nvml["peak_bytes"]

    def track_gpu_memory_nvml_increase(self, measured, *params):
        """That peak minus NVML's reading just before the step."""
        return self.nvml["increase_bytes"]

    def track_gpu_memory_allocator_peak(self, measured, *params):
        """The framework allocator's peak (torch.cuda.max_memory_allocated, CuPy pool) over the step."""
        return self.allocator_peak

    def track_nvml_sampling_interval(self, measured, *params):
        """The interval the sampling thread achieved (the step's duration / samples), not the one asked
        for: Python threads and NVML queries are slower than 0.5 ms."""
        return self.nvml["achieved_interval_s"]

    track_gpu_memory_nvml.unit = track_gpu_memory_nvml_increase.unit = "bytes"
    track_gpu_memory_allocator_peak.unit = "bytes"
    track_nvml_sampling_interval.unit = "seconds"


class GpuProcessMemory:
    """NVML's figure for this process alone, where NVML can see it (not inside most containers)."""

    params = GpuMemory.params
    param_names = GpuMemory.param_names
    timeout = 1800

    setup_cache = shared_setup_cache

    def setup(self, measured, *params):
        figures = measured_point(measured, params)
        if figures["nvml"]["process_peak_bytes"] is None:
            raise NotImplementedError(PROCESS_NOT_VISIBLE)
        self.process_peak = figures["nvml"]["process_peak_bytes"]

    def track_gpu_memory_nvml_process(self, measured, *params):
        return self.process_peak

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


def cuda_frameworks() -> list[str]:
    return sorted({registry.get(name).framework for name in IMPLEMENTATIONS if registry.get(name).device == "cuda"})


class CudaContext:
    """Device memory the CUDA context of each framework takes at creation (NVML, before and after), in a
    fresh process.  With CUDA's lazy module loading, kernels loaded later add to this; that part is in
    the step figures."""

    params = [cuda_frameworks() or ["none"]]
    param_names = ["framework"]

    def setup(self, framework):
        candidates = [name for name in IMPLEMENTATIONS
                      if registry.get(name).framework == framework and registry.get(name).device == "cuda"]
        if not candidates:
            raise NotImplementedError("no CUDA implementation is registered")
        status = registry.get(candidates[0]).availability()
        if not status:
            raise NotImplementedError(f"{candidates[0]} is unavailable here: {status.reason}")
        problem = nvml_status()
        if problem:
            raise NotImplementedError(f"NVML unavailable: {problem}")
        before = nvml_used_bytes()
        create_cuda_context(framework)
        self.context_bytes = nvml_used_bytes() - before

    def track_cuda_context_bytes(self, framework):
        return self.context_bytes

    track_cuda_context_bytes.unit = "bytes"
