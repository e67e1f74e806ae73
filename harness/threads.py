"""Fix the number of CPU threads every library uses, and say what they are, so timings are comparable.

torch has its own intra-op pool (``torch.set_num_threads``); NumPy's BLAS (OpenBLAS or MKL) and OpenMP
runtimes are set through threadpoolctl, which works after the libraries are loaded.  The default count is
the CPUs this process may actually run on: its affinity mask (``taskset``, ``asv run --cpu-affinity``)
and the container's CPU quota (cgroup ``cpu.max``), not ``os.cpu_count()``, which counts the machine's.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from threadpoolctl import threadpool_info, threadpool_limits

_limits = []  # keeps threadpool_limits alive: the limit holds until the object is restored
_other_pools: dict = {}  # name -> function giving a pool's thread count (None: not in use), see register_thread_pool
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# the environment variables that size the thread pools (OpenMP, MKL, OpenBLAS) a process starts with
THREAD_ENV_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> int | None:
    """CPUs the cgroup quota allows (``cpu.max`` "QUOTA PERIOD", rounded up), None without a quota."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def usable_cpu_count() -> int:
    """The CPUs this process may run on: the affinity mask, capped by the cgroup quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(count, limit) if limit else count


def set_threads(count: int) -> None:
    """Use ``count`` threads in torch (if imported), BLAS and OpenMP from now on."""
    if count < 1:
        raise ValueError(f"thread count must be at least 1, got {count}")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)
    _limits.append(threadpool_limits(limits=count))


def register_thread_pool(name: str, threads) -> None:
    """Have :func:`thread_facts` record another library's pool, which neither torch's count nor threadpoolctl
    reaches (XLA's CPU pool): ``threads()`` returns its thread count, or None where it is not in use."""
    _other_pools[name] = threads


def recorded_pools() -> set[str]:
    """The pools :func:`register_thread_pool` added: recorded as they are, not set by :func:`set_threads`."""
    return set(_other_pools)


def thread_facts() -> dict:
    """Threads of each loaded pool: torch, and every BLAS/OpenMP library threadpoolctl sees."""
    facts = {
        f"{pool['internal_api']}:{pool.get('prefix', '')}": pool["num_threads"] for pool in threadpool_info()
    }
    if "torch" in sys.modules:
        facts["torch"] = sys.modules["torch"].get_num_threads()
    for name, threads in _other_pools.items():
        count = threads()
        if count is not None:
            facts[name] = count
    return facts
