"""The Implementation contract: what every implementation of CapsNet provides, and the small types its
methods exchange (:class:`Batch`, :class:`Availability`, :class:`AllocatorPeaks`, the errors).

An implementation is one way of writing the whole CapsNet (forward, losses, backward, Adam) for one
framework, one device and one routing variant, a subclass of :class:`Implementation` built as
``cls(config, params, dtype, device, routing_variant)`` from the canonical parameters
(:mod:`harness.params`).  Each method's docstring is its clause of the contract (``help(Implementation)``
shows them all); ``tests/test_contract.py`` holds every registered implementation to them.  The index of
implementations is :mod:`harness.registry`.

Hooks a plugin may override (everything else it inherits):

* :class:`implementations.torch.autograd.TorchCapsNet` subclasses: ``route(u_hat)``, the differentiable
  routing inside the network's forward pass (u_hat (B, N, J, D) in, v (B, J, D) out; autograd derives its
  backward); the plugin example overrides it.
* :class:`implementations.numpy.capsnet.NumpyCapsNet` subclasses: ``routing_functions``, a
  :class:`~implementations.numpy.routing.RoutingFunctions` pair (forward keeping a cache, backward from it)
  over u_hat (B, J, N, D), chosen per routing variant; and ``array_module()``, the NumPy-compatible module.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from harness import routing_algorithms
from harness.decoder import decode_capsules
from harness.errors import UserError
from harness.params import validate_parameters
from harness.spec import CONSTANT_RATE, CapsNetConfig, LearningRateSchedule

ROUTING_VARIANTS = ("vectorised", "looped")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")
CANONICAL_U_HAT_LAYOUT = "BNJD"


class UnavailableImplementationError(UserError, RuntimeError):
    """A registered implementation that cannot run here (missing package, no device, ...): a command asked
    for it ends with its message in one line (exit status 2)."""


class UnsupportedRoutingGradientError(UnavailableImplementationError):
    """An implementation built with a routing gradient (``config.routing_gradient``) it does not compute."""


class UnsupportedRoutingAlgorithmError(UnavailableImplementationError):
    """An implementation built with a routing algorithm (``config.routing_algorithm``) it does not compute."""


def routing_algorithm_support(cls: type, routing_algorithm: str, routing_variant: str = "vectorised"
                              ) -> Availability:
    """Whether implementation class ``cls``, built with ``routing_variant``, computes ``routing_algorithm``
    (:mod:`harness.routing_algorithms`): by its ``routing_algorithms`` attribute (``("dynamic",)`` where it
    has none), or, for a plugin's algorithm with a reference, where ``cls.runs_algorithm_references`` says
    it computes any such algorithm with the reference's own code in ``routing_variant`` (torch-vectorised,
    the reference).  :meth:`Availability.ok`, or :meth:`Availability.missing` naming the algorithms it
    computes.  An unknown algorithm raises :class:`harness.routing_algorithms.UnknownRoutingAlgorithmError`."""
    algorithm = routing_algorithms.get(routing_algorithm)
    supported = tuple(getattr(cls, "routing_algorithms", ("dynamic",)))
    if routing_algorithm in supported:
        return Availability.ok()
    if (algorithm.reference is not None
            and routing_variant in getattr(cls, "runs_algorithm_references", ())):
        return Availability.ok()
    return Availability.missing(f"computes the routing algorithm{'s' if len(supported) > 1 else ''} "
                                f"{' and '.join(supported)} only, not {routing_algorithm!r}")


def config_support(cls: type, config: CapsNetConfig, routing_variant: str = "vectorised") -> Availability:
    """Whether ``cls`` built with ``routing_variant`` computes ``config``'s routing algorithm and routing
    gradient (:func:`routing_algorithm_support`, whether the algorithm has that gradient at all
    (``RoutingAlgorithm.routing_gradients``: a plugin's algorithm may have ``full`` alone), then
    :func:`routing_gradient_support`): the first that fails, else :meth:`Availability.ok`."""
    algorithm = routing_algorithm_support(cls, getattr(config, "routing_algorithm", "dynamic"), routing_variant)
    return algorithm if not algorithm else gradient_support_under(cls, config)


def gradient_support_under(cls: type, config: CapsNetConfig) -> Availability:
    """Whether ``cls`` computes ``config``'s routing gradient under its routing algorithm: whether the
    algorithm has that gradient at all, then :func:`routing_gradient_support` (the second half of
    :func:`config_support`, for a caller that has checked the algorithm already)."""
    name, gradient = getattr(config, "routing_algorithm", "dynamic"), getattr(config, "routing_gradient", "full")
    meaningful = routing_algorithms.get(name).routing_gradients
    if gradient not in meaningful:
        return Availability.missing(f"the routing algorithm {name!r} has the routing gradient "
                                    f"{' and '.join(meaningful)} only, not {gradient!r}")
    return routing_gradient_support(cls, gradient)


def routing_gradient_support(cls: type, routing_gradient: str) -> Availability:
    """Whether implementation class ``cls`` computes ``routing_gradient`` (one of
    :data:`harness.spec.ROUTING_GRADIENTS`), by its ``routing_gradients`` attribute (``("full",)`` where it
    has none): :meth:`Availability.ok`, or :meth:`Availability.missing` naming the gradients it computes."""
    supported = getattr(cls, "routing_gradients", ("full",))
    if routing_gradient in supported:
        return Availability.ok()
    return Availability.missing(f"computes the routing gradient {' and '.join(supported)} only, not "
                                f"{routing_gradient!r}")


@dataclass(frozen=True)
class Availability:
    """Whether an implementation can run here; when not, a reason a person can act on."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available

    @classmethod
    def ok(cls) -> Availability:
        """It can run (no reason)."""
        return cls(True)

    @classmethod
    def missing(cls, reason: str) -> Availability:
        """It cannot run, for ``reason`` (one phrase a person can act on: "cupy not installed")."""
        return cls(False, reason)


class Batch(NamedTuple):
    """Images and (optionally) labels, already in an implementation's own arrays and on its device."""

    images: Any
    labels: Any


@dataclass(frozen=True)
class AllocatorPeaks:
    """A device allocator's peaks over a region, in bytes: ``live`` counts the bytes of arrays that were
    alive at once (torch ``max_memory_allocated``), ``reserved`` what the allocator held from the device,
    its cache of freed blocks included (torch ``max_memory_reserved``)."""

    live: int
    reserved: int


class Implementation(abc.ABC):
    """One way of writing the whole CapsNet.  Every method below is what the harness calls, and its
    docstring is its clause of the contract.

    Class attributes: ``framework`` (its name in tables), ``u_hat_layout`` (the order of u_hat's axes in
    this implementation's own routing, a permutation of "BNJD": batch, input capsule, output capsule, capsule
    dimension) and ``first_call_compiles`` (default False): True where the first call of a shape compiles or
    captures (torch.compile, CUDA graphs, jax.jit); the suite's ``CompileTime`` measures that set-up apart, and
    data-parallel training, which wraps the eager module, refuses such an implementation.
    ``compile_cache_persists`` (default False): True where what the first call compiles is kept on disk and
    read back by a later process instead of compiled again (JAX's persistent compilation cache); the quick
    suite profiles, which leave out what compiles again in every benchmark process, run such an
    implementation.
    ``routing_gradients`` (default ``("full",)``): the routing gradients (:data:`harness.spec.ROUTING_GRADIENTS`)
    the implementation computes; building it with a config whose ``routing_gradient`` is not among them
    raises :class:`UnsupportedRoutingGradientError`, which the harness's commands report as a skip with the
    reason; none computes ``full`` in place of ``final``.  ``harness.check`` compares the ``final`` gradient
    with the reference's, so a claim the code does not keep fails there.
    ``routing_algorithms`` (default ``("dynamic",)``): the routing algorithms (:mod:`harness.routing_algorithms`)
    the implementation computes, each with its own code; building it with a config whose ``routing_algorithm``
    is not among them raises :class:`UnsupportedRoutingAlgorithmError` (a skip with the reason in every
    command); none computes another algorithm instead.  ``runs_algorithm_references`` (default ``()``): the
    routing variants in which the class computes a plugin's algorithm with the algorithm's own reference
    function (``("vectorised",)`` for torch's autograd class: torch-vectorised is every algorithm's reference).
    """

    framework: str = "unknown"
    u_hat_layout: str = CANONICAL_U_HAT_LAYOUT
    first_call_compiles: bool = False
    compile_cache_persists: bool = False
    routing_gradients: tuple[str, ...] = ("full",)
    routing_algorithms: tuple[str, ...] = ("dynamic",)
    runs_algorithm_references: tuple[str, ...] = ()

    def __init__(
        self,
        config: CapsNetConfig,
        params: dict[str, np.ndarray],
        dtype: str = "float32",
        device: str = "cpu",
        routing_variant: str = "vectorised",
    ) -> None:
        """Build the network for ``config`` (:class:`harness.spec.CapsNetConfig`, its ``routing_gradient``
        included) from ``params``, the canonical parameters (:func:`harness.params.init_parameters`: names,
        shapes and layout), computing in ``dtype`` (one of :data:`DTYPES`) on ``device`` (one of
        :data:`DEVICES`) with ``routing_variant`` (one of :data:`ROUTING_VARIANTS`); the training schedule
        starts as :data:`harness.spec.CONSTANT_RATE`.  Raises ValueError for another dtype, routing variant or
        parameters of other names or shapes (:func:`harness.params.validate_parameters`), and
        :class:`UnsupportedRoutingAlgorithmError` or :class:`UnsupportedRoutingGradientError` for a routing
        algorithm or gradient the class does not compute.  A
        subclass converts the parameters to its own arrays after calling this."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if routing_variant not in ROUTING_VARIANTS:
            raise ValueError(f"routing_variant must be one of {ROUTING_VARIANTS}, got {routing_variant!r}")
        algorithm = routing_algorithm_support(type(self), getattr(config, "routing_algorithm", "dynamic"),
                                              routing_variant)
        if not algorithm:
            raise UnsupportedRoutingAlgorithmError(f"{type(self).__name__} {algorithm.reason}")
        support = gradient_support_under(type(self), config)
        if not support:
            raise UnsupportedRoutingGradientError(f"{type(self).__name__} {support.reason}")
        validate_parameters(params, config)
        self.config = config
        self.dtype = dtype
        self.device = device
        self.routing_variant = routing_variant
        self.schedule: LearningRateSchedule = CONSTANT_RATE

    # Building and data

    @classmethod
    def availability(cls, device: str) -> Availability:
        """Whether it can run here on ``device``: an :class:`Availability`, with a reason a person can act
        on when it is not ("cupy not installed", "no CUDA device").  It must not raise."""
        return Availability.ok()

    @abc.abstractmethod
    def from_numpy(self, array: np.ndarray):
        """A float array of the implementation's own kind, in its dtype and on its device."""

    @abc.abstractmethod
    def to_device(self, images: np.ndarray, labels: np.ndarray | None = None) -> Batch:
        """A :class:`Batch` of the implementation's own arrays; ``images`` are float NumPy arrays
        (B, C, H, W) in [0, 1], ``labels`` integer class indices (B,) or None.  Timed code starts here."""

    @abc.abstractmethod
    def to_numpy(self, array) -> np.ndarray:
        """A NumPy copy of one of its arrays (for comparisons and results files)."""

    # The network

    @abc.abstractmethod
    def forward(self, batch: Batch, train: bool = True):
        """Class-capsule lengths (B, J) and reconstructions (B, pixels), as the implementation's own arrays,
        of ``batch`` (from :meth:`to_device`); with ``train`` the decoder sees the true class (``batch.labels``
        must be given), without it the longest capsule.  Keeps nothing for :meth:`backward`."""

    @abc.abstractmethod
    def forward_loss(self, batch: Batch):
        """The total loss (margin + weighted reconstruction, averaged over the batch), a scalar of the
        implementation's own kind, of a training forward pass over ``batch`` (labels given), keeping what
        :meth:`backward` needs."""

    @abc.abstractmethod
    def backward(self) -> None:
        """The parameter gradients of the last :meth:`forward_loss`.  May be called again on the same
        forward pass (the asv suite times it that way) and gives the same gradients, not accumulated ones;
        the previous gradients are released before the new ones are built, so a step holds one set."""

    @abc.abstractmethod
    def gradients(self) -> dict[str, np.ndarray]:
        """NumPy copies of the gradients of the last :meth:`backward`, in the canonical layout."""

    @abc.abstractmethod
    def parameters(self) -> dict[str, np.ndarray]:
        """NumPy copies of the current parameters, in the canonical layout."""

    @abc.abstractmethod
    def adam_step(self) -> None:
        """One Adam update (:data:`harness.spec.ADAM`) from the current gradients, at the learning rate the
        schedule (:meth:`set_schedule`, default :data:`harness.spec.CONSTANT_RATE`) gives for this step."""

    @abc.abstractmethod
    def adam_state(self) -> dict[str, np.ndarray]:
        """Adam's state as NumPy arrays in the canonical layout (``step``: the number of updates made;
        ``first/<name>`` and ``second/<name>``: the moment estimates of each parameter), so that a run saved
        by one implementation resumes in another."""

    @abc.abstractmethod
    def load_adam_state(self, state: dict[str, np.ndarray]) -> None:
        """Continue from ``state``, an :meth:`adam_state` of this or another implementation."""

    def set_schedule(self, schedule: LearningRateSchedule) -> None:
        """Use ``schedule`` for the learning rate of every later Adam step (counted from the first)."""
        self.schedule = schedule

    def train_step(self, batch: Batch) -> float:
        """Forward, backward and one Adam update; returns the loss before the update as a Python float."""
        loss = self.forward_loss(batch)
        self.backward()
        self.adam_step()
        return float(self.to_numpy(loss))

    def decode(self, capsules: np.ndarray) -> np.ndarray:
        """Reconstructions (B, pixels) as NumPy of class capsules (B, J, D) given as NumPy, already masked
        (only the chosen class's capsule non-zero): the decoder alone, on capsules no forward pass made (the
        figures' perturbed dimensions).  The default runs the canonical decoder in NumPy
        (:mod:`harness.decoder`) over :meth:`parameters`; at the forward pass's own masked capsules it gives
        the forward pass's reconstruction (the contract test holds every implementation to that)."""
        return decode_capsules(self.parameters(), self.config, capsules)

    # Routing alone (what the routing benchmarks time; the parity check compares it)

    @abc.abstractmethod
    def prediction_vectors(self, batch: Batch):
        """u_hat, laid out as the implementation's own routing consumes it, its axes in the order the class
        attribute ``u_hat_layout`` names.  Not timed; it may copy."""

    @abc.abstractmethod
    def routing_forward(self, u_hat):
        """The output capsules v (B, J, D) after ``config.routing_iterations`` iterations.  Does not
        convert u_hat to another layout: that copy would be timed for one implementation and not another."""

    @abc.abstractmethod
    def routing_backward(self, u_hat, grad_v):
        """Routing forward and backward together: the gradient with respect to u_hat, in u_hat's layout,
        of the output capsules' gradient ``grad_v``.  Does not convert u_hat to another layout (as
        :meth:`routing_forward`)."""

    def canonical_u_hat(self, u_hat) -> np.ndarray:
        """A NumPy copy of u_hat in the canonical (B, N, J, D) order, whatever order ``u_hat_layout`` says
        it is in."""
        order = [self.u_hat_layout.index(axis) for axis in CANONICAL_U_HAT_LAYOUT]
        return np.ascontiguousarray(self.to_numpy(u_hat).transpose(order))

    # Devices and memory

    def synchronize(self) -> None:
        """Wait for queued device work, so a timer that stops after it is honest (CPU implementations have
        nothing queued)."""

    def reset_peak_memory(self) -> None:
        """Start new allocator peaks (GPU implementations; nothing to do on the CPU)."""

    def allocator_peaks(self) -> AllocatorPeaks | None:
        """The framework allocator's peaks since :meth:`reset_peak_memory`, as :class:`AllocatorPeaks`
        (bytes in live arrays; bytes the allocator reserved from the device, its cache included), or None
        where the implementation has no device allocator (on the CPU the harness measures the process's
        resident memory instead)."""
        return None

    def release_cached_memory(self) -> None:
        """Return the allocator's cached, unused blocks to the device, so that a device-memory baseline means
        the same for every framework (nothing to do on the CPU)."""

    def pci_bus_id(self) -> str | None:
        """The PCI bus id of the GPU the implementation computes on, e.g. '0000:3B:00.0' (None on the CPU),
        so that NVML reads that device and no other."""
        return None
