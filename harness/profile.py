"""python -m harness.profile: where the time and memory of a training step go, layer by layer, for every
implementation.

Each implementation is built from the canonical parameters, warmed up, then runs ``--steps`` pairs of one
unprofiled and one profiled training step, interleaved in alternating order (so that neither kind runs first
and the overhead, taken pair by pair, is not biased by the order).  A profiled step is the contract's three calls, each
inside a phase: ``forward_loss`` (forward), ``backward`` (backward) and ``adam_step`` (update); inside them
the implementation's own ranges (:mod:`harness.ranges`) name the layers.  What a range measures:

* NumPy and CuPy: wall-clock time with the device synchronised at both ends (plus an NVTX range on CUDA);
  memory from ``tracemalloc`` on NumPy (bytes allocated during the layer, net, and the peak inside it);
* torch: ``torch.profiler`` with each range a ``record_function`` (the Chrome/Perfetto trace carries the
  same names).  A forward or update layer's time is its range's (device time on CUDA); the backward of an
  autograd implementation runs inside torch's engine, outside any Python range, so each backward node is
  charged to the layer whose forward operation has the same autograd sequence number (gradient
  accumulation nodes to the node just before them), with the engine's time between nodes (see
  :func:`torch_step_record`).  Memory is what the profiler attributes to the operations inside the layer
  (allocated during it, net); torch reports no per-range peak.

``--routing-algorithm`` chooses the network's routing (dynamic by default); the layers of the routing are
the algorithm's (:func:`harness.measure.flops.routing_layers`: an iteration per row under dynamic routing,
``attention`` and ``attention_sum`` under self-attention), and an implementation that does not compute the
algorithm is left out (refused, when named).

Outputs in ``--out`` (default ``runs/profile/``, ``runs/profile/<algorithm>/`` for a routing algorithm other
than dynamic, so that neither replaces the other): ``profile.csv`` (tidy: one row per implementation x phase
x layer, with the median time per step over the profiled steps and its interquartile range, the share of the
profiled step, the layer's analytic FLOPs from :mod:`harness.measure.flops`, GFLOP/s and % of peak: one figure for every
implementation, the CPU's hardware float32 peak (:func:`harness.measure.peak.hardware_peak`), else or on a GPU the
best GEMM measured in the same run), ``profile.md`` (a table per implementation, the profiling
overhead: profiled against unprofiled step), ``profile.json`` (what ran, on what machine) and, for torch,
``traces/<implementation>.trace.json.gz`` (the last profiled step, for chrome://tracing or Perfetto).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness import cli, contract, options, registry, routing_algorithms
from harness.data import synthetic_batch
from harness.errors import EXIT_FAILURE, UserError
from harness.measure import flops as flops_module
from harness.measure.machine import machine_facts
from harness.measure.peak import backend_of, gemm_peak_gflops, machine_hardware_peak, one_peak, peak_sentence
from harness.params import init_parameters
from harness.ranges import RANGE_PREFIX, ROUTING_LAYER, layer_range, range_name, recording
from harness.reporting.formatting import fmt, markdown_table
from harness.reporting.tables import plan_lines
from harness.results import (
    PROFILE_CSV,
    PROFILE_JSON,
    PROFILE_KIND,
    atomic_output,
    unwritable_line,
    writable_folder,
    write_json_atomic,
    write_text_atomic,
)
from harness.settings import PROFILE_SUBDIR, RUNS_DIR
from harness.spec import DEFAULT_ROUTING_ALGORITHM, CapsNetConfig, get_config
from harness.threads import set_threads, thread_facts, usable_cpu_count

PHASE_CALLS = (("forward", "forward_loss"), ("backward", "backward"), ("update", "adam_step"))
CSV_NAME, JSON_NAME = PROFILE_CSV, PROFILE_JSON  # the files harness.results reads back
MD_NAME, TRACES = "profile.md", "traces"
CSV_COLUMNS = ["implementation", "framework", "device", "config_name", "routing_algorithm", "batch_size", "dtype",
               "phase", "layer", "order",
               "steps", "time_s", "time_q25_s", "time_q75_s", "share", "flops", "gflops_per_s", "peak_gflops",
               "pct_of_peak", "memory_allocated_bytes", "memory_peak_bytes"]
DATA_SEED = 0


class ProfileError(UserError, RuntimeError):
    """A profile that cannot run as asked (unknown implementation, no device)."""


@dataclass
class StepRecord:
    """What one profiled step measured: seconds per phase, and per (phase, layer) seconds and memory."""

    phases: dict[str, float] = field(default_factory=dict)
    layers: dict[tuple[str, str], float] = field(default_factory=dict)
    allocated: dict[tuple[str, str], int] = field(default_factory=dict)
    peak: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, key: tuple[str, str], seconds: float, allocated: int | None = None, peak: int | None = None):
        self.layers[key] = self.layers.get(key, 0.0) + seconds
        if allocated is not None:
            self.allocated[key] = self.allocated.get(key, 0) + allocated
        if peak is not None:
            self.peak[key] = max(self.peak.get(key, 0), peak)


# Recorders: what a range is, per framework ------------------------------------------------------------------


def _nvtx(impl: contract.Implementation):
    """(push, pop) of NVTX ranges for a CUDA implementation, or None."""
    if impl.device != "cuda":
        return None
    if impl.framework == "cupy":
        import cupy.cuda.nvtx as nvtx

        return nvtx.RangePush, nvtx.RangePop
    import torch

    return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop


class WallClockRecorder:
    """Ranges timed by the wall clock with the device synchronised at both ends (NumPy, CuPy); memory from
    tracemalloc when it is tracing (NumPy's allocations are traced, CuPy's device memory is not)."""

    def __init__(self, impl: contract.Implementation, memory: bool) -> None:
        self.impl, self.memory, self.nvtx = impl, memory, _nvtx(impl)
        self.step = StepRecord()

    @contextlib.contextmanager
    def range(self, layer: str, phase: str):
        self.impl.synchronize()
        if self.nvtx:
            self.nvtx[0](range_name(layer, phase))
        if self.memory:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.impl.synchronize()
            seconds = time.perf_counter() - start
            if self.nvtx:
                self.nvtx[1]()
            if self.memory:
                current, peak = tracemalloc.get_traced_memory()
                self.step.add((phase, layer), seconds, current - before, peak - before)
            else:
                self.step.add((phase, layer), seconds)


class CountingRecorder:
    """Counts the ranges of a step and records nothing else (what the ranges cost when nobody records)."""

    def __init__(self) -> None:
        self.count = 0

    def range(self, layer: str, phase: str):
        self.count += 1
        return contextlib.nullcontext()


def inactive_range_seconds(repeats: int = 5, calls: int = 20_000) -> float:
    """Seconds of one ``with layer_range(...)`` when no profile records (best of ``repeats`` timings)."""
    def run():
        for _ in range(calls):
            with layer_range("conv1", "forward"):
                pass

    return min(timeit.timeit(run, number=1) for _ in range(repeats)) / calls


class TorchRecorder:
    """Ranges as torch.profiler.record_function (and NVTX on CUDA); their times are read from the profiler's
    events after the step (:func:`torch_step_record`)."""

    def __init__(self, impl: contract.Implementation) -> None:
        import torch

        self.record_function, self.nvtx = torch.profiler.record_function, _nvtx(impl)

    @contextlib.contextmanager
    def range(self, layer: str, phase: str):
        if self.nvtx:
            self.nvtx[0](range_name(layer, phase))
        try:
            with self.record_function(range_name(layer, phase)):
                yield
        finally:
            if self.nvtx:
                self.nvtx[1]()


def _parse_range(name: str) -> tuple[str, str] | None:
    """(phase, layer) of a range's name, or None for any other event."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == RANGE_PREFIX and parts[1] != "phase":
        return parts[1], parts[2]
    return None


