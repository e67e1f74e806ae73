"""``cupy-vectorised`` and ``cupy-looped``: the array-module CapsNet of :mod:`array_capsnet` on CuPy (CUDA).

All the mathematics is the shared NumPy/CuPy code, exercised on the CPU through NumPy.  The CuPy-only
addition is a fused Adam update (one ``cupy.ElementwiseKernel`` launch per tensor instead of the shared
update's 13 elementwise kernels); the shared ``xp`` update is its fallback, used whenever the array module
is not CuPy.

Allocator peak: CuPy's pool has no peak counter, so :meth:`CupyCapsNet.allocator_peak_bytes` reports the
bytes the pool holds after the step, starting from an emptied pool.  The pool keeps freed blocks, so this is
the step's peak rounded up to the pool's block sizes, comparable with torch's ``max_memory_reserved``
rather than with the ``max_memory_allocated`` that the torch implementation reports.
"""

from __future__ import annotations

from harness.registry import ROUTING_VARIANTS, Availability, register
from implementations.array_capsnet import ArrayCapsNet
from harness.spec import ADAM

try:
    import cupy
except ImportError:
    cupy = None
    _IMPORT_ERROR = "cupy not installed (pip install cupy-cuda12x, or cupy-cuda13x for CUDA 13)"
except Exception as error:  # a broken CUDA toolkit can make the import itself fail
    cupy = None
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


class CupyCapsNet(ArrayCapsNet):
    """CapsNet on an NVIDIA GPU through CuPy; forward and backward written by hand."""

    framework = "cupy"

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

    def __init__(self, config, params, dtype="float32", device="cuda", routing="vectorised"):
        super().__init__(config, params, dtype, device, routing)
        self._adam_kernel = fused_adam_kernel() if self.xp is cupy and cupy is not None else None

    def adam_step(self) -> None:
        if self._adam_kernel is None:
            return super().adam_step()
        step_size, root_correction = self._next_adam_step()
        for name, param in self.params.items():
            first, second = self._moments[name]
            self._adam_kernel(self.grads[name], step_size, root_correction, ADAM.beta1, ADAM.beta2, ADAM.eps,
                              param, first, second)

    def synchronize(self) -> None:
        if self.xp is cupy:
            cupy.cuda.get_current_stream().synchronize()

    def reset_peak_memory(self) -> None:
        if self.xp is cupy:
            self.synchronize()
            cupy.get_default_memory_pool().free_all_blocks()

    def allocator_peak_bytes(self) -> int | None:
        """Bytes CuPy's pool holds after the region, from an emptied pool (see the module docstring)."""
        if self.xp is not cupy:
            return None
        self.synchronize()
        return int(cupy.get_default_memory_pool().total_bytes())


for _routing in ROUTING_VARIANTS:
    register(f"cupy-{_routing}", CupyCapsNet, device="cuda", routing=_routing)
