"""The facts asv does not record (GPU, libraries, BLAS, threads, suite profile, what each implementation is,
what each routing algorithm is, the plans it chose), written by the suite beside each run's results and read by
:mod:`harness.suite.asv_results`.

Where they go follows from the asv configuration in use (its ``results_dir``, which this module parses:
asv.conf.json allows ``//`` comments) and the commit, machine and environment asv is measuring:
``<results>/../asv-facts/<machine>/<commit8>-<environment>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

from harness import registry, routing_algorithms
from harness.measure.machine import machine_facts
from harness.results import ResultsFileError, read_json, write_json_atomic
from harness.settings import ASV_COMMIT_ENV, ASV_CONFIG_ENV, ASV_MACHINE_ENV, FACTS_SUBDIR, REPO_ROOT
from harness.threads import set_threads, thread_facts

# asv exports the commit being measured (ASV_COMMIT) and its configuration's folder (ASV_CONF_DIR), except
# with --python=same; there $CAPSBENCH_ASV_COMMIT and $CAPSBENCH_ASV_CONFIG stand in for them.


def asv_config_path() -> Path:
    """The asv configuration in use: ASV_CONF_DIR's, else $CAPSBENCH_ASV_CONFIG, else the repository's."""
    if os.environ.get("ASV_CONF_DIR"):
        return Path(os.environ["ASV_CONF_DIR"]) / "asv.conf.json"
    if os.environ.get(ASV_CONFIG_ENV):
        return Path(os.environ[ASV_CONFIG_ENV])
    return REPO_ROOT / "asv.conf.json"


def asv_results_dir() -> Path:
    """The results folder of the asv configuration in use (``results_dir``, relative to the config)."""
    path = asv_config_path()
    conf = json.loads(re.sub(r"^\s*//.*$", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE))
    return (path.parent / conf.get("results_dir", "results")).resolve()


def measured_commit() -> str | None:
    """The commit asv is measuring: ASV_COMMIT, else $CAPSBENCH_ASV_COMMIT (--python=same runs)."""
    return os.environ.get("ASV_COMMIT") or os.environ.get(ASV_COMMIT_ENV) or None


def facts_path(commit: str) -> Path:
    """``<results>/../asv-facts/<machine>/<commit8>-<environment>.json`` (``<commit8>.json`` where asv names
    no environment, as with --python=same; the report reads either)."""
    machine = os.environ.get(ASV_MACHINE_ENV) or platform.node()
    environment = os.environ.get("ASV_ENV_NAME")
    name = f"{commit[:8]}-{environment}.json" if environment else f"{commit[:8]}.json"
    return asv_results_dir().parent / FACTS_SUBDIR / machine / name


_facts_written = False


def write_run_facts(threads: int, profile: str, left_out=None) -> None:
    """Write the facts asv does not record beside the run's results, once per benchmark process; the plans
    earlier benchmark processes of the run recorded stay.  ``left_out`` (a callable, called only when the
    facts are written) gives the implementations the suite's settings leave out, with why, for the report."""
    global _facts_written
    commit = measured_commit()
    if _facts_written or commit is None:
        return  # a dry run or a run without a commit: asv saves no results for facts to sit beside
    set_threads(threads)
    facts = machine_facts()
    facts.update(threads=thread_facts(), profile=profile, asv_commit=commit,
                 asv_env_name=os.environ.get("ASV_ENV_NAME"),
                 implementations={info.name: info.describe() for info in registry.entries()},
                 routing_algorithms=routing_algorithm_facts(),
                 left_out=left_out() if left_out else {})
    previous = facts_path(commit)
    if previous.is_file():
        try:
            facts["plans"] = read_json(previous).get("plans", {})
        except ResultsFileError:
            pass
    write_json_atomic(facts_path(commit), facts)
    _facts_written = True


def routing_algorithm_facts() -> dict[str, dict]:
    """What the report needs to know of each routing algorithm without importing a plugin: whether it is
    iterative (the suite measures one iteration count of one that is not), its routing gradients, citation
    and source."""
    return {name: {"iterative": known.iterative, "routing_gradients": list(known.routing_gradients),
                   "citation": known.citation, "source": known.source}
            for name in routing_algorithms.names() for known in [routing_algorithms.get(name)]}


def add_plan_facts(name: str, impl) -> None:
    """Add the plans an implementation chose for its batch shapes (``plan_facts()``, torch-fused's convolution
    strategies) to the run's facts under ``plans[name][batch size]``, so every figure says which plan made it.
    The facts file must exist (:func:`write_run_facts` first)."""
    plan_facts = getattr(impl, "plan_facts", None)
    commit = measured_commit()
    if plan_facts is None or commit is None:
        return
    path = facts_path(commit)
    facts = read_json(path)
    facts.setdefault("plans", {}).setdefault(name, {}).update(plan_facts())
    write_json_atomic(path, facts)