def _enclosing_range(event) -> tuple[str, str] | None:
    while event is not None:
        parsed = _parse_range(event.name)
        if parsed:
            return parsed
        event = event.cpu_parent
    return None


def _descendant_ranges(event) -> list:
    """The outermost capsbench ranges below ``event``."""
    found = []
    for child in event.cpu_children:
        if _parse_range(child.name):
            found.append(child)
        else:
            found.extend(_descendant_ranges(child))
    return found


def torch_step_record(events, device: str, phase_seconds: dict[str, float]) -> StepRecord:
    """Per (phase, layer) seconds and memory of one profiled torch step, from the profiler's events.

    Forward and update layers take their ranges' times.  The backward phase is partitioned among its
    nodes in the order they ran: on the CPU each node is charged the wall time from the end of the node
    before it to its own end (so the engine's work between nodes belongs to the node it leads to, and the
    layers add up to the phase), on CUDA its device time."""
    on_cuda = device == "cuda"

    def seconds(event) -> float:
        total = getattr(event, "device_time_total", 0.0) if on_cuda else event.cpu_time_total
        return total / 1e6

    def memory(event) -> int:
        return int(getattr(event, "device_memory_usage", 0) if on_cuda else event.cpu_memory_usage)

    record = StepRecord(phases=dict(phase_seconds))
    by_sequence = {}  # autograd sequence number of a forward operation -> its layer
    for event in events:
        parsed = _parse_range(event.name)
        if parsed and parsed[0] != "backward" and _enclosing_range(event.cpu_parent) is None:
            record.add(parsed, seconds(event), memory(event))
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine"):
            enclosing = _enclosing_range(event)
            if enclosing and enclosing[0] == "forward":
                by_sequence.setdefault(event.sequence_nr, enclosing[1])
    backward = next((event for event in events if event.name == range_name("backward", "phase")), None)
    if backward is None:
        return record
    pending, last, previous_end = [], None, backward.time_range.start
    for node in sorted(backward.cpu_children, key=lambda event: event.time_range.start):
        span = seconds(node) if on_cuda else (node.time_range.end - previous_end) / 1e6
        previous_end = node.time_range.end
        inner = _descendant_ranges(node)
        for event in inner:
            record.add(_parse_range(event.name), seconds(event), memory(event))
        rest = (span - sum(seconds(event) for event in inner), memory(node) - sum(memory(event) for event in inner))
        layer = by_sequence.get(node.sequence_nr) if node.sequence_nr >= 0 else None
        if layer is None and inner:
            layer = _parse_range(inner[-1].name)[1]
        layer = layer or last
        if layer is None:  # before any attributable node (the loss's seed, zero_grad): the first layer's
            pending.append(rest)
            continue
        for early_seconds, early_memory in [*pending, rest]:
            record.add(("backward", layer), early_seconds, early_memory)
        pending, last = [], layer
    return record


