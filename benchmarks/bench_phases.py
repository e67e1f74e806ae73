"""Time of each phase of CapsNet training and inference, for every implementation on the grid.

One class per timed operation, so that each is warmed up by exactly the call it times.  The operations
the routing gradient changes (train step, backward, routing forward + backward) are measured at each
routing gradient of the profile (``routing_gradient``); every benchmark here at each routing algorithm of the
profile (``routing_algorithm``, the grid's last parameter; self-attention at one iteration count alone,
:mod:`benchmarks.common`).
"""

import numpy as np

from benchmarks.common import (
    BATCH_SIZES,
    CONFIG,
    IMPLEMENTATIONS,
    ROUTING_ALGORITHMS,
    ROUTING_GRADIENTS,
    ROUTING_ITERATIONS,
    GradientBenchmark,
    ModelBenchmark,
    skipped_when_out_of_memory,
)


class TrainStep(GradientBenchmark):
    warm_up = "train_step"

    def time_train_step(self, *params):
        """Forward, backward and one Adam update."""
        self.impl.train_step(self.batch)
        self.impl.synchronize()


class Forward(ModelBenchmark):
    warm_up = "forward"

    def time_forward(self, *params):
        """Training forward pass: the loss, keeping what backward needs (autograd graph or caches)."""
        self.impl.forward_loss(self.batch)
        self.impl.synchronize()


class Inference(ModelBenchmark):
    warm_up = "inference"

    def time_inference(self, *params):
        """Forward pass without the training mask: the decoder sees the longest capsule, no graph kept."""
        self.impl.forward(self.batch, train=False)
        self.impl.synchronize()


class Backward(GradientBenchmark):
    """Backward alone: each sample's setup runs a fresh training forward pass outside the timed region."""

    warm_up = "backward"

    def setup(self, *params):
        super().setup(*params)
        self.impl.forward_loss(self.batch)
        self.impl.synchronize()

    def time_backward(self, *params):
        self.impl.backward()
        self.impl.synchronize()


_routing_inputs: dict[tuple, tuple] = {}


def routing_inputs(benchmark: ModelBenchmark, params: tuple) -> tuple:
    """Fixed u_hat of the prepared batch and a seeded gradient for v, once per process (not before every
    sample), after one warm-up of routing forward and of routing forward + backward."""
    if params not in _routing_inputs:
        impl = benchmark.impl
        with skipped_when_out_of_memory(params[0], params[1]):
            u_hat = impl.prediction_vectors(benchmark.batch)
            shape = (params[1], CONFIG.num_classes, CONFIG.digit_caps_dim)  # v: (B, J, D)
            grad_v = impl.from_numpy(np.random.default_rng(0).standard_normal(shape))
            impl.routing_forward(u_hat)  # warm-ups
            impl.routing_backward(u_hat, grad_v)
        _routing_inputs[params] = (u_hat, grad_v)
    benchmark.impl.synchronize()
    return _routing_inputs[params]


class Routing(ModelBenchmark):
    """The routing iterations alone, on fixed prediction vectors u_hat of the prepared batch, in the layout
    the implementation's routing consumes (no timed region converts it)."""

    params = [IMPLEMENTATIONS, BATCH_SIZES, ROUTING_ITERATIONS, ROUTING_ALGORITHMS]
    warm_up = None

    def setup(self, *params):
        super().setup(*params)
        self.u_hat, self.grad_v = routing_inputs(self, params)

    def time_routing(self, *params):
        """Forward routing: c, s, v for every iteration (dynamic), or the one pass of self-attention."""
        self.impl.routing_forward(self.u_hat)
        self.impl.synchronize()


class RoutingBackward(GradientBenchmark):
    """Routing forward and backward alone, as :class:`Routing`, at each routing gradient of the profile."""

    params = [IMPLEMENTATIONS, BATCH_SIZES, ROUTING_ITERATIONS, ROUTING_GRADIENTS, ROUTING_ALGORITHMS]
    warm_up = None

    def setup(self, *params):
        super().setup(*params)
        self.u_hat, self.grad_v = routing_inputs(self, params)

    def time_routing_backward(self, *params):
        """Routing forward and backward: d loss / d u_hat through every iteration (full) or through the last
        one's weighted sum alone (final); under self-attention, through its one pass."""
        self.impl.routing_backward(self.u_hat, self.grad_v)
        self.impl.synchronize()
