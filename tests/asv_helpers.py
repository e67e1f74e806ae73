"""Running asv from the tests: a HOME of its own, a copy of asv.conf.json writing into a temporary folder, and
the figures of a saved results file by implementation."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
from pathlib import Path

from conftest import REPO_ROOT


def throwaway_repository(folder: Path) -> Path:
    """A git repository of one empty commit on ``main``, for asv to take a commit hash and date from: with
    ``--python=same`` the code measured is this checkout's (and the benchmarks its ``benchmarks/``), so the
    tests need no git history of their own (the planted-bug check runs them in a copy without one)."""
    repo = folder / "repo"
    repo.mkdir(exist_ok=True)
    for command in (["init", "-q", "-b", "main"],
                    ["-c", "user.name=capsbench", "-c", "user.email=tests@capsbench", "commit", "-q", "--allow-empty",
                     "-m", "the commit asv's results are filed under"]):
        subprocess.run(["git", *command], cwd=repo, check=True, capture_output=True, timeout=60)
    return repo


def write_asv_config(folder: Path, results: Path) -> Path:
    """A copy of asv.conf.json in ``folder`` whose results go to ``results``, its environments and HTML to
    ``folder`` (even a dry run rewrites the results folder's benchmarks.json, which the committed results
    need as they are) and its repository is a throwaway one (:func:`throwaway_repository`); the plugins and
    everything else as the repository has them."""
    lines = (REPO_ROOT / "asv.conf.json").read_text().splitlines()
    conf = json.loads("\n".join(line for line in lines if not line.strip().startswith("//")))
    conf.update(repo=str(throwaway_repository(folder)), benchmark_dir=str(REPO_ROOT / "benchmarks"),
                results_dir=str(results), env_dir=str(folder / "env"), html_dir=str(folder / "html"))
    path = folder / "asv.conf.json"
    path.write_text(json.dumps(conf))
    return path


def asv_environment(home: Path) -> dict:
    """The environment of an asv run with ``home`` as HOME, holding the machine description `asv machine --yes`
    writes (asv refuses to run without one; the user's own ~/.asv-machine.json stays untouched), the smoke
    profile, and ASV_CONFIG: a configuration writing its results to ``home/results``."""
    config = write_asv_config(home, home / "results")
    env = {**os.environ, "HOME": str(home), "CAPSBENCH_PROFILE": "smoke", "ASV_CONFIG": str(config)}
    subprocess.run(["asv", "machine", "--yes"], cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=120)
    return env


def run_asv(env: dict, command: str, *args: str) -> subprocess.CompletedProcess:
    """``asv COMMAND --config ...`` in ``env``.  asv drops PYTHONPATH from the environment of the processes it
    starts (discovery, benchmarks) and passes ASV_PYTHONPATH on as theirs: set to PYTHONPATH here, so the
    benchmarks import the code and the plugins the test names, not whatever the virtualenv installed."""
    if "PYTHONPATH" in env:
        env = {**env, "ASV_PYTHONPATH": env["PYTHONPATH"]}
    return subprocess.run(["asv", command, "--config", env["ASV_CONFIG"], *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=env, timeout=900, stdin=subprocess.DEVNULL)


def measured_commit(env: dict) -> str:
    """The commit asv files the results of ``env``'s configuration under: its repository's HEAD."""
    repo = json.loads(Path(env["ASV_CONFIG"]).read_text())["repo"]
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()


def run_saved(env: dict, implementations: str, bench: str, *args: str) -> subprocess.CompletedProcess:
    """``asv run --quick --python=same --set-commit-hash COMMIT --bench BENCH`` narrowed by
    CAPSBENCH_IMPLEMENTATIONS, with the facts filed under the same commit (:func:`measured_commit`): a run
    whose results asv saves."""
    commit = measured_commit(env)
    env = {**env, "CAPSBENCH_IMPLEMENTATIONS": implementations, "CAPSBENCH_ASV_COMMIT": commit,
           "CAPSBENCH_ASV_CONFIG": env["ASV_CONFIG"]}
    return run_asv(env, "run", "--quick", "--python=same", "--set-commit-hash", commit, "--bench", bench,
                   "--show-stderr", *args)


def saved_results(results: Path) -> list[Path]:
    """The results files asv saved under ``results`` (one per machine, commit and environment)."""
    return [path for path in results.glob("*/*.json") if path.name != "machine.json"]


def figures(path: Path, benchmark: str) -> dict[tuple, float]:
    """``benchmark``'s figures in the results file ``path``, by grid cell (its parameters as asv writes them,
    implementation first), the cells without one (skipped: NaN; failed: None) left out."""
    saved = json.loads(path.read_text())
    row = dict(zip(saved["result_columns"], saved["results"][benchmark]))
    cells = itertools.product(*row["params"])
    return {cell: value for cell, value in zip(cells, row["result"]) if value is not None and not math.isnan(value)}


def implementations_with_figures(path: Path, benchmark: str) -> set[str]:
    return {json.loads(cell[0].replace("'", '"')) for cell in figures(path, benchmark)}