# Profiling one implementation ---------------------------------------------------------------------------------


def phase_step(impl: contract.Implementation, batch, phase_range=None) -> dict[str, float]:
    """One training step as the contract's three calls, each timed (device synchronised) inside its phase."""
    times = {}
    for phase, call in PHASE_CALLS:
        impl.synchronize()
        start = time.perf_counter()
        with phase_range(phase) if phase_range else contextlib.nullcontext():
            getattr(impl, call)(*([batch] if call == "forward_loss" else []))
            impl.synchronize()
        times[phase] = time.perf_counter() - start
    return times


@dataclass
class Profiled:
    """One implementation's profile: its step records, its unprofiled step times, the ranges in a step."""

    info: registry.ImplementationInfo
    steps: list[StepRecord]
    unprofiled: list[float]
    trace: Path | None = None
    ranges_per_step: int = 0
    plan: dict | None = None  # the plan the implementation chose for its batch shape (torch-fused's convolutions)


def profile_implementation(info: registry.ImplementationInfo, config: CapsNetConfig, batch_size: int, dtype: str,
                           steps: int, warmup: int, trace_dir: Path | None, memory: bool = True) -> Profiled:
    """Warm-up steps, then ``steps`` pairs of one unprofiled and one profiled step, interleaved and in
    alternating order (unprofiled first in even pairs, profiled first in odd ones), so that neither kind
    always runs first, warmer caches or a drifting clock bias the overhead (which :func:`pair_overheads`
    takes pair by pair)."""
    impl = info.create(config, init_parameters(config, dtype=dtype), dtype)
    batch = impl.to_device(*synthetic_batch(config, batch_size, seed=DATA_SEED))
    for _ in range(warmup):
        phase_step(impl, batch)
    with recording(CountingRecorder()) as counter:
        phase_step(impl, batch)
    profiled_step, last_trace = step_profiler(info, impl, batch, memory, trace_dir)
    records, unprofiled = [], []
    for index in range(steps):
        for profiled in ((False, True) if index % 2 == 0 else (True, False)):
            if profiled:
                records.append(without_enclosing_routing(profiled_step(trace=index == steps - 1)))
            else:
                unprofiled.append(sum(phase_step(impl, batch).values()))
    plan_facts = getattr(impl, "plan_facts", None)
    return Profiled(info, records, unprofiled, last_trace(), counter.count, plan_facts() if plan_facts else None)


