"""The asv suite's size profiles (its grid at each size), not to be confused with :mod:`harness.profile`,
the per-layer profiler.

Shared by the suite (``benchmarks/``) and the report, so neither writes these twice.  As in
scikit-learn's asv suite, a profile is chosen with an environment variable, ``CAPSBENCH_PROFILE``.
Only ever append a profile: results of an existing one stay comparable with earlier runs.
``routing_iterations`` is the grid of the routing-alone benchmarks, ``step_routing_iterations`` that of
every whole-network benchmark (whose cost barely depends on it).  ``compiled`` says whether the
implementations whose first step compiles or captures (torch.compile, CUDA graphs) run: asv measures every
grid point in a fresh process, so they compile again in each, which on a CPU costs more than the whole
quick pass; the quick profiles leave them to the others (or to a name in ``CAPSBENCH_IMPLEMENTATIONS``).
``routing_gradients`` (default ``["full"]``) is the grid of the routing gradient
(:data:`harness.spec.ROUTING_GRADIENTS`) in the benchmarks whose work it changes (train step, backward,
routing forward + backward): the profiles that sweep routing measure both, to show what ``final`` saves.
"""

from __future__ import annotations

import os

from harness.settings import PROFILE_ENV

DEFAULT_PROFILE = "fast"
PROFILES: dict[str, dict] = {
    "smoke": {"config": "small", "batch_sizes": [4], "routing_iterations": [3], "step_routing_iterations": [3],
              "check_batch_size": 4, "compiled": False},
    "fast": {"config": "paper", "batch_sizes": [32, 128], "routing_iterations": [1, 3, 5],
             "step_routing_iterations": [3], "check_batch_size": 8, "compiled": False,
             "routing_gradients": ["full", "final"]},
    "regular": {"config": "paper", "batch_sizes": [16, 32, 64, 128], "routing_iterations": [1, 2, 3, 5],
                "step_routing_iterations": [1, 3], "check_batch_size": 8, "compiled": True,
                "routing_gradients": ["full", "final"]},
    "large": {"config": "paper", "batch_sizes": [32, 64, 128, 256, 512], "routing_iterations": [1, 3, 5, 10],
              "step_routing_iterations": [1, 3, 5], "check_batch_size": 8, "compiled": True,
              "routing_gradients": ["full", "final"]},
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
