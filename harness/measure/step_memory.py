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

import gc
import multiprocessing
import signal

from harness import contract, registry
from harness.data import synthetic_batch
from harness.measure.memory import nvml_sampler, nvml_status
from harness.params import init_parameters
from harness.spec import CapsNetConfig

NVML_INTERVAL_S = 0.0005
DATA_SEED = 0
WORKER_TIMEOUT_S = 600  # one implementation's whole grid, compiling included; past it, the worker is killed


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
        # the model goes before the next is built: nothing may hold it (a bound method would), and torch
        # models sit in a reference cycle (module.route), which only the collector frees; the next point's
        # measure_step then empties the allocator's cache of its blocks before sampling
        del impl, batch
        gc.collect()
    return results


class WorkerDied(RuntimeError):
    """The measuring process ended without an answer (driver abort, the OOM killer, a signal)."""


def _answer(sender, function, args) -> None:
    """Run in the fresh process: send ``("ok", result)`` or ``("error", one line)`` back."""
    try:
        result = ("ok", function(*args))
    except Exception as error:
        result = ("error", f"{type(error).__name__}: {error}")
    sender.send(result)
    sender.close()


def exit_description(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def in_fresh_process(function, *args, timeout_s: float | None = None):
    """``function(*args)`` in a new interpreter (multiprocessing's spawn: no CUDA state inherited).

    The answer comes through a pipe whose only writer is the child, so a child that dies (driver abort,
    OOM killer) ends the wait at once with :class:`WorkerDied`, and one that hangs past ``timeout_s`` is
    killed with the same; an exception in the child is a RuntimeError with its one line."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_answer, args=(sender, function, args), daemon=True)
    process.start()
    sender.close()  # the child's copy is now the only writer: its death is end-of-file here
    try:
        if not receiver.poll(timeout_s):
            raise WorkerDied(f"the measuring process gave no answer within {timeout_s:g} s and was killed")
        try:
            status, value = receiver.recv()
        except EOFError:
            process.join(5)
            raise WorkerDied(f"the measuring process died ({exit_description(process.exitcode)}) "
                             "before it answered") from None
    finally:
        receiver.close()
        if process.is_alive():
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    if status == "error":
        raise RuntimeError(value)
    return value


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
                figures = in_fresh_process(measure_points, name, config, dtype, points, timeout_s=WORKER_TIMEOUT_S)
            except Exception as error:  # the process itself died (driver error, killed), or failed
                figures = {point: f"{name} failed: {type(error).__name__}: {error}" for point in points}
        else:
            figures = dict.fromkeys(points, reason)
        measured.update({(name, *point): value for point, value in figures.items()})
    return measured