def step_profiler(info: registry.ImplementationInfo, impl: registry.Implementation, batch, memory: bool,
                  trace_dir: Path | None):
    """(a function running one profiled step and returning its StepRecord, a function giving the trace
    written); for torch, one step under the profiler first as a warm-up (a compiled step recompiles)."""
    written: list[Path] = []
    if info.framework == "torch":
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if info.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        recorder = TorchRecorder(impl)

        def phase_range(phase: str):
            return torch.profiler.record_function(range_name(phase, "phase"))

        def torch_step(trace: bool = False) -> StepRecord:
            with recording(recorder), torch.profiler.profile(activities=activities, profile_memory=memory) as prof:
                phases = phase_step(impl, batch, phase_range)
            if trace and trace_dir is not None:
                written.append(export_trace(prof, trace_dir / f"{info.name}.trace.json.gz"))
            return torch_step_record(prof.events(), info.device, phases)

        torch_step()
        return torch_step, lambda: written[-1] if written else None

    def wall_clock_step(trace: bool = False) -> StepRecord:
        recorder = WallClockRecorder(impl, memory and info.device == "cpu")
        if recorder.memory:
            tracemalloc.start()
        try:
            with recording(recorder):
                phases = phase_step(impl, batch)
        finally:
            if recorder.memory:
                tracemalloc.stop()
        recorder.step.phases = phases
        return recorder.step

    return wall_clock_step, lambda: None


def without_enclosing_routing(record: StepRecord) -> StepRecord:
    """A step whose routing opened the built-in routing's ranges (dynamic routing's iterations,
    self-attention's layers) inside the whole-routing range of the base class (a plugin calling the built-in
    routing): the enclosing range goes, so no time is counted twice."""
    for phase in {phase for phase, layer in record.layers if flops_module.is_builtin_routing_layer(layer)}:
        for measured in (record.layers, record.allocated, record.peak):
            measured.pop((phase, ROUTING_LAYER), None)
    return record


def pair_overheads(profiled: Profiled) -> list[float]:
    """The profiling overhead of each interleaved pair: profiled step / unprofiled step - 1."""
    return [sum(record.phases.values()) / plain - 1 for record, plain in zip(profiled.steps, profiled.unprofiled)]


