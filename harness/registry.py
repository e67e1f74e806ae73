"""The Implementation contract and the registry of every implementation the harness knows.

An implementation is one way of writing the whole CapsNet (forward, losses, backward, Adam) for one
framework, one device and one routing variant.  Implementations in this repository register themselves
when their module in ``implementations/`` is imported; an installed package registers through the entry
point group ``capsbench.implementations`` (see docs/plugins.md).  The registry is the
only index: ``capsbench list``, ``harness.check``, ``harness.train``, ``harness.profile`` and the asv
suite all ask it.

The contract, for a subclass of :class:`Implementation` built as ``cls(config, params, dtype, device,
routing_variant)`` from the canonical parameters (:mod:`harness.params`).  Every method below is what the
harness calls; the tests in ``tests/test_contract.py`` hold every registered implementation to it.

Building and data

* ``availability(device)`` (classmethod): :class:`Availability`, with a reason a person can act on when
  it is not available ("cupy not installed", "no CUDA device").  It must not raise.
* ``from_numpy(array)``: a float array of the implementation's own kind, dtype and device.
* ``to_numpy(array)``: a NumPy copy of one of its arrays (for comparisons and results files).
* ``to_device(images, labels)``: a :class:`Batch` of the implementation's own arrays; images are float
  NumPy arrays (B, C, H, W) in [0, 1], labels integer class indices (B,) or None.  Timed code starts here.

The network

* ``forward(batch, train)``: class-capsule lengths (B, J) and reconstructions (B, pixels); in training the
  decoder sees the true class, at inference the longest capsule.  Keeps nothing for backward.
* ``forward_loss(batch)``: the total loss (margin + weighted reconstruction) of a training forward pass,
  keeping what ``backward`` needs.
* ``backward()``: the parameter gradients of the last ``forward_loss``.  May be called again on the same
  forward pass (the asv suite times it that way) and gives the same gradients, not accumulated ones; the
  previous gradients are released before the new ones are built, so a step holds one set.
* ``gradients()`` / ``parameters()``: NumPy copies in the canonical layout.
* ``adam_step()``: one Adam update (:data:`harness.spec.ADAM`) from the current gradients, at the
  learning rate the schedule (:meth:`set_schedule`, default :data:`harness.spec.CONSTANT_RATE`) gives
  for this step.
* ``train_step(batch)``: forward, backward and one Adam update; returns the loss as a Python float.
* ``decode(capsules)``: reconstructions (B, pixels) as NumPy of class capsules (B, J, D) given as NumPy,
  already masked (only the chosen class's capsule non-zero): the decoder alone, on capsules no forward pass
  made (the figures' perturbed dimensions).  The default runs the canonical decoder in NumPy
  (:mod:`harness.decoder`) over :meth:`parameters`; at the forward pass's own masked capsules it gives the
  forward pass's reconstruction (the contract test holds every implementation to that).
* ``adam_state()`` / ``load_adam_state(state)``: Adam's state as NumPy arrays in the canonical layout
  (``step``: the number of updates made; ``first/<name>`` and ``second/<name>``: the moment estimates of
  each parameter), so that a run saved by one implementation resumes in another.

Routing alone (what the routing benchmarks time; the parity check compares it)

* ``prediction_vectors(batch)``: u_hat, laid out as the implementation's own routing consumes it, with
  its axes in the order named by the class attribute ``u_hat_layout`` (a permutation of "BNJD": batch,
  input capsule, output capsule, capsule dimension).  Not timed; it may copy.
* ``routing_forward(u_hat)``: the output capsules v (B, J, D) after ``config.routing_iterations``
  iterations.  ``routing_backward(u_hat, grad_v)``: routing forward and backward together, the gradient
  with respect to u_hat in u_hat's layout.  Neither converts u_hat to another layout: that copy would be
  timed for one implementation and not another.
* ``canonical_u_hat(u_hat)``: a NumPy copy in the canonical (B, N, J, D) order (from ``u_hat_layout``).

Devices and memory

* ``synchronize()``: wait for queued device work, so a timer that stops after it is honest.
* ``reset_peak_memory()`` / ``allocator_peaks()``: the framework allocator's peaks since the reset, as
  :class:`AllocatorPeaks` (bytes in live arrays; bytes the allocator reserved from the device, its cache
  included), or None where the implementation has no device allocator (on the CPU the harness measures
  the process's resident memory instead).
* ``release_cached_memory()``: return the allocator's cached, unused blocks to the device, so that a
  device-memory baseline means the same for every framework.
* ``pci_bus_id()``: the PCI bus id of the GPU the implementation computes on (None on the CPU), so that
  NVML reads that device and no other.
* ``routing_gradients`` (class attribute, default ``("full",)``): the routing gradients
  (:data:`harness.spec.ROUTING_GRADIENTS`, defined in :mod:`harness.spec`) the implementation computes.
  Building it with a config whose ``routing_gradient`` is not among them raises
  :class:`UnsupportedRoutingGradientError`, which the harness's commands report as a skip with the
  reason; none computes ``full`` in place of ``final``.  ``harness.check`` compares the ``final`` gradient
  with the reference's, so a claim the code does not keep fails there.
* ``first_call_compiles`` (class attribute, default False): True where the first call of a shape compiles
  or captures (torch.compile, CUDA graphs); the suite's ``CompileTime`` measures that set-up apart, and
  data-parallel training, which wraps the eager module, refuses such an implementation.

Hooks a plugin may override (everything else it inherits):

* :class:`implementations.torch_capsnet.TorchCapsNet` subclasses: ``route(u_hat)``, the differentiable
  routing inside the network's forward pass (u_hat (B, N, J, D) in, v (B, J, D) out; autograd derives its
  backward); the plugin example overrides it.
* :class:`implementations.numpy_capsnet.NumpyCapsNet` subclasses: ``routing_functions``, a
  :class:`~implementations.numpy_capsnet.RoutingFunctions` pair (forward keeping a cache, backward from it)
  over u_hat (B, J, N, D), chosen per routing variant; and ``array_module()``, the NumPy-compatible module.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, NamedTuple

import numpy as np

from harness.decoder import decode_capsules
from harness.params import validate_parameters
from harness.spec import CONSTANT_RATE, CapsNetConfig, LearningRateSchedule

ENTRY_POINT_GROUP = "capsbench.implementations"
ROUTING_VARIANTS = ("vectorised", "looped")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")
CANONICAL_U_HAT_LAYOUT = "BNJD"


class UnknownImplementationError(LookupError):
    """A name that no implementation registered."""


class UnavailableImplementationError(RuntimeError):
    """A registered implementation that cannot run here (missing package, no device, ...)."""


class UnsupportedRoutingGradientError(UnavailableImplementationError):
    """An implementation built with a routing gradient (``config.routing_gradient``) it does not compute."""


def routing_gradient_support(cls: type, routing_gradient: str) -> Availability:
    """Whether implementation class ``cls`` computes ``routing_gradient``; when not, the reason."""
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
        return cls(True)

    @classmethod
    def missing(cls, reason: str) -> Availability:
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
    """One way of writing the whole CapsNet.  See the module docstring for the contract."""

    framework: str = "unknown"
    u_hat_layout: str = CANONICAL_U_HAT_LAYOUT
    first_call_compiles: bool = False
    routing_gradients: tuple[str, ...] = ("full",)

    def __init__(
        self,
        config: CapsNetConfig,
        params: dict[str, np.ndarray],
        dtype: str = "float32",
        device: str = "cpu",
        routing_variant: str = "vectorised",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if routing_variant not in ROUTING_VARIANTS:
            raise ValueError(f"routing_variant must be one of {ROUTING_VARIANTS}, got {routing_variant!r}")
        gradient = getattr(config, "routing_gradient", "full")
        support = routing_gradient_support(type(self), gradient)
        if not support:
            raise UnsupportedRoutingGradientError(f"{type(self).__name__} {support.reason}")
        validate_parameters(params, config)
        self.config = config
        self.dtype = dtype
        self.device = device
        self.routing_variant = routing_variant
        self.schedule: LearningRateSchedule = CONSTANT_RATE

    @classmethod
    def availability(cls, device: str) -> Availability:
        return Availability.ok()

    @abc.abstractmethod
    def from_numpy(self, array: np.ndarray):
        """A float array in this implementation's dtype and on its device."""

    @abc.abstractmethod
    def to_device(self, images: np.ndarray, labels: np.ndarray | None = None) -> Batch: ...

    @abc.abstractmethod
    def to_numpy(self, array) -> np.ndarray: ...

    @abc.abstractmethod
    def forward(self, batch: Batch, train: bool = True): ...

    @abc.abstractmethod
    def forward_loss(self, batch: Batch): ...

    @abc.abstractmethod
    def backward(self) -> None: ...

    @abc.abstractmethod
    def gradients(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def parameters(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def adam_step(self) -> None: ...

    @abc.abstractmethod
    def adam_state(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def load_adam_state(self, state: dict[str, np.ndarray]) -> None: ...

    @abc.abstractmethod
    def prediction_vectors(self, batch: Batch): ...

    @abc.abstractmethod
    def routing_forward(self, u_hat): ...

    @abc.abstractmethod
    def routing_backward(self, u_hat, grad_v): ...

    def set_schedule(self, schedule: LearningRateSchedule) -> None:
        """Use ``schedule`` for the learning rate of every later Adam step (counted from the first)."""
        self.schedule = schedule

    def canonical_u_hat(self, u_hat) -> np.ndarray:
        """u_hat as a NumPy (B, N, J, D) array, whatever order ``u_hat_layout`` says it is in."""
        order = [self.u_hat_layout.index(axis) for axis in CANONICAL_U_HAT_LAYOUT]
        return np.ascontiguousarray(self.to_numpy(u_hat).transpose(order))

    def synchronize(self) -> None:
        """CPU implementations have nothing queued."""

    def reset_peak_memory(self) -> None:
        """Start new allocator peaks (GPU implementations; nothing to do on the CPU)."""

    def allocator_peaks(self) -> AllocatorPeaks | None:
        """The allocator's peaks since :meth:`reset_peak_memory` (None where there is no device allocator)."""
        return None

    def release_cached_memory(self) -> None:
        """Return cached, unused device blocks (GPU implementations; nothing to do on the CPU)."""

    def pci_bus_id(self) -> str | None:
        """PCI bus id of the GPU in use, e.g. '0000:3B:00.0' (None on the CPU)."""
        return None

    def decode(self, capsules: np.ndarray) -> np.ndarray:
        """Reconstructions (B, pixels) of masked class capsules (B, J, D), through the decoder of this
        implementation's current parameters (the canonical decoder in NumPy)."""
        return decode_capsules(self.parameters(), self.config, capsules)

    def train_step(self, batch: Batch) -> float:
        """Forward, backward and one Adam update; returns the loss before the update."""
        loss = self.forward_loss(batch)
        self.backward()
        self.adam_step()
        return float(self.to_numpy(loss))


@dataclass(frozen=True)
class ImplementationInfo:
    """A registry entry: the name, what it is, and how to build it."""

    name: str
    cls: type[Implementation]
    device: str
    routing_variant: str
    source: str = "builtin"

    @property
    def framework(self) -> str:
        return self.cls.framework

    def describe(self) -> dict[str, str]:
        """What a results file records of the implementation, so a report needs no registry to label it."""
        return {"framework": self.framework, "device": self.device, "routing_variant": self.routing_variant,
                "source": self.source}

    def supports(self, routing_gradient: str) -> Availability:
        """Whether it computes ``routing_gradient`` (see :data:`harness.spec.ROUTING_GRADIENTS`)."""
        return routing_gradient_support(self.cls, routing_gradient)

    def availability(self) -> Availability:
        try:
            return self.cls.availability(self.device)
        except Exception as error:  # availability must never take the harness down
            return Availability.missing(f"availability check failed: {error}")

    def create(
        self, config: CapsNetConfig, params: dict[str, np.ndarray], dtype: str = "float32"
    ) -> Implementation:
        """Build it from the canonical parameters; raises UnavailableImplementationError with the reason."""
        status = self.availability()
        if not status:
            raise UnavailableImplementationError(f"implementation {self.name!r} is unavailable here: {status.reason}")
        support = self.supports(config.routing_gradient)
        if not support:
            raise UnsupportedRoutingGradientError(f"implementation {self.name!r} {support.reason}")
        return self.cls(config, params, dtype=dtype, device=self.device, routing_variant=self.routing_variant)


@dataclass
class _Registry:
    entries: dict[str, ImplementationInfo] = field(default_factory=dict)
    plugin_errors: dict[str, str] = field(default_factory=dict)
    loaded: bool = False


_REGISTRY = _Registry()


def register(
    name: str,
    cls: type[Implementation],
    *,
    device: str = "cpu",
    routing_variant: str = "vectorised",
    source: str = "builtin",
) -> ImplementationInfo:
    """Add an implementation under ``name``.  Registering the same entry again changes nothing; a name
    taken by another entry is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Implementation)):
        raise TypeError(f"{name}: {cls!r} is not a subclass of harness.registry.Implementation")
    if routing_variant not in ROUTING_VARIANTS:
        raise ValueError(f"{name}: routing_variant must be one of {ROUTING_VARIANTS}, got {routing_variant!r}")
    if device not in DEVICES:
        raise ValueError(f"{name}: device must be one of {DEVICES}, got {device!r}")
    info = ImplementationInfo(name, cls, device, routing_variant, source=source)
    existing = _REGISTRY.entries.get(name)
    if existing is not None and (existing.cls, existing.device, existing.routing_variant) != (
            cls, device, routing_variant):
        raise ValueError(f"implementation name {name!r} is already registered by {existing.cls.__module__}")
    _REGISTRY.entries[name] = existing or info
    return _REGISTRY.entries[name]


@contextlib.contextmanager
def registered(name: str, cls: type[Implementation], **options) -> Iterator[ImplementationInfo]:
    """Register an implementation for the duration of a ``with`` block (tests, one-off experiments);
    the registry is as it was afterwards."""
    _ensure_loaded()
    if name in _REGISTRY.entries:
        raise ValueError(f"implementation name {name!r} is already registered")
    info = register(name, cls, **options)
    try:
        yield info
    finally:
        _REGISTRY.entries.pop(name, None)


def _load_builtin() -> None:
    import implementations

    for module in pkgutil.iter_modules(implementations.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"implementations.{module.name}")


def _load_entry_points() -> None:
    """Import every module named in the entry-point group; importing it registers its implementations.
    A plugin that fails, or registers nothing, is recorded in plugin_errors and never stops the rest."""
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        before = set(_REGISTRY.entries)
        try:
            entry_point.load()
            problem = None if set(_REGISTRY.entries) - before else "importing it registered no implementation"
        except Exception as error:
            problem = f"{type(error).__name__}: {error}"
        if problem:
            _REGISTRY.plugin_errors[entry_point.name] = problem
        for name in set(_REGISTRY.entries) - before:  # also those registered before a failure
            source = f"entry point {entry_point.value}"
            _REGISTRY.entries[name] = dataclasses.replace(_REGISTRY.entries[name], source=source)


def _ensure_loaded() -> None:
    if not _REGISTRY.loaded:
        _REGISTRY.loaded = True  # before loading: a module that asks the registry while loading sees it partly
        _load_builtin()
        _load_entry_points()


def entries() -> list[ImplementationInfo]:
    """Every registered implementation, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY.entries[name] for name in sorted(_REGISTRY.entries)]


def names() -> list[str]:
    return [info.name for info in entries()]


def plugin_errors() -> dict[str, str]:
    """Entry points that failed to load, with the error, so `capsbench list` can show them."""
    _ensure_loaded()
    return dict(_REGISTRY.plugin_errors)


def get(name: str) -> ImplementationInfo:
    """The entry for ``name``; an unknown name fails with one line naming the closest known name (a
    misspelling) and listing them all."""
    _ensure_loaded()
    try:
        return _REGISTRY.entries[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY.entries)) or "none"
        closest = difflib.get_close_matches(str(name), list(_REGISTRY.entries), n=1)
        hint = f" (did you mean {closest[0]}?)" if closest else ""
        raise UnknownImplementationError(
            f"unknown implementation {name!r}{hint}; known implementations: {known} (see `capsbench list`)"
        ) from None


def available(device: str | None = None) -> list[str]:
    """Names of the implementations that can run here, optionally only those on ``device``."""
    return [
        info.name
        for info in entries()
        if (device is None or info.device == device) and info.availability()
    ]


def create(
    name: str, config: CapsNetConfig, params: dict[str, np.ndarray], dtype: str = "float32"
) -> Implementation:
    """Build the named implementation from the canonical parameters."""
    return get(name).create(config, params, dtype)
