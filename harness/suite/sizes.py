"""The asv suite's size profiles (its grid at each size), not to be confused with :mod:`harness.profile`,
the per-layer profiler.

Shared by the suite (``benchmarks/``) and the report, so neither writes these twice.  As in
scikit-learn's asv suite, a profile is chosen with an environment variable, ``CAPSBENCH_PROFILE``.
Only ever append a profile: results of an existing one stay comparable with earlier runs.
``routing_iterations`` is the grid of the routing-alone benchmarks, ``step_routing_iterations`` that of
every whole-network benchmark (whose cost barely depends on it).  ``compiled`` says whether the
implementations whose first step compiles or captures again in every process (torch.compile, CUDA graphs)
run: asv measures every grid point in a fresh process, so they compile again in each, which on a CPU costs
more than the whole quick pass; the quick profiles leave them to the others (or to a name in
``CAPSBENCH_IMPLEMENTATIONS``).  An implementation whose compiled programs persist between processes
(``compile_cache_persists``: JAX's persistent compilation cache) compiles once per shape and machine, so it
runs in every profile.  ``left_out`` names what a profile leaves out for its cost alone, with the reason
(``jax-looped`` in the quick ones).  :func:`profile_left_out_reason` applies both rules.
``routing_gradients`` (default ``["full"]``) is the grid of the routing gradient
(:data:`harness.spec.ROUTING_GRADIENTS`) in the benchmarks whose work it changes (train step, backward,
routing forward + backward): the profiles that sweep routing measure both, to show what ``final`` saves.
``routing_algorithms`` (default ``["dynamic"]``) is the grid of the routing algorithm
(:data:`harness.spec.ROUTING_ALGORITHMS`) in the phase, routing-alone and memory benchmarks: the CPU profiles
measure both built-ins.  An algorithm that is not iterative (``RoutingAlgorithm.iterative``: self-attention)
is measured at one routing-iteration count of each grid alone, :func:`measured_iterations`; the suite skips
its other cells and the report leaves them out.
"""

from __future__ import annotations

import os

from harness.settings import IMPLEMENTATIONS_ENV, PROFILE_ENV
from harness.spec import DEFAULT_ROUTING_ALGORITHM, ROUTING_ALGORITHMS

DEFAULT_PROFILE = "fast"
# what the quick profiles leave out for its cost alone: a paper-network step of jax-looped took 2.4 s at batch
# 32 and 17 s at 128 on the 2-core Xeon VM (disturbed by other work), jax-vectorised 0.4 s and 5 s there
QUICK_LEFT_OUT = {"jax-looped": "takes seconds a step on a CPU (its routing unrolls into one small program per "
                                "output capsule)"}
PROFILES: dict[str, dict] = {
    "smoke": {"config": "small", "batch_sizes": [4], "routing_iterations": [3], "step_routing_iterations": [3],
              "check_batch_size": 4, "compiled": False, "left_out": QUICK_LEFT_OUT,
              "routing_algorithms": list(ROUTING_ALGORITHMS)},
    "fast": {"config": "paper", "batch_sizes": [32, 128], "routing_iterations": [1, 3, 5],
             "step_routing_iterations": [3], "check_batch_size": 8, "compiled": False,
             "routing_gradients": ["full", "final"], "left_out": QUICK_LEFT_OUT,
             "routing_algorithms": list(ROUTING_ALGORITHMS)},
    "regular": {"config": "paper", "batch_sizes": [16, 32, 64, 128], "routing_iterations": [1, 2, 3, 5],
                "step_routing_iterations": [1, 3], "check_batch_size": 8, "compiled": True,
                "routing_gradients": ["full", "final"], "routing_algorithms": list(ROUTING_ALGORITHMS)},
    "large": {"config": "paper", "batch_sizes": [32, 64, 128, 256, 512], "routing_iterations": [1, 3, 5, 10],
              "step_routing_iterations": [1, 3, 5], "check_batch_size": 8, "compiled": True,
              "routing_gradients": ["full", "final"], "routing_algorithms": list(ROUTING_ALGORITHMS)},
    # one GPU machine in a few minutes (harness.gpu_benchmark): the batch sweep, routing at the paper's count
    "gpu": {"config": "paper", "batch_sizes": [32, 128, 512], "routing_iterations": [3],
            "step_routing_iterations": [3], "check_batch_size": 8, "compiled": True},
    # the compiling implementations on a GPU lease (harness.gpu_benchmark): batch 128 only, each shape compiles
    "gpu-compiled": {"config": "paper", "batch_sizes": [128], "routing_iterations": [3],
                     "step_routing_iterations": [3], "check_batch_size": 8, "compiled": True},
}


def routing_gradients(profile: dict) -> list[str]:
    """The routing gradients a suite profile measures (``full`` alone where it names none)."""
    return list(profile.get("routing_gradients", ["full"]))


def routing_algorithms(profile: dict) -> list[str]:
    """The routing algorithms a suite profile measures (``dynamic`` alone where it names none)."""
    return list(profile.get("routing_algorithms", [DEFAULT_ROUTING_ALGORITHM]))


def measured_iterations(grid, default: int) -> int:
    """The one routing-iteration count of ``grid`` at which a routing algorithm that is not iterative is
    measured: the network's ``default`` where the grid has it, else the nearest count (the lower of two as
    near).  The suite skips the grid's other counts for it; the report reads the same rule to tell those
    cells from skips (and picks the whole-network benchmarks' count the same way)."""
    counts = sorted({int(count) for count in grid})
    if not counts:
        raise ValueError("an empty routing-iteration grid")
    return min(counts, key=lambda count: (abs(count - default), count))


def load_suite_profile(name: str | None = None) -> tuple[str, dict]:
    """The named suite profile and its grid (default: $CAPSBENCH_PROFILE, else 'fast'); an unknown name
    lists the known."""
    name = name or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    try:
        return name, PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown benchmark profile {name!r} (from ${PROFILE_ENV}): choose one of {', '.join(PROFILES)}"
        ) from None


def profile_left_out_reason(profile_name: str, profile: dict, name: str, cls: type) -> str | None:
    """Why the named suite profile leaves the implementation ``name`` (class ``cls``) out, as what follows the
    name ("compiles again ..."), or None where it runs: a quick profile leaves out what compiles or captures
    again in every benchmark process (``first_call_compiles`` without ``compile_cache_persists``) and what its
    ``left_out`` names for cost.  A larger profile, or the name in $CAPSBENCH_IMPLEMENTATIONS, runs either."""
    instead = f"the {profile_name} profile leaves it out ({PROFILE_ENV}=regular, or name it in {IMPLEMENTATIONS_ENV})"
    if cls.first_call_compiles and not cls.compile_cache_persists and not profile["compiled"]:
        return f"compiles again in every benchmark process: {instead}"
    if name in profile.get("left_out", {}):
        return f"{profile['left_out'][name]}: {instead}"
    return None