def export_trace(prof, path: Path) -> Path:
    """torch's Chrome trace of a profiled step, gzipped (Perfetto and chrome://tracing read it as is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(plain))
        with atomic_output(path) as temporary:
            with open(plain, "rb") as source, gzip.open(temporary, "wb") as target:
                shutil.copyfileobj(source, target)
    return path


# Tables ------------------------------------------------------------------------------------------------------


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return float(median), float(q25), float(q75)


def profile_rows(profiled: Profiled, config: CapsNetConfig, batch_size: int, dtype: str, config_name: str,
                 peak_gflops: float | None) -> list[dict]:
    """The tidy rows of one implementation: every (phase, layer) of :func:`harness.measure.flops.step_layer_flops`,
    with the ranges it did not record (a plugin without ranges) as NaN, and any extra range it did."""
    info, steps = profiled.info, profiled.steps
    step_median = statistics.median(sum(step.phases.values()) for step in steps)
    table = flops_module.step_layer_flops(config, batch_size)
    routing_layers = flops_module.routing_layers(config)
    for phase in ("forward", "backward"):  # a plugin's routing, timed whole (harness.ranges.ROUTING_LAYER)
        table.setdefault((phase, ROUTING_LAYER), sum(table[(phase, layer)] for layer in routing_layers))
    order = {layer: index for index, layer in enumerate([*flops_module.layers(config), flops_module.OPTIMIZER])}
    order[ROUTING_LAYER] = order[routing_layers[0]]
    recorded = {key for step in steps for key in step.layers}
    table = {key: value for key, value in table.items() if key[1] != ROUTING_LAYER or key in recorded}
    keys = list(table) + sorted({key for step in steps for key in step.layers} - set(table))
    rows = []
    for phase, layer in keys:
        times = [step.layers[(phase, layer)] for step in steps if (phase, layer) in step.layers]
        median, q25, q75 = quartiles(times) if times else (np.nan, np.nan, np.nan)
        allocated = [step.allocated[(phase, layer)] for step in steps if (phase, layer) in step.allocated]
        peak = [step.peak[(phase, layer)] for step in steps if (phase, layer) in step.peak]
        layer_flops = table.get((phase, layer), np.nan)
        gflops = layer_flops / median / 1e9 if times and median > 0 else np.nan
        rows.append({
            "implementation": info.name, "framework": info.framework, "device": info.device,
            "config_name": config_name, "routing_algorithm": config.routing_algorithm, "batch_size": batch_size,
            "dtype": dtype, "phase": phase, "layer": layer,
            "order": order.get(layer, len(order)), "steps": len(steps), "time_s": median, "time_q25_s": q25,
            "time_q75_s": q75, "share": median / step_median, "flops": layer_flops, "gflops_per_s": gflops,
            "peak_gflops": peak_gflops, "pct_of_peak": 100 * gflops / peak_gflops if peak_gflops else np.nan,
            "memory_allocated_bytes": statistics.median(allocated) if allocated else np.nan,
            "memory_peak_bytes": statistics.median(peak) if peak else np.nan,
        })
    return rows


def implementation_summary(profiled: Profiled, batch_size: int, config_name: str, dtype: str,
                           range_seconds: float) -> dict:
    step = statistics.median(sum(record.phases.values()) for record in profiled.steps)
    unprofiled = statistics.median(profiled.unprofiled)
    return {**profiled.info.describe(), "step_s": step, "unprofiled_step_s": unprofiled,
            "ranges_per_step": profiled.ranges_per_step, "inactive_range_s": range_seconds,
            "inactive_ranges_share": profiled.ranges_per_step * range_seconds / unprofiled,
            "compiled": profiled.info.cls.first_call_compiles,
            "overhead": step / unprofiled - 1, "steps": len(profiled.steps), "batch_size": batch_size,
            **overhead_spread(pair_overheads(profiled)),
            "config_name": config_name, "dtype": dtype,
            "phases_s": {phase: statistics.median(record.phases[phase] for record in profiled.steps)
                         for phase, _ in PHASE_CALLS},
            "trace": profiled.trace.name if profiled.trace else None, "plan": profiled.plan}


def overhead_spread(overheads: list[float]) -> dict:
    """The spread of the pairs' overheads: their interquartile range and how many pairs there were."""
    if not overheads:
        return {"overhead_pairs": 0, "overhead_q25": None, "overhead_q75": None}
    q25, q75 = np.percentile(overheads, [25, 75])
    return {"overhead_pairs": len(overheads), "overhead_q25": float(q25), "overhead_q75": float(q75)}


