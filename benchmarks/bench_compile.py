"""Set-up time of the implementations whose first step compiles (torch.compile) or captures (CUDA graphs).

Their first call of a batch shape does work no later step repeats, and the step benchmarks keep it out of
the timed region (their ``setup`` makes that call).  This benchmark reports it apart: the seconds of a
fresh model's first training step less those of a later one.  Which implementations pay it, each says
itself (the class attribute ``first_call_compiles``); the others are skipped with the reason.  Dynamo's
in-process cache starts empty in each asv process, but Inductor also keeps compiled kernels on disk:
a machine's first run compiles everything, later runs read part of it back (set
TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 to time a cold compile every run).
"""

import time

from benchmarks.common import BATCH_SIZES, CONFIG, IMPLEMENTATIONS, build, setup_benchmark

LATER_STEPS = 3


class CompileTime:
    """One fresh model per process, at the profile's smallest batch and the network's routing iterations
    (compile time barely depends on either; a sweep would compile again at every point)."""

    params = [IMPLEMENTATIONS]
    param_names = ["implementation"]
    timeout = 1800

    def setup(self, name):
        info = setup_benchmark(name)
        if not info.cls.first_call_compiles:
            raise NotImplementedError(f"{name} neither compiles nor captures on its first step")

    def track_compile_seconds(self, name):
        """First training step of a fresh model less the median of the later ones."""
        prepared = build(name, BATCH_SIZES[0], CONFIG.routing_iterations, warm_up=None)
        seconds = []
        for _ in range(1 + LATER_STEPS):
            start = time.perf_counter()
            prepared.impl.train_step(prepared.batch)
            prepared.impl.synchronize()
            seconds.append(time.perf_counter() - start)
        later = sorted(seconds[1:])[LATER_STEPS // 2]
        return seconds[0] - later

    track_compile_seconds.unit = "seconds"
