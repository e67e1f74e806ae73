"""``cupy-fused``: the CuPy CapsNet with its routing, forward and backward, as a few fused CUDA kernels
(:mod:`implementations.cupy.routing`).  Everything else is :class:`~implementations.cupy.capsnet.CupyCapsNet`;
where the array module is NumPy (the contract tests' stand-in) the NumPy routing stays.
"""

from __future__ import annotations

from harness.registry import register
from harness.spec import ROUTING_GRADIENTS
from implementations.cupy.capsnet import CupyCapsNet
from implementations.cupy.routing import ROUTING


class CupyFusedCapsNet(CupyCapsNet):
    """:class:`~implementations.cupy.capsnet.CupyCapsNet` with the fused routing of
    :data:`implementations.cupy.routing.ROUTING` on the GPU (vectorised variant only: the kernels are the
    vectorised mathematics), under both routing gradients, for dynamic routing alone (the kernels are
    Procedure 1's)."""

    routing_gradients = ROUTING_GRADIENTS
    routing_algorithms = ("dynamic",)

    def __init__(self, config, params, dtype="float32", device="cuda", routing_variant="vectorised"):
        if routing_variant != "vectorised":
            raise ValueError(f"cupy-fused fuses the vectorised routing only, not {routing_variant!r}")
        super().__init__(config, params, dtype, device, routing_variant)
        if self._on_gpu:
            self.routing_functions = ROUTING[("dynamic", routing_variant, config.routing_gradient)]


register("cupy-fused", CupyFusedCapsNet, device="cuda", routing_variant="vectorised")
