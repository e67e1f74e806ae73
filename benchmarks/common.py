"""What every capsbench benchmark shares: the parameter grid, availability, prepared models, machine facts.

The grid is implementation x batch size x routing iterations (the routing-alone benchmarks sweep more
iteration counts than the whole-network ones, whose cost barely depends on them), and, for the work the
routing gradient changes (:class:`GradientBenchmark`: train step, backward, routing forward + backward),
the profile's routing gradients; then, last (so the positions of the earlier parameters, and with them every
older result, keep their meaning), the routing algorithm (:data:`ROUTING_ALGORITHMS`).  An algorithm that is
not iterative (self-attention) is measured at one iteration count of each grid alone
(:func:`harness.suite.sizes.measured_iterations`), its other cells skipped at once; an algorithm without
the grid point's routing gradient, and an implementation that does not compute the algorithm
(``ImplementationInfo.computes``), are skipped with the reason.  Implementations are every
name the registry knows (built-in, added later, or installed through the entry point), always, so that
every run describes the same grid and no earlier result loses its labels.  One that cannot run here, one
left out by ``CAPSBENCH_IMPLEMENTATIONS``, or a combination that runs out of memory is skipped through
asv's own mechanism (``NotImplementedError`` in ``setup``, with the reason), and a skip never erases a
figure an earlier run stored (asv.conf.json's plugin, :mod:`harness.suite.asv_keep_figures`).  A name in
``CAPSBENCH_IMPLEMENTATIONS`` that this environment does not register ends the run at import, before any
benchmark (:func:`selected_implementations`).  Sizes come from a profile of
:mod:`harness.suite.sizes`, chosen with ``CAPSBENCH_PROFILE`` (scikit-learn's asv suite does the same).

Importing this module must never touch a GPU: asv imports the suite once in a fork server and forks a
process per benchmark, and CUDA does not survive a fork.  Availability is checked in ``setup`` only.

Set-up work stays out of the timed region: the model is built, moved to its device and warmed up in
``setup`` by one call of the operation the benchmark times (lazy initialisation, CUDA context, kernel
compilation and cuDNN's algorithm choice all happen there), and every timed call ends with
``synchronize()``.  Every benchmark's ``setup`` also writes the machine facts beside the run's results
(:func:`setup_benchmark`, through :mod:`harness.suite.asv_facts`), whatever subset of the suite runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from harness import contract, registry, routing_algorithms
from harness.data import synthetic_batch
from harness.measure.step_memory import is_out_of_memory
from harness.params import init_parameters
from harness.settings import IMPLEMENTATIONS_ENV, THREADS_ENV
from harness.spec import DEFAULT_ROUTING_ALGORITHM, CapsNetConfig, get_config
from harness.suite import asv_facts
from harness.suite.sizes import (
    load_suite_profile,
    measured_iterations,
    profile_left_out_reason,
    routing_gradients,
)
from harness.suite.sizes import routing_algorithms as profile_routing_algorithms
from harness.threads import set_threads, usable_cpu_count

DTYPE = "float32"
DATA_SEED = 0
PLUGIN_HINT = ("An installed plugin, or a module of implementations/ not on the commit asv builds, reaches the "
               "suite only through `asv run --python=same` from the environment it is installed in "
               "(docs/plugins.md).")


class UnknownImplementationsError(ValueError):
    """$CAPSBENCH_IMPLEMENTATIONS names an implementation this environment does not register."""


def selected_implementations() -> set[str]:
    """The names in $CAPSBENCH_IMPLEMENTATIONS (comma separated; all when unset).

    A name that no implementation registers in this environment raises :class:`UnknownImplementationsError`,
    one line with the known names.  The suite calls this at import, so a misspelt name, or a plugin or an
    uncommitted module that the environment asv benchmarks in cannot see, ends ``asv run`` at discovery,
    before any benchmark runs and before any result is written, instead of skipping every cell."""
    wanted = os.environ.get(IMPLEMENTATIONS_ENV)
    if not wanted:
        return set(registry.names())
    chosen = {name.strip() for name in wanted.split(",") if name.strip()}
    unknown = sorted(chosen - set(registry.names()))
    if unknown:
        raise UnknownImplementationsError(
            f"{IMPLEMENTATIONS_ENV} names {', '.join(map(repr, unknown))}, which no implementation registers in "
            f"the environment asv benchmarks in ({sys.executable}); known implementations: "
            f"{', '.join(registry.names())}. {PLUGIN_HINT}")
    return chosen


PROFILE_NAME, PROFILE = load_suite_profile()
CONFIG = get_config(PROFILE["config"])
IMPLEMENTATIONS = registry.names()
try:
    SELECTED = selected_implementations()
except UnknownImplementationsError as error:
    raise SystemExit(f"capsbench's asv suite: {error}") from None  # asv prints this line, not a traceback
BATCH_SIZES = PROFILE["batch_sizes"]
ROUTING_ITERATIONS = PROFILE["routing_iterations"]
STEP_ROUTING_ITERATIONS = PROFILE["step_routing_iterations"]
ROUTING_GRADIENTS = routing_gradients(PROFILE)


def grid_routing_algorithms(profile: dict) -> list[str]:
    """The routing algorithms of the grid: the profile's (:func:`harness.suite.sizes.routing_algorithms`), then
    every other one an installed plugin registered (measured by the implementations that compute it)."""
    chosen = profile_routing_algorithms(profile)
    return chosen + [name for name in routing_algorithms.names() if name not in chosen
                     and not routing_algorithms.get(name).builtin]


ROUTING_ALGORITHMS = grid_routing_algorithms(PROFILE)
CHECK_BATCH_SIZE = PROFILE["check_batch_size"]
THREADS = int(os.environ.get(THREADS_ENV) or usable_cpu_count())


def left_out_reason(name: str) -> str | None:
    """Why the suite's settings leave ``name`` out of every benchmark (not selected, or left out by the profile:
    :func:`harness.suite.sizes.profile_left_out_reason`), as what follows the name ("is left out by ...");
    None when they do not.  Cheap: nothing is imported or started, so every benchmark process can record it in
    the facts."""
    if name not in SELECTED:
        return f"is left out by {IMPLEMENTATIONS_ENV}"
    if os.environ.get(IMPLEMENTATIONS_ENV):
        return None
    return profile_left_out_reason(PROFILE_NAME, PROFILE, name, registry.get(name).cls)


def not_measured_reason(algorithm: str, iterations: int, grid, routing_gradient: str = "full") -> str | None:
    """Why the grid point (``iterations`` of the iteration ``grid``, ``routing_gradient``) is not measured under
    the routing ``algorithm`` whatever the implementation, or None where it is: an algorithm that is not
    iterative at every count but :func:`harness.suite.sizes.measured_iterations` (the count means nothing to
    it: one measurement, not several of the same work), and a routing gradient the algorithm does not have
    (self-attention has ``full`` alone).  Cheap: asv skips these cells at once."""
    known = routing_algorithms.get(algorithm)
    if not known.iterative:
        measured = measured_iterations(grid, CONFIG.routing_iterations)
        if int(iterations) != measured:
            return (f"{algorithm} routing is not iterative: measured at {measured} routing iterations alone "
                    "(the count means nothing to it)")
    if routing_gradient not in known.routing_gradients:
        return (f"{algorithm} routing has the routing gradient {' and '.join(known.routing_gradients)} only, "
                f"not {routing_gradient!r}")
    return None


def point_config(iterations: int, grid, routing_gradient: str = "full",
                 routing_algorithm: str = DEFAULT_ROUTING_ALGORITHM) -> CapsNetConfig:
    """The suite's network at one grid point, or NotImplementedError (asv: skipped) with
    :func:`not_measured_reason`."""
    reason = not_measured_reason(routing_algorithm, iterations, grid, routing_gradient)
    if reason:
        raise NotImplementedError(reason)
    return CONFIG.replace(routing_iterations=int(iterations), routing_gradient=routing_gradient,
                          routing_algorithm=routing_algorithm)


def require_available(name: str, config: CapsNetConfig | None = None) -> registry.ImplementationInfo:
    """The registry entry, or NotImplementedError (asv: skipped) saying why it does not run: left out
    (:func:`left_out_reason`), unavailable here, or not computing ``config``'s routing algorithm or routing
    gradient (``ImplementationInfo.computes``; default: the suite's network as the profile gives it)."""
    reason = left_out_reason(name)
    if reason:
        raise NotImplementedError(f"{name} {reason}")
    info = registry.get(name)
    status = info.availability()
    if not status:
        raise NotImplementedError(f"{name} is unavailable here: {status.reason}")
    support = info.computes(CONFIG if config is None else config)
    if not support:
        raise NotImplementedError(f"{name} {support.reason}")
    return info


# Machine facts beside the results (harness.suite.asv_facts writes them) -----------------------------------------


def record_facts() -> None:
    """Write the facts asv does not record beside the run's results, once per benchmark process
    (:func:`harness.suite.asv_facts.write_run_facts` with this suite's threads and profile)."""
    asv_facts.write_run_facts(THREADS, PROFILE_NAME, lambda: {
        name: reason for name in registry.names() if (reason := left_out_reason(name))})


def record_plan_facts(name: str, impl: contract.Implementation) -> None:
    """Add the plans ``impl`` chose for its batch shapes to the run's facts
    (:func:`harness.suite.asv_facts.add_plan_facts`), the facts written first if this process has not yet."""
    record_facts()
    asv_facts.add_plan_facts(name, impl)


def setup_benchmark(name: str, config: CapsNetConfig | None = None) -> registry.ImplementationInfo:
    """What every benchmark's ``setup`` does first: write the run's facts (:func:`record_facts`), then the
    registry entry of ``name``, or asv's skip with the reason (:func:`require_available` for ``config``)."""
    record_facts()
    return require_available(name, config)


# Prepared models -------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    impl: contract.Implementation
    batch: contract.Batch


_prepared: dict[tuple, Prepared] = {}


WARM_UPS = {
    "train_step": lambda impl, batch: impl.train_step(batch),
    "forward": lambda impl, batch: impl.forward_loss(batch),
    "backward": lambda impl, batch: (impl.forward_loss(batch), impl.backward()),
    "inference": lambda impl, batch: impl.forward(batch, train=False),
    None: lambda impl, batch: None,  # the benchmark warms up itself
}


def build(name: str, batch_size: int, iterations: int, warm_up: str | None, routing_gradient: str = "full",
          routing_algorithm: str = DEFAULT_ROUTING_ALGORITHM, grid=None) -> Prepared:
    """A built implementation and a batch on its device, warmed up by one ``warm_up`` call (see
    :data:`WARM_UPS`), for the grid point (``iterations`` of the iteration ``grid``, default
    :data:`STEP_ROUTING_ITERATIONS`); a point its routing algorithm skips (:func:`point_config`), an
    implementation that cannot run it (:func:`setup_benchmark`) and a combination that runs out of memory raise
    NotImplementedError (asv: skipped)."""
    record_facts()
    config = point_config(iterations, STEP_ROUTING_ITERATIONS if grid is None else grid, routing_gradient,
                          routing_algorithm)
    info = setup_benchmark(name, config)
    set_threads(THREADS)
    with skipped_when_out_of_memory(name, batch_size):
        impl = info.create(config, init_parameters(config), DTYPE)
        batch = impl.to_device(*synthetic_batch(config, batch_size, seed=DATA_SEED))
        WARM_UPS[warm_up](impl, batch)
        impl.synchronize()
        record_plan_facts(name, impl)
    return Prepared(impl, batch)


@contextlib.contextmanager
def skipped_when_out_of_memory(name: str, batch_size: int) -> Iterator[None]:
    """Running out of memory inside the block is a NotImplementedError (asv: skipped) naming the
    implementation and the batch; every other error passes through."""
    try:
        yield
    except Exception as error:
        if is_out_of_memory(error):
            raise NotImplementedError(f"{name} runs out of memory at batch {batch_size}: {error}") from None
        raise


def prepare(name: str, batch_size: int, iterations: int, warm_up: str | None, routing_gradient: str = "full",
            routing_algorithm: str = DEFAULT_ROUTING_ALGORITHM, grid=None) -> Prepared:
    """:func:`build`, once per process: asv runs ``setup`` again before every sample."""
    grid = tuple(STEP_ROUTING_ITERATIONS if grid is None else grid)
    key = (name, batch_size, iterations, warm_up, routing_gradient, routing_algorithm, grid)
    if key not in _prepared:
        _prepared[key] = build(name, batch_size, iterations, warm_up, routing_gradient, routing_algorithm, grid)
    return _prepared[key]


class ModelBenchmark:
    """Base class: the grid (its routing algorithm last), and ``self.impl`` / ``self.batch`` ready (and warmed
    up) before every sample.  A subclass may sweep another iteration grid (``params[2]``)."""

    params = [IMPLEMENTATIONS, BATCH_SIZES, STEP_ROUTING_ITERATIONS, ROUTING_ALGORITHMS]
    param_names = ["implementation", "batch_size", "routing_iterations", "routing_algorithm"]
    timeout = 900
    warm_up = "train_step"

    def setup(self, name: str, batch_size: int, iterations: int,
              routing_algorithm: str = DEFAULT_ROUTING_ALGORITHM) -> None:
        prepared = prepare(name, batch_size, iterations, self.warm_up, "full", routing_algorithm, self.params[2])
        self.impl, self.batch = prepared.impl, prepared.batch


class GradientBenchmark(ModelBenchmark):
    """A benchmark of work the routing gradient changes: the grid gains the profile's routing gradients
    (:data:`ROUTING_GRADIENTS`) before the routing algorithm; an implementation or an algorithm without one
    is skipped with the reason."""

    params = [*ModelBenchmark.params[:3], ROUTING_GRADIENTS, ROUTING_ALGORITHMS]
    param_names = [*ModelBenchmark.param_names[:3], "routing_gradient", "routing_algorithm"]

    def setup(self, name: str, batch_size: int, iterations: int, routing_gradient: str = "full",
              routing_algorithm: str = DEFAULT_ROUTING_ALGORITHM) -> None:
        prepared = prepare(name, batch_size, iterations, self.warm_up, routing_gradient, routing_algorithm,
                           self.params[2])
        self.impl, self.batch = prepared.impl, prepared.batch
