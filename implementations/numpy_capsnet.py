"""``numpy-vectorised`` and ``numpy-looped``: the array-module CapsNet of :mod:`array_capsnet` on NumPy."""

from harness.registry import ROUTING_VARIANTS, register
from implementations.array_capsnet import ArrayCapsNet


class NumpyCapsNet(ArrayCapsNet):
    """CapsNet on the CPU with NumPy and its BLAS; forward and backward written by hand."""

    framework = "numpy"


for _routing in ROUTING_VARIANTS:
    register(f"numpy-{_routing}", NumpyCapsNet, routing=_routing)