def overhead_text(summary: dict) -> str:
    """"profiling overhead +1.2 % (IQR −0.8 % to +3.0 % over 5 interleaved pairs)": the figure and its spread."""
    text = f"profiling overhead {summary['overhead']:+.1%}"
    if summary.get("overhead_q25") is None:
        return text
    return (f"{text} (interquartile range {summary['overhead_q25']:+.1%} to {summary['overhead_q75']:+.1%} over "
            f"{summary['overhead_pairs']} interleaved pairs of steps; a range spanning 0 means the overhead is "
            "within the noise)")


def markdown(frame: pd.DataFrame, summaries: dict[str, dict]) -> str:
    """profile.md: per implementation, the layers of each phase with their share, rate and memory."""
    lines = ["# Where the time of a training step goes", "",
             "Per layer and phase: median time per step over the profiled steps (interquartile range), share of "
             "the profiled step, analytic GFLOP/s and % of peak (one figure for every implementation: the CPU's "
             "hardware float32 peak, else the best GEMM measured in the same run); memory allocated during the "
             "layer (net) and the peak inside it, where "
             "the framework tells.  n/a: not measured (or no FLOPs).", ""]
    for name, rows in frame.groupby("implementation", sort=False):
        summary = summaries[name]
        layers_total = rows["time_s"].sum()
        algorithm = summary.get("routing_algorithm", DEFAULT_ROUTING_ALGORITHM)
        routing = "" if algorithm == DEFAULT_ROUTING_ALGORITHM else f", {algorithm} routing"
        lines += [f"## {name} ({summary['framework']}, {summary['device']}, batch {summary['batch_size']}, "
                  f"{summary['config_name']} network{routing}, {summary['dtype']})", "",
                  f"Profiled step {fmt(summary['step_s'], 'ms')} ms (median of {summary['steps']}); the same step "
                  f"unprofiled {fmt(summary['unprofiled_step_s'], 'ms')} ms: {overhead_text(summary)}.  "
                  "The layers add up to "
                  f"{fmt(layers_total / summary['step_s'], 'pct')} of the profiled step (the rest is between the "
                  f"ranges).  Unprofiled, the step's {summary['ranges_per_step']} ranges cost "
                  f"{summary['ranges_per_step'] * summary['inactive_range_s'] * 1e6:.1f} µs "
                  f"({summary['inactive_ranges_share']:.4%} of it: {summary['inactive_range_s'] * 1e9:.0f} ns "
                  "each)." + (
                      "  Its layers run inside compiled graphs or captured ones, where no range can time them: "
                      "only the phases are timed." if summary.get("compiled") else "") + (
                      f"  Trace: `{TRACES}/{summary['trace']}`." if summary.get("trace") else ""), ""]
        plan = summary.get("plan") or {}
        if plan:
            lines += ["Convolution plan (forward / weight gradient / input gradient):", "",
                      *plan_lines({name: plan}), ""]
        cells = pd.DataFrame({
            "phase": rows["phase"], "layer": rows["layer"],
            "time ms (IQR)": [f"{fmt(t, 'ms')} ({fmt(a, 'ms')}–{fmt(b, 'ms')})" if not np.isnan(t) else "n/a"
                              for t, a, b in zip(rows["time_s"], rows["time_q25_s"], rows["time_q75_s"])],
            "share": [fmt(v, "pct") for v in rows["share"]],
            "GFLOP/s": [fmt(v, "rate") for v in rows["gflops_per_s"]],
            "% of peak": [fmt(v, "pct100") for v in rows["pct_of_peak"]],
            "allocated MiB": [fmt(v, "mib") for v in rows["memory_allocated_bytes"]],
            "peak MiB": [fmt(v, "mib") for v in rows["memory_peak_bytes"]],
        })
        lines += [markdown_table(cells, text_columns=2), ""]
    return "\n".join(lines)


