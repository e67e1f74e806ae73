"""Shared fixtures: the MNIST folder, small configurations and seeded inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from harness.spec import SMALL

REPO_ROOT = Path(__file__).resolve().parent.parent
# torch-fused caches the convolution plan it measures; tests (and the processes they start) use their own
# folder, never the user's cache.
os.environ.setdefault("CAPSBENCH_PLAN_CACHE", tempfile.mkdtemp(prefix="capsbench-plans-"))
# XLA compiles the tests' JAX programs (and those of the processes they start) at its lowest backend
# optimisation level: the same operations, so the same tolerances hold, compiled faster (docs/development.md
# says by how much); benchmarks and training keep XLA's default.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
MNIST_CANDIDATES = [REPO_ROOT.parent / "shared" / "data" / "mnist"]


def mnist_dir() -> Path:
    """$CAPSBENCH_DATA_DIR, else the project's shared copy of MNIST next to the repository."""
    if os.environ.get("CAPSBENCH_DATA_DIR"):
        return Path(os.environ["CAPSBENCH_DATA_DIR"])
    for candidate in MNIST_CANDIDATES:
        if (candidate / "train-images-idx3-ubyte.gz").is_file():
            return candidate
    pytest.fail("MNIST not found: set CAPSBENCH_DATA_DIR to the folder with the four IDX files")


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    return mnist_dir()


@pytest.fixture
def small_config():
    return SMALL


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def run_module(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` from the repository root and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
