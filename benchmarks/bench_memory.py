"""Memory of one training step: host memory on every machine, and on GPUs the figures kept apart (NVML's
device-wide figure and its increase over the step, NVML's per-process figure where visible, the allocator's
peak of live bytes and of reserved bytes), plus the CUDA context on its own; the step's figures at each
routing algorithm of the profile (``routing_algorithm``, the grid's last parameter, as in the phase
benchmarks)."""

from benchmarks.common import (
    BATCH_SIZES,
    DTYPE,
    IMPLEMENTATIONS,
    ROUTING_ALGORITHMS,
    STEP_ROUTING_ITERATIONS,
    ModelBenchmark,
    not_measured_reason,
    point_config,
    record_facts,
    setup_benchmark,
)
from harness import registry
from harness.measure.memory import PROCESS_NOT_VISIBLE, current_rss_bytes, host_sampler, nvml_status, nvml_used_bytes
from harness.measure.step_memory import measure_grid

_rss_before_model: dict[tuple, int] = {}


class HostMemory(ModelBenchmark):
    """Host memory of a training step.  With the resident memory of the process before the model was
    built, the difference is what the model, its data and one step take; the report sets it beside
    the analytic figure of harness.measure.expected_memory.

    ``setup`` reads the resident memory and skips what cannot run; the figures that need a model build it
    (and warm it up by one step) before they measure, so the before-model figure's process, one per grid
    point like every other, builds nothing."""

    def setup(self, *params):
        _rss_before_model.setdefault(params, current_rss_bytes())
        record_facts()
        setup_benchmark(params[0], point_config(params[2], self.params[2], "full", *params[3:]))

    def build(self, params: tuple) -> None:
        """The model and batch of ``params``, warmed up by one training step (:meth:`ModelBenchmark.setup`)."""
        super().setup(*params)

    def track_host_memory_before_model(self, *params):
        """Resident memory of the benchmark process before the model was built (libraries, interpreter)."""
        return _rss_before_model[params]

    def peakmem_train_step(self, *params):
        """asv's own figure: the peak resident memory of the benchmark process (model, data and set-up
        included), over a training step."""
        self.build(params)
        self.impl.train_step(self.batch)
        self.impl.synchronize()

    def track_host_memory_train_step(self, *params):
        """Peak resident memory of the process during one training step, sampled every 1 ms."""
        self.build(params)
        with host_sampler(interval_s=0.001) as sampler:
            self.impl.train_step(self.batch)
            self.impl.synchronize()
        return sampler.result.peak_bytes

    track_host_memory_train_step.unit = track_host_memory_before_model.unit = "bytes"


def shared_setup_cache(benchmark) -> dict:
    """One measurement of the GPU grid for every GPU-memory class (asv runs a setup_cache once per
    function, so the classes name this same function): each GPU implementation in a process of its own per
    routing algorithm (:mod:`harness.measure.step_memory`), a failed point recorded with its reason and the
    rest still measured; keyed by the grid's parameters, the algorithm last."""
    record_facts()
    measured = {}
    for algorithm in ROUTING_ALGORITHMS:
        points = [(batch, iterations) for batch in BATCH_SIZES for iterations in STEP_ROUTING_ITERATIONS
                  if not not_measured_reason(algorithm, iterations, STEP_ROUTING_ITERATIONS)]
        config = point_config(points[0][1], STEP_ROUTING_ITERATIONS, "full", algorithm)
        names = measured_names(config)
        if names:
            figures = measure_grid(names, config, DTYPE, points)
            measured.update({(*key, algorithm): value for key, value in figures.items()})
    return measured


def measured_names(config=None) -> list[str]:
    """The implementations the GPU grid measures (at ``config``'s routing algorithm): those selected
    (``--impl``, ``CAPSBENCH_IMPLEMENTATIONS``) that can run here and compute it; every other point is skipped
    by :func:`measured_point` with its own reason before the grid is read, so none spends a process."""
    names = []
    for name in IMPLEMENTATIONS:
        try:
            setup_benchmark(name, config)
        except NotImplementedError:
            continue
        names.append(name)
    return names


def measured_point(measured: dict, params: tuple) -> dict:
    """The figures of one grid point, or NotImplementedError (asv: skipped) with the reason it was not
    measured (a point its routing algorithm skips, not selected, not computing the algorithm, on the CPU,
    unavailable, NVML missing, out of memory)."""
    record_facts()
    setup_benchmark(params[0], point_config(params[2], STEP_ROUTING_ITERATIONS, "full", *params[3:]))
    figures = measured[params]
    if isinstance(figures, str):
        raise NotImplementedError(figures)
    return figures


