"""Correctness beside speed: each implementation's largest error against the float64 reference."""

from benchmarks.common import CHECK_BATCH_SIZE, CONFIG, DTYPE, IMPLEMENTATIONS, setup_benchmark
from harness.check import max_error


class Correctness:
    params = [IMPLEMENTATIONS]
    param_names = ["implementation"]
    timeout = 900

    def setup(self, name):
        setup_benchmark(name)

    def track_max_rel_error(self, name):
        """max over lengths, reconstructions, loss, gradients, parameters after 3 Adam steps and routing alone,
        and over the routing case (digit.weight x harness.check.ROUTING_SCALE), where routing bugs show (float32)."""
        return max_error(name, CONFIG, DTYPE, CHECK_BATCH_SIZE)

    track_max_rel_error.unit = "relative error"
