"""The thread count every benchmark runs with, tracked; and the machine facts, written by every
benchmark's setup (:func:`benchmarks.common.record_facts`), also when this one is the only one run."""

from benchmarks.common import THREADS, record_facts
from harness.threads import set_threads


class MachineFacts:
    timeout = 300

    def setup(self):
        set_threads(THREADS)
        record_facts()

    def track_threads(self):
        """The number of CPU threads every benchmark runs with (CAPSBENCH_THREADS, default: the CPUs this
        process may use)."""
        return THREADS

    track_threads.unit = "threads"
