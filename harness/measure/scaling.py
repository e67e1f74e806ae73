"""The figures of a data-parallel scaling run (``python -m harness.scaling``), for the table the command prints
and for the report: the scaling efficiency against the compute used, why a figure is not reliable, and the
exposed all-reduce of paired steps."""

from __future__ import annotations

import statistics


def compute_units(run: dict, device: str) -> int:
    """What a run computes with: ranks x threads per rank on the CPU, ranks on GPUs."""
    return run["world_size"] * (run["threads_per_rank"] if device == "cpu" else 1)


def scaling_efficiency(run: dict, base: dict, device: str) -> float:
    """Speed-up of ``run`` over ``base`` (images/s) divided by the growth of the compute used: 1.0 is
    linear scaling in the compute."""
    speedup = run["images_per_second"] / base["images_per_second"]
    return speedup / (compute_units(run, device) / compute_units(base, device))


MIN_RELIABLE_STEPS = 10  # fewer timed steps per world size: the efficiency is a guess


def relative_spread(run: dict) -> float | None:
    """Half the interquartile range of a run's step times over their median (None in older files)."""
    q25, q75 = run.get("step_seconds_q25"), run.get("step_seconds_q75")
    if q25 is None or q75 is None or not run.get("step_seconds"):
        return None
    return (q75 - q25) / 2 / run["step_seconds"]


def efficiency_caveat(run: dict, base: dict, device: str) -> str:
    """Why the scaling efficiency of ``run`` against ``base`` is not reliable, or "" when it is: fewer than
    :data:`MIN_RELIABLE_STEPS` timed steps, or step times spread more than the efficiency departs from 1
    (linear scaling), so that the figure cannot tell better from worse than linear."""
    if run is base:
        return ""
    steps = min(run.get("steps", 0), base.get("steps", 0))
    if steps < MIN_RELIABLE_STEPS:
        return f"from {steps} timed step(s), fewer than the {MIN_RELIABLE_STEPS} a reliable figure needs"
    spreads = [relative_spread(run), relative_spread(base)]
    if None in spreads:
        return ""
    spread, effect = sum(spreads), abs(scaling_efficiency(run, base, device) - 1)
    if spread > effect:
        return (f"the step times spread by ±{spread:.0%} (half their interquartile ranges, both world sizes), "
                f"more than the {effect:.0%} the efficiency departs from linear")
    return ""


def exposed_allreduce(synced: list[float], local: list[float]) -> float:
    """The median over adjacent pairs of (DDP step - the same step under no_sync()), floored at 0."""
    return max(0.0, statistics.median(with_sync - without for with_sync, without in zip(synced, local)))
