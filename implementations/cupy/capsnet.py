"""``cupy-vectorised`` and ``cupy-looped``: the NumPy CapsNet of :mod:`implementations.numpy.capsnet` on CuPy.

All the mathematics is the NumPy code with ``xp = cupy``, so it is exercised on the CPU through NumPy.
What only a GPU runs is here: a fused Adam update (one ``cupy.ElementwiseKernel`` launch per tensor
instead of the shared update's dozen elementwise kernels; the shared update is its fallback whenever the
array module is not CuPy), and the allocator's peaks, which CuPy's memory pool does not count itself: a
``cupy.cuda.MemoryHook`` (:class:`PoolPeakHook`) follows every allocation and free of the pool between
``reset_peak_memory`` and ``allocator_peaks``, so its figures mean what torch's ``max_memory_allocated``
(live bytes) and ``max_memory_reserved`` (bytes held from the device) mean.
"""

from __future__ import annotations

from harness.contract import ROUTING_VARIANTS, AllocatorPeaks, Availability
from harness.registry import register
from harness.spec import ADAM, ROUTING_ALGORITHMS
from implementations.numpy.capsnet import NumpyCapsNet

try:
    import cupy
    from cupy.cuda.memory_hook import MemoryHook
except ImportError:
    cupy, MemoryHook = None, object
    _IMPORT_ERROR = "cupy not installed (pip install cupy-cuda12x, or cupy-cuda13x for CUDA 13)"
except Exception as error:  # a broken CUDA toolkit can make the import itself fail
    cupy, MemoryHook = None, object
    _IMPORT_ERROR = f"cupy cannot be imported: {type(error).__name__}: {error}"

_ADAM_SOURCE = """
first = first + (1.0 - beta1) * (grad - first);
second = beta2 * second + (1.0 - beta2) * grad * grad;
param = param - step_size * first / (sqrt(second) / root_correction + eps);
"""


def fused_adam_kernel():
    """The Adam update of one tensor as a single CUDA kernel (built on first use)."""
    return cupy.ElementwiseKernel(
        "T grad, float64 step_size, float64 root_correction, float64 beta1, float64 beta2, float64 eps",
        "T param, T first, T second",
        _ADAM_SOURCE,
        "capsbench_fused_adam",
    )


class PeakCounter:
    """Peaks of a memory pool from its allocation events: bytes in live blocks, bytes held from the device."""

    def __init__(self, live: int, reserved: int) -> None:
        self.live = self.live_peak = live
        self.reserved_peak = reserved

    def allocated(self, size: int) -> None:
        self.live += size
        self.live_peak = max(self.live_peak, self.live)

    def freed(self, size: int) -> None:
        self.live -= size

    def reserved(self, total: int) -> None:
        self.reserved_peak = max(self.reserved_peak, total)

    def peaks(self) -> AllocatorPeaks:
        return AllocatorPeaks(live=self.live_peak, reserved=self.reserved_peak)


class PoolPeakHook(MemoryHook):
    """A CuPy memory hook feeding a :class:`PeakCounter`: ``malloc`` / ``free`` are the pool handing out and
    taking back a block (its rounded size), ``alloc`` the pool taking new memory from the device."""

    name = "capsbench_pool_peaks"

    def __init__(self, pool) -> None:
        self.pool = pool
        self.counter = PeakCounter(live=pool.used_bytes(), reserved=pool.total_bytes())

    def malloc_postprocess(self, **kwargs):  # device_id, size, mem_size (rounded), mem_ptr, pmem_id
        self.counter.allocated(kwargs["mem_size"])

    def free_postprocess(self, **kwargs):  # device_id, mem_size, mem_ptr, pmem_id
        self.counter.freed(kwargs["mem_size"])

    def alloc_postprocess(self, **kwargs):  # device_id, mem_size, mem_ptr: new memory from the device
        self.counter.reserved(self.pool.total_bytes())


class CupyCapsNet(NumpyCapsNet):
    """CapsNet on an NVIDIA GPU through CuPy; forward and backward written by hand, the routing of every
    built-in algorithm from :data:`implementations.numpy.routing.ROUTING`."""

    framework = "cupy"
    routing_algorithms = ROUTING_ALGORITHMS

    @classmethod
    def array_module(cls):
        return cupy

    @classmethod
    def availability(cls, device: str) -> Availability:
        if cupy is None:
            return Availability.missing(_IMPORT_ERROR)
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # CUDARuntimeError: cudaErrorInsufficientDriver, cudaErrorNoDevice, ...
            return Availability.missing(f"no CUDA device: {type(error).__name__}: {error}")
        if count == 0:
            return Availability.missing("no CUDA device (cupy sees 0 devices)")
        return Availability.ok()

    def __init__(self, config, params, dtype="float32", device="cuda", routing_variant="vectorised"):
        super().__init__(config, params, dtype, device, routing_variant)
        self._on_gpu = cupy is not None and self.xp is cupy
        self._adam_kernel = fused_adam_kernel() if self._on_gpu else None
        self._peak_hook = None
        self._last_peaks: AllocatorPeaks | None = None

    def _adam_update(self) -> None:
        if self._adam_kernel is None:
            return super()._adam_update()
        step_size, root_correction = self._next_adam_step()
        for name, param in self.params.items():
            first, second = self._moments[name]
            self._adam_kernel(self.grads[name], step_size, root_correction, ADAM.beta1, ADAM.beta2, ADAM.eps,
                              param, first, second)

    def synchronize(self) -> None:
        if self._on_gpu:
            cupy.cuda.get_current_stream().synchronize()

    def reset_peak_memory(self) -> None:
        if not self._on_gpu:
            return
        self.synchronize()
        self._stop_peak_hook()
        self._peak_hook = PoolPeakHook(cupy.get_default_memory_pool())
        self._peak_hook.__enter__()

    def allocator_peaks(self) -> AllocatorPeaks | None:
        """The pool's peaks since :meth:`reset_peak_memory`; following the pool stops here."""
        if not self._on_gpu:
            return None
        self.synchronize()
        self._stop_peak_hook()
        return self._last_peaks

    def _stop_peak_hook(self) -> None:
        if self._peak_hook is not None:
            self._peak_hook.__exit__(None, None, None)
            self._last_peaks = self._peak_hook.counter.peaks()
            self._peak_hook = None

    def release_cached_memory(self) -> None:
        if self._on_gpu:
            self.synchronize()
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()

    def pci_bus_id(self) -> str | None:
        return cupy.cuda.Device().pci_bus_id if self._on_gpu else None


for _variant in ROUTING_VARIANTS:
    register(f"cupy-{_variant}", CupyCapsNet, device="cuda", routing_variant=_variant)
