"""The machine facts asv does not record, written beside the asv results, and the thread count tracked.

asv records the CPU, OS, Python and the environment's requirements.  This benchmark adds what a reader
of GPU and CPU figures also needs: GPU name, driver and CUDA version, torch / CuPy / NumPy versions, the
BLAS, and the thread counts, into ``results/asv-facts/<machine>/<commit>-<environment>.json``.
"""

import os
import platform
from pathlib import Path

from benchmarks.common import PROFILE_NAME, THREADS
from harness.environment import machine_facts
from harness.profiles import FACTS_SUBDIR
from harness.results import write_json_atomic
from harness.threads import set_threads, thread_facts

MACHINE_ENV = "CAPSBENCH_ASV_MACHINE"  # set it when `asv run --machine NAME` is not the hostname


def facts_path() -> Path:
    root = Path(os.environ.get("ASV_CONF_DIR", Path(__file__).resolve().parent.parent))
    machine = os.environ.get(MACHINE_ENV) or platform.node()
    commit = os.environ["ASV_COMMIT"][:8]
    environment = os.environ.get("ASV_ENV_NAME", "unknown")
    return root / "results" / FACTS_SUBDIR / machine / f"{commit}-{environment}.json"


class MachineFacts:
    timeout = 300

    def setup(self):
        set_threads(THREADS)
        if "ASV_COMMIT" not in os.environ:
            return  # a dry run or a run without a commit: asv saves no results for facts to sit beside
        facts = machine_facts()
        facts.update(threads=thread_facts(), profile=PROFILE_NAME, asv_commit=os.environ.get("ASV_COMMIT"),
                     asv_env_name=os.environ.get("ASV_ENV_NAME"))
        write_json_atomic(facts_path(), facts)

    def track_threads(self):
        """The number of CPU threads every benchmark runs with (CAPSBENCH_THREADS, default: all cores)."""
        return THREADS

    track_threads.unit = "threads"