# The command ------------------------------------------------------------------------------------------------


def choose(names: list[str] | None, device: str | None, config: CapsNetConfig
           ) -> list[registry.ImplementationInfo]:
    """The implementations to profile: those named (else every registered one) on ``device`` (else any)
    that can run here and compute ``config``'s routing algorithm and gradient.  ProfileError with one line
    when a name is unknown, a named one cannot run (the registry's reason), or none can."""
    try:
        infos = [registry.get(name) for name in names] if names else registry.entries()
    except registry.UnknownImplementationError as error:
        raise ProfileError(str(error)) from None
    if device:
        infos = [info for info in infos if info.device == device]
    runnable, reasons = [], []
    for info in infos:
        status = info.availability()
        if status:
            status = info.computes(config)
        if status:
            runnable.append(info)
        elif names:
            raise ProfileError(f"implementation {info.name!r} cannot run here: {status.reason}")
        else:
            reasons.append(f"{info.name}: {status.reason}")
    if not runnable:
        where = f"on {device} " if device else ""
        raise ProfileError(f"no implementation {where}can run here" + (f" ({reasons[0]}, ...)" if reasons else
                                                                        " (none is registered for it)"))
    return runnable


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=cli.prog("profile"), description=cli.description(__doc__))
    options.add_impl(parser, several=True, help="implementations to profile", default_help="every available one")
    options.add_config(parser)
    options.add_batch_size(parser, default=32, help="images per step")
    options.add_dtype(parser)
    options.add_routing_algorithm(parser, consequence="implementations without it are left out")
    options.add_routing_gradient(parser, consequence="implementations without it are left out")
    options.add_device(parser, help="only implementations on this device (default: any)")
    options.add_steps(parser, default=5,
                      help="profiled steps, interleaved with as many unprofiled ones for the overhead")
    options.add_warmup(parser, default=2)
    options.add_threads(parser)
    parser.add_argument("--gemm-size", type=options.positive_int,
                        help="size of the GEMM that measures the peak (default: 4096 on the CPU, 8192 on a GPU)")
    parser.add_argument("--no-memory", action="store_true", help="time only (default: also memory, where told)")
    options.add_out(parser, help=f"output folder (default: runs/{PROFILE_SUBDIR}, runs/{PROFILE_SUBDIR}/<algorithm> "
                                 "for a routing algorithm other than dynamic; not tracked by git)")
    return parser


def profiled_config(args: argparse.Namespace) -> CapsNetConfig:
    """The network profiled: ``--config`` with ``--routing-algorithm`` and ``--routing-gradient``; ProfileError
    (one line) for a routing gradient without meaning under the algorithm."""
    algorithm = routing_algorithms.get(args.routing_algorithm)
    if args.routing_gradient not in algorithm.routing_gradients:
        raise ProfileError(f"--routing-gradient {args.routing_gradient} has no meaning under --routing-algorithm "
                           f"{algorithm.name} (it has no iterations before its last): use --routing-gradient "
                           f"{' or '.join(algorithm.routing_gradients)}")
    return get_config(args.config).replace(routing_gradient=args.routing_gradient, routing_algorithm=algorithm.name)


def default_output(routing_algorithm: str) -> Path:
    """runs/profile/, or runs/profile/<algorithm>/ for a routing algorithm other than dynamic (``capsbench keep``
    copies both, and the report reads the dynamic one)."""
    folder = RUNS_DIR / PROFILE_SUBDIR
    return folder if routing_algorithm == DEFAULT_ROUTING_ALGORITHM else folder / routing_algorithm


