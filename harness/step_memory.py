"""GPU memory of one training step, measured the same way for every implementation, each in a process of its own.

The rule, the same for every framework: build the implementation, warm it up with one training step,
return the allocator's cached blocks to the device (:meth:`~harness.contract.Implementation.release_cached_memory`),
then sample NVML (on the implementation's own GPU, by PCI bus id) and the allocator's peaks over one more
step.  The NVML baseline is therefore the CUDA context, the loaded kernels and what the implementation
keeps between steps (parameters, gradients, Adam's moments, workspaces), with no allocator cache in it;
the increase is what the step adds.  Each implementation runs in a fresh process (``spawn``), so the
cuBLAS / cuDNN handles, workspaces and modules of one framework are never in another's figure.
"""

from __future__ import annotations

import multiprocessing

from harness import contract, registry
from harness.data import synthetic_batch
from harness.memory import nvml_sampler, nvml_status
from harness.params import init_parameters
from harness.spec import CapsNetConfig

NVML_INTERVAL_S = 0.0005
DATA_SEED = 0


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, torch.cuda.OutOfMemoryError, cupy's OutOfMemoryError, or an allocator's OOM message."""
    return isinstance(error, MemoryError) or "OutOfMemory" in type(error).__name__ or "out of memory" in str(error)


def measure_step(impl: contract.Implementation, batch: contract.Batch) -> dict | str:
    """NVML's samples and the allocator's peaks over one training step of a warmed-up implementation; or
    the reason NVML could not measure it."""
    impl.synchronize()
    impl.release_cached_memory()
    impl.reset_peak_memory()
    with nvml_sampler(impl.pci_bus_id(), interval_s=NVML_INTERVAL_S) as sampler:
        impl.train_step(batch)
        impl.synchronize()
    if not sampler.result.available:
        return sampler.result.reason
    peaks = impl.allocator_peaks()
    return {"nvml": sampler.result.as_dict(),
            "allocator_live": peaks.live if peaks else None,
            "allocator_reserved": peaks.reserved if peaks else None}


def measure_points(name: str, config: CapsNetConfig, dtype: str, points: list[tuple[int, int]]) -> dict:
    """For each (batch size, routing iterations): the figures of :func:`measure_step`, or the reason the
    point was not measured (out of memory, a failure); one failed point never stops the others."""
    results = {}
    for batch_size, iterations in points:
        counted = config.replace(routing_iterations=iterations)
        impl = batch = None
        try:
            impl = registry.create(name, counted, init_parameters(counted), dtype)
            batch = impl.to_device(*synthetic_batch(counted, batch_size, seed=DATA_SEED))
            impl.train_step(batch)  # warm-up: kernels loaded, workspaces and optimizer state allocated
            results[(batch_size, iterations)] = measure_step(impl, batch)
        except Exception as error:
            kind = "runs out of memory" if is_out_of_memory(error) else "failed"
            results[(batch_size, iterations)] = (f"{name} {kind} at batch {batch_size}: "
                                                 f"{type(error).__name__}: {error}")
        if impl is not None:
            release = impl.release_cached_memory
            del impl, batch
            release()  # the next point starts from an empty cache
    return results


def in_fresh_process(function, *args):
    """``function(*args)`` in a new interpreter (multiprocessing's spawn: no CUDA state inherited)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def measure_grid(names: list[str], config: CapsNetConfig, dtype: str, points: list[tuple[int, int]]) -> dict:
    """{(name, batch size, iterations): figures or reason} for every name and point: each GPU
    implementation in a process of its own; a CPU implementation, or any where NVML cannot run, gets the
    reason instead."""
    problem = nvml_status()
    measured = {}
    for name in names:
        info = registry.get(name)
        status = info.availability()
        reason = (f"{name} runs on the CPU: no GPU memory to measure" if info.device != "cuda"
                  else f"{name} is unavailable here: {status.reason}" if not status
                  else f"NVML unavailable: {problem}" if problem else None)
        if reason is None:
            try:
                figures = in_fresh_process(measure_points, name, config, dtype, points)
            except Exception as error:  # the process itself died (driver error, killed)
                figures = {point: f"{name} failed: {type(error).__name__}: {error}" for point in points}
        else:
            figures = dict.fromkeys(points, reason)
        measured.update({(name, *point): value for point, value in figures.items()})
    return measured
