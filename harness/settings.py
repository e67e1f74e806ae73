"""Every setting capsbench reads from the environment, and every folder its results go to, named once.

Everything else imports these names from here (as scikit-learn's asv suite builds each setting and path in
one ``get_from_config()``); the table of environment variables in docs/development.md is generated from
:data:`ENVIRONMENT` (``capsbench readme``), so the two cannot drift apart.

Results folders: ``runs/`` (git-ignored) is where every command writes by default, ``results/`` what the
repository ships; below either, each kind of result has its folder (:data:`RESULTS_FOLDERS`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

# Environment variables ----------------------------------------------------------------------------------

DATA_DIR_ENV = "CAPSBENCH_DATA_DIR"
PROFILE_ENV = "CAPSBENCH_PROFILE"
THREADS_ENV = "CAPSBENCH_THREADS"
IMPLEMENTATIONS_ENV = "CAPSBENCH_IMPLEMENTATIONS"
ASV_MACHINE_ENV = "CAPSBENCH_ASV_MACHINE"
ASV_COMMIT_ENV = "CAPSBENCH_ASV_COMMIT"
ASV_CONFIG_ENV = "CAPSBENCH_ASV_CONFIG"
PLAN_CACHE_ENV = "CAPSBENCH_PLAN_CACHE"
CONV_PLAN_ENV = "CAPSBENCH_CONV_PLAN"
FAIL_RANK_ENV = "CAPSBENCH_FAIL_RANK"
JAX_CACHE_ENV = "CAPSBENCH_JAX_CACHE"
JAX_CONVOLUTION_ENV = "CAPSBENCH_JAX_CONVOLUTION"

class Setting(NamedTuple):
    """One environment variable's line in the table of docs/development.md: what it sets, and where that is
    explained (a link relative to docs/, or the module that reads it)."""

    sets: str
    explained_in: str


ENVIRONMENT: dict[str, Setting] = {
    DATA_DIR_ENV: Setting("the MNIST folder (the four IDX files, `.gz` or not) where no `--data-dir` is given",
                          "[README](../README.md#your-first-ten-minutes)"),
    PROFILE_ENV: Setting("the asv suite's size profile (`smoke`, `fast` by default, `regular`, `large`, `gpu`; "
                         "`harness/suite/sizes.py`)", "[benchmarks.md](benchmarks.md#profiles)"),
    THREADS_ENV: Setting("the asv suite's thread count for torch, BLAS and OpenMP (default: the CPUs this process "
                         "may use)", "[benchmarks.md](benchmarks.md)"),
    IMPLEMENTATIONS_ENV: Setting("the asv suite's implementations, comma separated (default: every one that can "
                                 "run here)", "[benchmarks.md](benchmarks.md#profiles)"),
    ASV_MACHINE_ENV: Setting("the asv machine name the suite's facts are filed under, where `asv run --machine "
                             "NAME` is not the host name", "[benchmarks.md](benchmarks.md)"),
    ASV_COMMIT_ENV: Setting("the commit the facts are filed under with `asv run --python=same --set-commit-hash` "
                            "(asv exports none there)", "[benchmarks.md](benchmarks.md)"),
    ASV_CONFIG_ENV: Setting("the asv configuration file, with `asv run --python=same --config FILE`",
                            "[benchmarks.md](benchmarks.md)"),
    PLAN_CACHE_ENV: Setting("the folder of what is measured once per machine: torch-fused's plans "
                            "(`conv-plans.json`) and the FMA peak (`fma-peak.json`); default "
                            "`$XDG_CACHE_HOME/capsbench`, else `~/.cache/capsbench`",
                            "[benchmarks.md](benchmarks.md)"),
    CONV_PLAN_ENV: Setting("`fixed`: torch-fused uses its built-in convolution plan instead of measuring one where "
                           "it runs", "[benchmarks.md](benchmarks.md)"),
    JAX_CACHE_ENV: Setting("JAX's persistent compilation cache (default `runs/jax-cache`)",
                           "`implementations/jax/capsnet.py`"),
    JAX_CONVOLUTION_ENV: Setting("`xla`: the JAX implementations use XLA's own convolution instead of im2col + "
                                 "GEMM (default `im2col`)", "`implementations/jax/capsnet.py`"),
    FAIL_RANK_ENV: Setting("tests only: the data-parallel rank that fails (`R:K`) or hangs (`R:K:hang`) on purpose",
                           "`harness/training/ddp.py`"),
}

# Results folders --------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"  # shipped with the repository
RUNS_DIR = REPO_ROOT / "runs"  # a user's own runs (git-ignored): every command's default

TRAINING_SUBDIR = "training"
SCALING_SUBDIR = "distributed"
PROFILE_SUBDIR = "profile"
FIGURES_SUBDIR = "figures"
ASV_RESULTS_SUBDIR = "asv"  # asv.conf.json's "results_dir" is runs/asv
FACTS_SUBDIR = "asv-facts"
REPORT_SUBDIR = "report"
JAX_CACHE_DIR = RUNS_DIR / "jax-cache"  # not a result: JAX's compiled programs, kept between processes



def cache_dir() -> Path:
    """capsbench's cache folder, for what is measured once per machine (torch-fused's plans, the FMA peak):
    ``$CAPSBENCH_PLAN_CACHE``, else ``$XDG_CACHE_HOME/capsbench``, else ``~/.cache/capsbench``."""
    if os.environ.get(PLAN_CACHE_ENV):
        return Path(os.environ[PLAN_CACHE_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "capsbench"
    return Path.home() / ".cache" / "capsbench"


RESULTS_FOLDERS: dict[str, str] = {
    TRAINING_SUBDIR: "capsbench train (and under torchrun): one results file per run, its checkpoint beside it",
    SCALING_SUBDIR: "capsbench scaling: data-parallel step times per world size",
    PROFILE_SUBDIR: "capsbench profile: per-layer time, FLOPs and memory; torch traces",
    FIGURES_SUBDIR: "capsbench figures: reconstructions, perturbations, confusion",
    ASV_RESULTS_SUBDIR: "the asv suite's results",
    FACTS_SUBDIR: "the machine and implementation facts of each asv run",
    REPORT_SUBDIR: "capsbench report: Markdown tables and plots",
}
