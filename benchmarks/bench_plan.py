"""Set-up time of the implementations that choose their convolution plan where they run (torch-fused).

Their first step of a batch shape times every candidate strategy of each convolution product and keeps the
fastest; the step benchmarks pay that in ``setup`` (their warm-up step), never in a timed call, and a later
process reads the choice from the plan cache.  This benchmark reports the measuring apart, at each batch size
of the grid, in a fresh cache folder so that it always measures (the user's cache is left as it is).
"""

import os
import tempfile
import time

from benchmarks.common import BATCH_SIZES, CONFIG, IMPLEMENTATIONS, build, setup_benchmark


class PlanTime:
    params = [IMPLEMENTATIONS, BATCH_SIZES]
    param_names = ["implementation", "batch_size"]
    timeout = 1800

    def setup(self, name, batch_size):
        info = setup_benchmark(name)
        if not hasattr(info.cls, "use_plan_for"):
            raise NotImplementedError(f"{name} does not choose a plan where it runs")
        self.prepared = build(name, batch_size, CONFIG.routing_iterations, warm_up=None)

    def track_plan_seconds(self, name, batch_size):
        """Seconds to measure and choose the plan of a fresh model at this batch size (cache empty)."""
        from harness.settings import PLAN_CACHE_ENV

        saved = os.environ.get(PLAN_CACHE_ENV)
        with tempfile.TemporaryDirectory(prefix="capsbench-plan-time-") as folder:
            os.environ[PLAN_CACHE_ENV] = folder
            try:
                start = time.perf_counter()
                self.prepared.impl.use_plan_for(batch_size)
                return time.perf_counter() - start
            finally:
                if saved is None:
                    os.environ.pop(PLAN_CACHE_ENV, None)
                else:
                    os.environ[PLAN_CACHE_ENV] = saved

    track_plan_seconds.unit = "seconds"
