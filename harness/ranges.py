"""Named ranges around the layers of a training step: the one mechanism through which every implementation
tells the profiler (:mod:`harness.profile`) where its time goes.

An implementation wraps each layer of its forward and hand-written backward passes in
``with layer_range("conv1", "forward"):``, with the layer names of :func:`harness.measure.flops.layers` and the
phases "forward", "backward" and "update".  When no profile is running, :func:`layer_range` returns one
shared null context: nothing is timed, synchronised or recorded.  While :func:`recording` has installed a
recorder, each range is what that recorder makes of it: for torch a ``torch.profiler.record_function``
(named ``capsbench/<phase>/<layer>``, so torch's own trace shows the same names) and an NVTX range on CUDA;
for NumPy and CuPy a wall-clock range with the device synchronised at both ends, plus an NVTX range on
CUDA, so that Nsight Systems shows the same names for every framework.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

_NULL = contextlib.nullcontext()
RANGE_PREFIX = "capsbench"
# The range around a whole routing (forward, and backward where hand-written) that the base classes open
# around a plugin's routing hook (TorchCapsNet.route, NumpyCapsNet.routing_functions), so that a plugin's
# routing is attributed without it opening any range; the built-in routing opens one per iteration instead
# (harness.measure.flops.routing_layers), and a profile drops this one where those are inside it.
ROUTING_LAYER = "routing"


class Recorder(Protocol):
    """What a profiler installs: a context manager for each named range."""

    def range(self, layer: str, phase: str): ...


_recorder: Recorder | None = None


def layer_range(layer: str, phase: str = "forward"):
    """A context manager around one layer's work in one phase (a shared no-op when nothing records)."""
    if _recorder is None:
        return _NULL
    return _recorder.range(layer, phase)


def range_name(layer: str, phase: str) -> str:
    """The name a range carries in framework traces: ``capsbench/<phase>/<layer>``."""
    return f"{RANGE_PREFIX}/{phase}/{layer}"


@contextlib.contextmanager
def recording(recorder: Recorder):
    """Install ``recorder`` for the duration of a ``with`` block (one at a time)."""
    global _recorder
    if _recorder is not None:
        raise RuntimeError("a profile is already recording")
    _recorder = recorder
    try:
        yield recorder
    finally:
        _recorder = None
