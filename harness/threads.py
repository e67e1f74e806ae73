"""Fix the number of CPU threads every library uses, and say what they are, so timings are comparable.

torch has its own intra-op pool (``torch.set_num_threads``); NumPy's BLAS (OpenBLAS or MKL) and OpenMP
runtimes are set through threadpoolctl, which works after the libraries are loaded.
"""

from __future__ import annotations

import sys

from threadpoolctl import threadpool_info, threadpool_limits

_limits = []  # keeps threadpool_limits alive: the limit holds until the object is restored


def set_threads(count: int) -> None:
    """Use ``count`` threads in torch (if imported), BLAS and OpenMP from now on."""
    if count < 1:
        raise ValueError(f"thread count must be at least 1, got {count}")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)
    _limits.append(threadpool_limits(limits=count))


def thread_facts() -> dict:
    """Threads of each loaded pool: torch, and every BLAS/OpenMP library threadpoolctl sees."""
    facts = {
        f"{pool['internal_api']}:{pool.get('prefix', '')}": pool["num_threads"] for pool in threadpool_info()
    }
    if "torch" in sys.modules:
        facts["torch"] = sys.modules["torch"].get_num_threads()
    return facts
