"""The routing algorithms capsbench knows, by name: the map from the prediction vectors u_hat to the output
capsules v, a dimension of every measurement beside the routing variant (vectorised / looped) and the
routing gradient (full / final).

The built-in algorithms (:data:`harness.spec.ROUTING_ALGORITHMS`: ``dynamic``, ``self-attention``) are
defined in :mod:`harness.spec`'s docstring and computed by every built-in implementation with its own code;
their float64 reference is ``torch-vectorised``.  A plugin brings a new one with
:func:`register_routing_algorithm` (importable from :mod:`harness.registry`, where it registers its
implementations): a :class:`RoutingAlgorithm` with its name, the canonical parameters it adds to the
network (names, shapes, initial values) and its ``reference``, a differentiable torch function of u_hat and
those parameters.  ``torch-vectorised`` then computes the algorithm with that function, so it is the
float64 reference of every implementation that declares the algorithm (``routing_algorithms``, as
:mod:`harness.contract` says), in this plugin or another.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from harness.errors import UserError
from harness.spec import (
    DEFAULT_ROUTING_ALGORITHM,
    ROUTING_ALGORITHM_GRADIENTS,
    ROUTING_ALGORITHMS,
    ROUTING_GRADIENTS,
    CapsNetConfig,
)

DIGIT_BIAS = "digit.bias"  # self-attention's bias b_ji (harness.spec), shape (num_classes, num_primary_caps)


class UnknownRoutingAlgorithmError(UserError, LookupError):
    """A routing algorithm's name that neither capsbench nor an installed plugin defines (exit status 2)."""