# torch's profiler logs; a user's own settings win
QUIET_PROFILER_ENV = {"KINETO_LOG_LEVEL": "6", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def quiet_profiler_logs() -> None:
    """Keep torch's profiler out of the user's terminal.  kineto (the profiler's engine) logs a ``USDT: ...
    profiler_start`` and ``profiler_stop`` line around every profiled step, at a level above its errors
    (KINETO_LOG_LEVEL 6 is above all of them; it is read when the profiler first starts).  c10 warns
    ``CPUAllocator.cpp: Memory block of unknown size was allocated before the profiling started``: memory
    allocated before a profiled step and freed inside it, whose free the profiler cannot count (the
    per-layer memory, allocated net during each layer, does not need it); TORCH_CPP_LOG_LEVEL ERROR
    silences it, read when torch is imported, so this runs before anything imports torch."""
    for name, value in QUIET_PROFILER_ENV.items():
        os.environ.setdefault(name, value)


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_profiler_logs()
    config = profiled_config(args)
    infos = choose(args.impl, args.device, config)
    out = args.out or default_output(config.routing_algorithm)
    try:
        out = writable_folder(out)
    except OSError as error:
        raise UserError(unwritable_line(out, error, "the profile")) from None
    threads = args.threads or usable_cpu_count()
    set_threads(threads)
    routing = "" if config.routing_algorithm == DEFAULT_ROUTING_ALGORITHM else \
        f", {config.routing_algorithm} routing"
    print(f"profile of {', '.join(info.name for info in infos)} ({args.dtype}, {args.config} network{routing}, batch "
          f"{args.batch_size} of seeded synthetic images); results -> {out / MD_NAME}, {CSV_NAME} and {JSON_NAME} "
          f"beside it", flush=True)
    peaks, rows, summaries = {}, [], {}
    hardware = machine_hardware_peak()
    range_seconds = inactive_range_seconds()
    for info in infos:
        backend = backend_of(info.framework, info.device)
        if backend not in peaks:
            peaks[backend] = gemm_peak_gflops(backend, size=args.gemm_size)
        print(f"profiling {info.name}: {args.warmup} warm-up, then {args.steps} unprofiled and {args.steps} "
              f"profiled steps interleaved, at batch {args.batch_size} ...", file=sys.stderr, flush=True)
        try:
            profiled = profile_implementation(info, config, args.batch_size, args.dtype, args.steps, args.warmup,
                                              out / TRACES, memory=not args.no_memory)
        except Exception as error:  # one failing implementation must not hide the others' profiles
            print(f"error: profiling {info.name} failed: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        rows += profile_rows(profiled, config, args.batch_size, args.dtype, args.config,
                             one_peak(info.device, hardware, peaks))
        summaries[info.name] = implementation_summary(profiled, args.batch_size, args.config, args.dtype,
                                                      range_seconds)
        summaries[info.name]["routing_algorithm"] = config.routing_algorithm
        summaries[info.name]["routing_gradient"] = config.routing_gradient
    if not rows:
        raise UserError("no implementation could be profiled", EXIT_FAILURE)
    frame = pd.DataFrame(rows, columns=CSV_COLUMNS)
    with atomic_output(out / CSV_NAME) as temporary:
        frame.to_csv(temporary, index=False)
    write_text_atomic(out / MD_NAME, markdown(frame, summaries))
    write_json_atomic(out / JSON_NAME, {"kind": PROFILE_KIND, "format_version": 1, "threads": thread_facts(),
                                        "gemm_peak_gflops": peaks, "hardware_peak": hardware,
                                        "peak_sentence": peak_sentence(hardware, peaks), "machine": machine_facts(),
                                        "implementations": summaries})
    for name, summary in summaries.items():
        print(f"{name}: step {summary['step_s'] * 1e3:.1f} ms profiled, {summary['unprofiled_step_s'] * 1e3:.1f} ms "
              f"unprofiled ({overhead_text(summary)})")
    print(f"profile written to {out / MD_NAME} ({len(summaries)} implementation(s); {out / CSV_NAME})")
    return 0 if len(summaries) == len(infos) else 1


if __name__ == "__main__":
    sys.exit(main())
