"""The Implementation contract and the registry of every implementation the harness knows.

An implementation is one way of writing the whole CapsNet (forward, losses, backward, Adam) for one
framework, one device and one routing variant.  Implementations in this repository register themselves
when their module in ``implementations/`` is imported; an installed package registers through the entry
point group ``capsbench.implementations`` (see README, "Adding an implementation").  The registry is the
only index: ``python -m harness list``, ``harness.check``, ``harness.train`` and the asv suite all ask it.

The contract, for a subclass of :class:`Implementation` built as ``cls(config, params, dtype, device,
routing)`` from the canonical parameters (:mod:`harness.params`):

* ``availability()`` (classmethod, given the device): :class:`Availability`, with a reason a person can
  act on when it is not available ("cupy not installed", "no CUDA device").  It must not raise.
* ``from_numpy(array)``: a float array of the implementation's own kind, dtype and device.
* ``to_numpy(array)``: a NumPy copy of one of its arrays (for comparisons and results files).
* ``to_device(images, labels)``: a :class:`Batch` of the implementation's own arrays; images are float
  NumPy arrays (B, C, H, W) in [0, 1], labels integer class indices (B,) or None.  Timed code starts here.
* ``forward(batch, train)``: class-capsule lengths (B, J) and reconstructions (B, pixels); in training the
  decoder sees the true class, at inference the longest capsule.
* ``forward_loss(batch)``: the total loss (margin + weighted reconstruction) of a training forward pass,
  keeping what ``backward`` needs.
* ``backward()``: the parameter gradients of the last ``forward_loss``.  May be called again on the same
  forward pass (the asv suite times it that way) and gives the same gradients, not accumulated ones.
* ``gradients()`` / ``parameters()``: NumPy copies in the canonical layout.
* ``adam_step()``: one Adam update (:data:`harness.spec.ADAM`) from the current gradients.
* ``prediction_vectors(batch)``: u_hat (B, N, J, D); ``routing(u_hat)``: the output capsules v (B, J, D)
  after ``config.routing_iterations`` iterations; ``routing_backward(u_hat, grad_v)``: the gradient
  with respect to u_hat of routing, forward and backward together.
* ``synchronize()``: wait for queued device work, so a timer that stops after it is honest.
* ``reset_peak_memory()`` / ``allocator_peak_bytes()``: the framework allocator's own peak, for GPU
  implementations (None on the CPU, where the harness measures the process's resident memory instead).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, NamedTuple

import numpy as np

from harness.params import validate_parameters
from harness.spec import CapsNetConfig

ENTRY_POINT_GROUP = "capsbench.implementations"
ROUTING_VARIANTS = ("vectorised", "looped")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")


class UnknownImplementationError(LookupError):
    """A name that no implementation registered."""


class UnavailableImplementationError(RuntimeError):
    """A registered implementation that cannot run here (missing package, no device, ...)."""


@dataclass(frozen=True)
class Availability:
    """Whether an implementation can run here; when not, a reason a person can act on."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available

    @classmethod
    def ok(cls) -> "Availability":
        return cls(True)

    @classmethod
    def missing(cls, reason: str) -> "Availability":
        return cls(False, reason)


class Batch(NamedTuple):
    """Images and (optionally) labels, already in an implementation's own arrays and on its device."""

    images: Any
    labels: Any


class Implementation(abc.ABC):
    """One way of writing the whole CapsNet.  See the module docstring for the contract."""

    framework: str = "unknown"

    def __init__(
        self,
        config: CapsNetConfig,
        params: dict[str, np.ndarray],
        dtype: str = "float32",
        device: str = "cpu",
        routing: str = "vectorised",
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if routing not in ROUTING_VARIANTS:
            raise ValueError(f"routing must be one of {ROUTING_VARIANTS}, got {routing!r}")
        validate_parameters(params, config)
        self.config = config
        self.dtype = dtype
        self.device = device
        self.routing_variant = routing

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
    def prediction_vectors(self, batch: Batch): ...

    @abc.abstractmethod
    def routing(self, u_hat): ...

    @abc.abstractmethod
    def routing_backward(self, u_hat, grad_v): ...

    def synchronize(self) -> None:
        """CPU implementations have nothing queued."""

    def reset_peak_memory(self) -> None:
        """Start a new allocator peak (GPU implementations; nothing to do on the CPU)."""

    def allocator_peak_bytes(self) -> int | None:
        """The framework allocator's peak since :meth:`reset_peak_memory` (None where there is none)."""
        return None

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
    routing: str
    source: str = "builtin"

    @property
    def framework(self) -> str:
        return self.cls.framework

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
        return self.cls(config, params, dtype=dtype, device=self.device, routing=self.routing)


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
    routing: str = "vectorised",
    source: str = "builtin",
) -> ImplementationInfo:
    """Add an implementation under ``name``.  Registering the same entry again changes nothing; a name
    taken by another entry is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Implementation)):
        raise TypeError(f"{name}: {cls!r} is not a subclass of harness.registry.Implementation")
    if routing not in ROUTING_VARIANTS:
        raise ValueError(f"{name}: routing must be one of {ROUTING_VARIANTS}, got {routing!r}")
    if device not in DEVICES:
        raise ValueError(f"{name}: device must be one of {DEVICES}, got {device!r}")
    info = ImplementationInfo(name, cls, device, routing, source=source)
    existing = _REGISTRY.entries.get(name)
    if existing is not None and (existing.cls, existing.device, existing.routing) != (cls, device, routing):
        raise ValueError(f"implementation name {name!r} is already registered by {existing.cls.__module__}")
    _REGISTRY.entries[name] = existing or info
    return _REGISTRY.entries[name]


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
            _REGISTRY.entries[name] = dataclasses.replace(_REGISTRY.entries[name], source=f"entry point {entry_point.value}")


def _ensure_loaded() -> None:
    if not _REGISTRY.loaded:
        _load_builtin()
        _load_entry_points()
        _REGISTRY.loaded = True


def entries() -> list[ImplementationInfo]:
    """Every registered implementation, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY.entries[name] for name in sorted(_REGISTRY.entries)]


def names() -> list[str]:
    return [info.name for info in entries()]


def plugin_errors() -> dict[str, str]:
    """Entry points that failed to load, with the error, so `harness list` can show them."""
    _ensure_loaded()
    return dict(_REGISTRY.plugin_errors)


def get(name: str) -> ImplementationInfo:
    """The entry for ``name``; an unknown name fails with one line listing the known names."""
    _ensure_loaded()
    try:
        return _REGISTRY.entries[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY.entries)) or "none"
        raise UnknownImplementationError(
            f"unknown implementation {name!r}; known implementations: {known} (see `python -m harness list`)"
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

