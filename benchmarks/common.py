"""What every capsbench benchmark shares: the parameter grid, availability, prepared models, device sync.

The grid is implementation x batch size x routing iterations (the routing-alone benchmarks sweep more
iteration counts than the whole-network ones, whose cost barely depends on them).  Implementations are every name the
registry knows (built-in, added later, or installed through the entry point); one that cannot run here,
or a combination that runs out of memory, is skipped through asv's own mechanism (``NotImplementedError``
in ``setup``, with the reason printed).  Sizes come from a profile of :mod:`harness.profiles`, chosen with
``CAPSBENCH_PROFILE`` (scikit-learn's asv suite does the same with its fast / regular / large profiles).

Importing this module must never touch a GPU: asv imports the suite once in a fork server and forks a
process per benchmark, and CUDA does not survive a fork.  Availability is checked in ``setup`` only.

Set-up work stays out of the timed region: the model is built, moved to its device and warmed up in
``setup`` by one call of the operation the benchmark times (lazy initialisation, CUDA context, kernel
compilation and cuDNN's algorithm choice all happen there), and every timed call ends with
``synchronize()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from harness import registry
from harness.data import synthetic_batch
from harness.params import init_parameters
from harness.profiles import load_profile
from harness.spec import get_config
from harness.threads import set_threads

THREADS_ENV = "CAPSBENCH_THREADS"
IMPLEMENTATIONS_ENV = "CAPSBENCH_IMPLEMENTATIONS"
DTYPE = "float32"
DATA_SEED = 0


def selected_implementations() -> list[str]:
    """Every registered name, or those listed in $CAPSBENCH_IMPLEMENTATIONS (comma separated)."""
    wanted = os.environ.get(IMPLEMENTATIONS_ENV)
    names = registry.names()
    if not wanted:
        return names
    chosen = [name.strip() for name in wanted.split(",") if name.strip()]
    for name in chosen:
        registry.get(name)  # an unknown name fails here, with the known ones listed
    return chosen


PROFILE_NAME, PROFILE = load_profile()
CONFIG = get_config(PROFILE["config"])
IMPLEMENTATIONS = selected_implementations()
BATCH_SIZES = PROFILE["batch_sizes"]
ROUTING_ITERATIONS = PROFILE["routing_iterations"]
STEP_ROUTING_ITERATIONS = PROFILE["step_routing_iterations"]
CHECK_BATCH_SIZE = PROFILE["check_batch_size"]
THREADS = int(os.environ.get(THREADS_ENV) or os.cpu_count() or 1)


def require_available(name: str) -> registry.ImplementationInfo:
    """The registry entry, or NotImplementedError (asv: skipped) saying why it cannot run here."""
    info = registry.get(name)
    status = info.availability()
    if not status:
        raise NotImplementedError(f"{name} is unavailable here: {status.reason}")
    return info


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, torch.cuda.OutOfMemoryError, cupy's OutOfMemoryError, or an allocator's OOM message."""
    return isinstance(error, MemoryError) or "OutOfMemory" in type(error).__name__ or "out of memory" in str(error)


@dataclass
class Prepared:
    impl: registry.Implementation
    batch: registry.Batch


_prepared: dict[tuple, Prepared] = {}


WARM_UPS = {
    "train_step": lambda impl, batch: impl.train_step(batch),
    "forward": lambda impl, batch: impl.forward_loss(batch),
    "backward": lambda impl, batch: (impl.forward_loss(batch), impl.backward()),
    "inference": lambda impl, batch: impl.forward(batch, train=False),
    None: lambda impl, batch: None,  # the benchmark warms up itself
}


def build(name: str, batch_size: int, iterations: int, warm_up: str | None) -> Prepared:
    """A built implementation and a batch on its device, warmed up by one ``warm_up`` call (see
    :data:`WARM_UPS`); a combination that runs out of memory raises NotImplementedError (asv: skipped)."""
    info = require_available(name)
    set_threads(THREADS)
    config = CONFIG.replace(routing_iterations=iterations)
    try:
        impl = info.create(config, init_parameters(config), DTYPE)
        batch = impl.to_device(*synthetic_batch(config, batch_size, seed=DATA_SEED))
        WARM_UPS[warm_up](impl, batch)
        impl.synchronize()
    except Exception as error:
        if is_out_of_memory(error):
            raise NotImplementedError(f"{name} runs out of memory at batch {batch_size}: {error}") from None
        raise
    return Prepared(impl, batch)


def prepare(name: str, batch_size: int, iterations: int, warm_up: str | None) -> Prepared:
    """:func:`build`, once per process: asv runs ``setup`` again before every sample."""
    key = (name, batch_size, iterations, warm_up)
    if key not in _prepared:
        _prepared[key] = build(name, batch_size, iterations, warm_up)
    return _prepared[key]


class ModelBenchmark:
    """Base class: the grid, and ``self.impl`` / ``self.batch`` ready (and warmed up) before every sample."""

    params = [IMPLEMENTATIONS, BATCH_SIZES, STEP_ROUTING_ITERATIONS]
    param_names = ["implementation", "batch_size", "routing_iterations"]
    timeout = 900
    warm_up = "train_step"

    def setup(self, name: str, batch_size: int, iterations: int) -> None:
        prepared = prepare(name, batch_size, iterations, self.warm_up)
        self.impl, self.batch = prepared.impl, prepared.batch