class GpuMemory:
    """One training step sampled through NVML, with the allocator's peaks over the same step."""

    params = [IMPLEMENTATIONS, BATCH_SIZES, STEP_ROUTING_ITERATIONS, ROUTING_ALGORITHMS]
    param_names = ["implementation", "batch_size", "routing_iterations", "routing_algorithm"]
    timeout = 1800

    setup_cache = shared_setup_cache

    def setup(self, measured, *params):
        figures = measured_point(measured, params)
        self.nvml = figures["nvml"]
        self.live, self.reserved = figures["allocator_live"], figures["allocator_reserved"]

    def track_gpu_memory_nvml(self, measured, *params):
        """Peak device memory in use (all processes, CUDA context included) during the step, from NVML."""
        return self.nvml["peak_bytes"]

    def track_gpu_memory_nvml_increase(self, measured, *params):
        """That peak minus NVML's reading just before the step, the allocator's cache emptied first."""
        return self.nvml["increase_bytes"]

    def track_gpu_memory_allocator_live(self, measured, *params):
        """The allocator's peak of bytes in live arrays over the step (torch max_memory_allocated; CuPy
        counted by a memory hook)."""
        return self.live

    def track_gpu_memory_allocator_reserved(self, measured, *params):
        """The allocator's peak of bytes held from the device over the step, its cache included (torch
        max_memory_reserved; CuPy's pool total)."""
        return self.reserved

    def track_nvml_sampling_interval(self, measured, *params):
        """The interval the sampling thread achieved (the step's duration / samples), not the one asked
        for: Python threads and NVML queries are slower than 0.5 ms."""
        return self.nvml["achieved_interval_s"]

    track_gpu_memory_nvml.unit = track_gpu_memory_nvml_increase.unit = "bytes"
    track_gpu_memory_allocator_live.unit = track_gpu_memory_allocator_reserved.unit = "bytes"
    track_nvml_sampling_interval.unit = "seconds"


class GpuProcessMemory:
    """NVML's figure for this process alone, where NVML can see it (not inside most containers)."""

    params = GpuMemory.params
    param_names = GpuMemory.param_names
    timeout = 1800

    setup_cache = shared_setup_cache

    def setup(self, measured, *params):
        figures = measured_point(measured, params)
        if figures["nvml"]["process_peak_bytes"] is None:  # why: NVML refused the process list, or no PID
            raise NotImplementedError(figures["nvml"].get("process_note") or PROCESS_NOT_VISIBLE)
        self.process_peak = figures["nvml"]["process_peak_bytes"]

    def track_gpu_memory_nvml_process(self, measured, *params):
        return self.process_peak

    track_gpu_memory_nvml_process.unit = "bytes"


def create_cuda_context(framework: str) -> str | None:
    """Make the framework create its CUDA context without allocating anything; the device's PCI bus id."""
    if framework == "torch":
        import torch

        from implementations.torch.autograd import cuda_pci_bus_id

        torch.empty(0, device="cuda")
        torch.cuda.synchronize()
        return cuda_pci_bus_id(torch.cuda.get_device_properties(torch.cuda.current_device()))
    if framework == "cupy":
        import cupy

        cupy.cuda.runtime.free(0)
        cupy.cuda.Device().synchronize()
        return cupy.cuda.Device().pci_bus_id
    raise NotImplementedError(f"no CUDA context recipe for framework {framework!r}")


def cuda_frameworks() -> list[str]:
    return sorted({info.framework for info in registry.entries() if info.device == "cuda"})


class CudaContext:
    """Device memory the CUDA context of each framework takes at creation (NVML, before and after), in a
    fresh process.  With CUDA's lazy module loading, kernels loaded later add to this; that part is in
    the step figures."""

    params = [cuda_frameworks() or ["none"]]
    param_names = ["framework"]

    def setup(self, framework):
        candidates = [info.name for info in registry.entries() if info.framework == framework and info.device == "cuda"]
        if not candidates:
            raise NotImplementedError("no CUDA implementation is registered")
        setup_benchmark(candidates[0])
        problem = nvml_status()
        if problem:
            raise NotImplementedError(f"NVML unavailable: {problem}")
        before = nvml_used_bytes()  # the framework has chosen no device yet: NVML's default GPU
        pci_bus_id = create_cuda_context(framework)
        self.context_bytes = nvml_used_bytes(pci_bus_id) - before

    def track_cuda_context_bytes(self, framework):
        return self.context_bytes

    track_cuda_context_bytes.unit = "bytes"
