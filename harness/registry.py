"""The registry: every implementation the harness knows, by name.

Implementations in this repository register themselves (:func:`register`) when their module in
``implementations/`` is imported; an installed package registers through the entry point group
``capsbench.implementations`` (see docs/plugins.md).  The registry is the only index:
``capsbench list``, ``harness.check``, ``harness.train``, ``harness.profile`` and the asv suite all ask it.
What an implementation must provide is the contract, :mod:`harness.contract`; its names are importable
from here too (``from harness.registry import Implementation, register``), as docs/plugins.md's plugin
example does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np

from harness import routing_algorithms
from harness.contract import (  # noqa: F401 (re-exported: plugins import the contract from here)
    CANONICAL_U_HAT_LAYOUT,
    DEVICES,
    DTYPES,
    ROUTING_VARIANTS,
    AllocatorPeaks,
    Availability,
    Batch,
    Implementation,
    UnavailableImplementationError,
    UnsupportedRoutingAlgorithmError,
    UnsupportedRoutingGradientError,
    config_support,
    gradient_support_under,
    routing_algorithm_support,
    routing_gradient_support,
)
from harness.errors import UserError
from harness.routing_algorithms import (  # noqa: F401 (re-exported: a plugin registers its algorithm from here)
    RoutingAlgorithm,
    UnknownRoutingAlgorithmError,
    register_routing_algorithm,
)
from harness.spec import CapsNetConfig

ENTRY_POINT_GROUP = "capsbench.implementations"


class UnknownImplementationError(UserError, LookupError):
    """A name that no implementation registered; its message lists the known names (exit status 2)."""


@dataclass(frozen=True)
class ImplementationInfo:
    """A registry entry: the name, what it is, and how to build it.

    ``name`` is the registered name (``numpy-vectorised``); ``cls`` the :class:`~harness.contract.Implementation`
    subclass built; ``device`` one of :data:`~harness.contract.DEVICES`; ``routing_variant`` one of
    :data:`~harness.contract.ROUTING_VARIANTS`; ``source`` where it comes from (``builtin``, or ``entry point
    MODULE`` for a plugin)."""

    name: str
    cls: type[Implementation]
    device: str
    routing_variant: str
    source: str = "builtin"

    @property
    def framework(self) -> str:
        """The framework the class names (``numpy``, ``torch``, ``jax``, ``cupy``, or a plugin's)."""
        return self.cls.framework

    def describe(self) -> dict[str, str]:
        """What a results file records of the implementation, so a report needs no registry to label it."""
        return {"framework": self.framework, "device": self.device, "routing_variant": self.routing_variant,
                "source": self.source}

    def supports(self, routing_gradient: str) -> Availability:
        """Whether it computes ``routing_gradient`` (one of :data:`harness.spec.ROUTING_GRADIENTS`): a true
        :class:`~harness.contract.Availability`, or a false one whose ``reason`` says why not."""
        return routing_gradient_support(self.cls, routing_gradient)

    def computes(self, config: CapsNetConfig) -> Availability:
        """Whether it computes ``config``'s routing algorithm and routing gradient: a true
        :class:`~harness.contract.Availability`, or a false one whose ``reason`` says which it lacks (the
        skip every command reports).  An unknown algorithm raises
        :class:`~harness.routing_algorithms.UnknownRoutingAlgorithmError`."""
        return config_support(self.cls, config, self.routing_variant)

    def routing_algorithms(self) -> list[str]:
        """The names of the known routing algorithms it computes (what ``capsbench list`` shows)."""
        return [name for name in routing_algorithms.names()
                if routing_algorithm_support(self.cls, name, self.routing_variant)]

    def availability(self) -> Availability:
        """Whether it can run here (its package imports, its device is present): a true
        :class:`~harness.contract.Availability`, or a false one with the reason.  Never raises: a check that
        fails is an unavailable implementation whose reason names the failure."""
        try:
            return self.cls.availability(self.device)
        except Exception as error:  # availability must never take the harness down
            return Availability.missing(f"availability check failed: {error}")

    def create(
        self, config: CapsNetConfig, params: dict[str, np.ndarray], dtype: str = "float32"
    ) -> Implementation:
        """An instance built for ``config`` from ``params`` (the canonical parameters,
        :func:`harness.params.init_parameters`'s names and shapes), computing in ``dtype`` (``float32`` or
        ``float64``).  Raises :class:`~harness.contract.UnavailableImplementationError` with the reason where it
        cannot run here, and its subclasses :class:`~harness.contract.UnsupportedRoutingAlgorithmError` and
        :class:`~harness.contract.UnsupportedRoutingGradientError` where it does not compute
        ``config.routing_algorithm`` or ``config.routing_gradient``."""
        status = self.availability()
        if not status:
            raise UnavailableImplementationError(f"implementation {self.name!r} is unavailable here: {status.reason}")
        algorithm = routing_algorithm_support(self.cls, config.routing_algorithm, self.routing_variant)
        if not algorithm:
            raise UnsupportedRoutingAlgorithmError(f"implementation {self.name!r} {algorithm.reason}")
        support = gradient_support_under(self.cls, config)
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
    """Add an implementation under ``name`` and return its entry.

    ``cls`` is an :class:`~harness.contract.Implementation` subclass; ``device`` one of
    :data:`~harness.contract.DEVICES`; ``routing_variant`` one of :data:`~harness.contract.ROUTING_VARIANTS`;
    ``source`` what ``capsbench list`` shows it came from (an entry point's is filled in by the registry).
    Registering the same entry again changes nothing and returns the first.  Raises TypeError for a ``cls``
    that is not an Implementation, ValueError for an unknown device or routing variant, and ValueError for a
    name another entry took."""
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
    """Register an implementation for the duration of a ``with`` block (tests, one-off experiments), yielding
    its entry; the registry is as it was afterwards.  ``options`` are :func:`register`'s keywords.  Raises
    ValueError where ``name`` is registered already (a registered entry is never replaced), and whatever
    :func:`register` raises."""
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

    for module in pkgutil.walk_packages(implementations.__path__, "implementations."):
        if not module.name.rpartition(".")[2].startswith("_"):
            importlib.import_module(module.name)


def _load_entry_points() -> None:
    """Import every module named in the entry-point group; importing it registers its implementations.
    A plugin that fails, or registers nothing, is recorded in plugin_errors and never stops the rest."""
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        before, algorithms_before = set(_REGISTRY.entries), set(routing_algorithms.registered())
        try:
            entry_point.load()
            added = (set(_REGISTRY.entries) - before) | (set(routing_algorithms.registered()) - algorithms_before)
            problem = None if added else "importing it registered no implementation"
        except Exception as error:
            problem = f"{type(error).__name__}: {error}"
        if problem:
            _REGISTRY.plugin_errors[entry_point.name] = problem
        source = f"entry point {entry_point.value}"
        for name in set(_REGISTRY.entries) - before:  # also those registered before a failure
            _REGISTRY.entries[name] = dataclasses.replace(_REGISTRY.entries[name], source=source)
        routing_algorithms.mark_source(set(routing_algorithms.registered()) - algorithms_before, source)


def _ensure_loaded() -> None:
    if not _REGISTRY.loaded:
        _REGISTRY.loaded = True  # before loading: a module that asks the registry while loading sees it partly
        _load_builtin()
        _load_entry_points()


# A plugin's routing algorithm is registered by importing the plugin: an unknown algorithm name loads them first.
routing_algorithms.add_loader(_ensure_loaded)


def entries() -> list[ImplementationInfo]:
    """Every registered implementation, sorted by name."""
    _ensure_loaded()
    return [_REGISTRY.entries[name] for name in sorted(_REGISTRY.entries)]


def names() -> list[str]:
    """Every registered name, sorted."""
    return [info.name for info in entries()]


def plugin_errors() -> dict[str, str]:
    """Entry points that failed to load or registered nothing: the entry point's name -> the error (``Type:
    message``), so ``capsbench list`` can show them."""
    _ensure_loaded()
    return dict(_REGISTRY.plugin_errors)


def get(name: str) -> ImplementationInfo:
    """The entry registered as ``name``.  Raises :class:`UnknownImplementationError` (a
    :class:`~harness.errors.UserError`) for an unknown name, in one line naming the closest known name (a
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
    """Names (sorted) of the implementations that can run here; only those on ``device`` (``cpu``, ``cuda``)
    where it is given."""
    return [
        info.name
        for info in entries()
        if (device is None or info.device == device) and info.availability()
    ]


def create(
    name: str, config: CapsNetConfig, params: dict[str, np.ndarray], dtype: str = "float32"
) -> Implementation:
    """The implementation registered as ``name``, built as :meth:`ImplementationInfo.create` builds it (the
    same arguments, the same errors), after :class:`UnknownImplementationError` for an unknown name."""
    return get(name).create(config, params, dtype)


def list_implementations() -> str:
    """One line per implementation: name, framework, device, routing variant, where it comes from, status."""
    rows = [("name", "framework", "device", "routing", "routing algorithms", "source", "status")]
    for info in entries():
        status = info.availability()
        rows.append((info.name, info.framework, info.device, info.routing_variant,
                     ", ".join(info.routing_algorithms()), info.source,
                     "available" if status else f"unavailable: {status.reason}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for name, error in plugin_errors().items():
        lines.append(f"entry point {name!r} of group {ENTRY_POINT_GROUP!r} failed to load: {error}")
    return "\n".join(lines)