def zeros(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The initial value of a parameter that starts at zero (draws nothing from ``rng``)."""
    return np.zeros(shape)


@dataclass(frozen=True)
class RoutingAlgorithm:
    """One routing algorithm.

    ``name`` is what ``--routing-algorithm``, the suite's parameter and results files call it; ``citation``
    the publication it follows (one line); ``iterative`` whether ``routing_iterations`` counts its iterations
    (only then does the suite sweep them); ``routing_gradients`` the routing gradients
    (:data:`harness.spec.ROUTING_GRADIENTS`) that mean something under it.  ``parameters(config)`` gives the
    canonical parameters it adds to the network, name -> shape (none by default); ``initial(name, shape,
    rng)`` draws the float64 starting value of one of them from the generator that drew the rest (after every
    other parameter, so the network's other parameters are the same numbers under every algorithm; default
    zeros).  ``reference(u_hat, params, config)``: v (B, J, D) from u_hat (B, N, J, D) and ``params`` (name ->
    torch tensor, those of ``parameters``), differentiable by torch autograd, for float32 and float64 alike;
    None for a built-in algorithm, whose reference is ``torch-vectorised``'s own code.  ``source``: where it
    comes from (``builtin``, or the plugin module that registered it)."""

    name: str
    citation: str
    iterative: bool
    routing_gradients: tuple[str, ...] = ("full",)
    parameters: Callable[[CapsNetConfig], dict[str, tuple[int, ...]]] = field(default=lambda config: {})
    initial: Callable[[str, tuple[int, ...], np.random.Generator], np.ndarray] = field(
        default=lambda name, shape, rng: zeros(shape, rng))
    reference: Callable | None = None
    source: str = "builtin"

    @property
    def builtin(self) -> bool:
        """Whether every built-in implementation computes it (:data:`harness.spec.ROUTING_ALGORITHMS`)."""
        return self.name in ROUTING_ALGORITHMS


BUILTIN = (
    RoutingAlgorithm(
        "dynamic", "Sabour, Frosst & Hinton (2017), Dynamic Routing Between Capsules, Procedure 1",
        iterative=True, routing_gradients=ROUTING_ALGORITHM_GRADIENTS["dynamic"]),
    RoutingAlgorithm(
        "self-attention", "Mazzia, Salvetti & Chiaberge (2021), Efficient-CapsNet: Capsule Network with "
        "Self-Attention Routing", iterative=False,
        routing_gradients=ROUTING_ALGORITHM_GRADIENTS["self-attention"],
        parameters=lambda config: {DIGIT_BIAS: (config.num_classes, config.num_primary_caps)}),
)
assert tuple(algorithm.name for algorithm in BUILTIN) == ROUTING_ALGORITHMS

_ALGORITHMS: dict[str, RoutingAlgorithm] = {algorithm.name: algorithm for algorithm in BUILTIN}
# Run once before a name is declared unknown: harness.registry adds the loading of the plugins (whose import
# registers their algorithms), so that a plugin's algorithm is known wherever its name is looked up first.
_loaders: list[Callable[[], None]] = []


def add_loader(load: Callable[[], None]) -> None:
    """Call ``load`` (once, then never again) the first time a name is not among the registered algorithms."""
    _loaders.append(load)


def _load_plugins() -> None:
    while _loaders:
        _loaders.pop(0)()


def register_routing_algorithm(algorithm: RoutingAlgorithm) -> RoutingAlgorithm:
    """Add ``algorithm`` under its name and return it; registering the same one again changes nothing.
    Raises ValueError for a name another algorithm took (the built-ins' included), a routing gradient
    that is not one of :data:`harness.spec.ROUTING_GRADIENTS`, or a ``reference`` that is not callable."""
    if not isinstance(algorithm, RoutingAlgorithm):
        raise TypeError(f"{algorithm!r} is not a harness.routing_algorithms.RoutingAlgorithm")
    unknown = [gradient for gradient in algorithm.routing_gradients if gradient not in ROUTING_GRADIENTS]
    if unknown or not algorithm.routing_gradients:
        raise ValueError(f"routing algorithm {algorithm.name!r}: routing_gradients must be among "
                         f"{', '.join(ROUTING_GRADIENTS)}, got {algorithm.routing_gradients}")
    if algorithm.reference is not None and not callable(algorithm.reference):
        raise ValueError(f"routing algorithm {algorithm.name!r}: reference must be a function of (u_hat, "
                         f"params, config), got {algorithm.reference!r}")
    existing = _ALGORITHMS.get(algorithm.name)
    if existing is not None and existing != algorithm:
        raise ValueError(f"routing algorithm name {algorithm.name!r} is already registered "
                         f"({existing.source})")
    _ALGORITHMS[algorithm.name] = existing or algorithm
    return _ALGORITHMS[algorithm.name]


@contextlib.contextmanager
def registered_routing_algorithm(algorithm: RoutingAlgorithm) -> Iterator[RoutingAlgorithm]:
    """Register ``algorithm`` for the duration of a ``with`` block (tests, one-off experiments), yielding it;
    the known algorithms are as they were afterwards (as :func:`harness.registry.registered` for an
    implementation).  Raises ValueError where its name is known already (a plugin's included: they are loaded
    first; a registered algorithm is never replaced), and whatever :func:`register_routing_algorithm` raises."""
    _load_plugins()
    if algorithm.name in _ALGORITHMS:
        raise ValueError(f"routing algorithm name {algorithm.name!r} is already registered")
    register_routing_algorithm(algorithm)
    try:
        yield _ALGORITHMS[algorithm.name]
    finally:
        _ALGORITHMS.pop(algorithm.name, None)


def registered() -> list[str]:
    """The names registered so far, without loading the plugins (what :func:`names` gives once they are)."""
    return list(_ALGORITHMS)


def mark_source(algorithm_names, source: str) -> None:
    """Record ``source`` (``entry point MODULE``) as where each of ``algorithm_names`` comes from."""
    for name in algorithm_names:
        _ALGORITHMS[name] = dataclasses.replace(_ALGORITHMS[name], source=source)


def names() -> list[str]:
    """Every known algorithm's name: the built-ins in their order, then the plugins' in registration order."""
    _load_plugins()
    return list(_ALGORITHMS)


def get(name: str) -> RoutingAlgorithm:
    """The algorithm called ``name``.  Raises :class:`UnknownRoutingAlgorithmError` (one line naming the
    known algorithms) for a name that neither capsbench nor an installed plugin defines."""
    if name not in _ALGORITHMS:
        _load_plugins()
    try:
        return _ALGORITHMS[name]
    except (KeyError, TypeError):
        raise UnknownRoutingAlgorithmError(
            f"unknown routing algorithm {name!r}; known routing algorithms: {', '.join(_ALGORITHMS)} "
            f"(a plugin's are known once it is installed)") from None


def of(config: CapsNetConfig) -> RoutingAlgorithm:
    """The algorithm ``config`` routes with (:func:`get` of its ``routing_algorithm``, the same error)."""
    return get(getattr(config, "routing_algorithm", DEFAULT_ROUTING_ALGORITHM))


def dynamic_entry(function: Callable, gradient: str) -> Callable:
    """A framework's dynamic routing ``function(u_hat, iterations, eps, gradient)`` as an entry of its routing
    table, ``routing(u_hat, params, config)`` (the calling convention of a reference) under the routing
    gradient ``gradient``: a plain function, one per entry (torch.compile and jax.jit, which take the
    routing as an argument, see a fixed function), named after ``function`` and the gradient."""
    def routing(u_hat, params, config):
        return function(u_hat, config.routing_iterations, config.squash_eps, gradient)

    routing.__name__ = routing.__qualname__ = f"{function.__name__}_{gradient}"
    return routing


def self_attention_entry(function: Callable) -> Callable:
    """A framework's self-attention routing ``function(u_hat, bias, eps)`` as an entry of its routing table,
    ``routing(u_hat, params, config)``, the bias read from ``params`` (:data:`DIGIT_BIAS`)."""
    def routing(u_hat, params, config):
        return function(u_hat, params[DIGIT_BIAS], config.squash_eps)

    routing.__name__ = routing.__qualname__ = function.__name__
    return routing


def parameter_shapes(config: CapsNetConfig) -> dict[str, tuple[int, ...]]:
    """The canonical parameters ``config``'s routing algorithm adds to the network: name -> shape (none for
    dynamic routing; ``digit.bias`` for self-attention)."""
    return dict(of(config).parameters(config))
