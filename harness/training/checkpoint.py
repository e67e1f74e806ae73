"""The checkpoint of a training run: the parameters and Adam's state after the last completed epoch, and the
routing algorithm of the network they belong to, in ``<results>.checkpoint.npz`` beside the results file, so
that ``--resume`` continues exactly where the run stopped and ``capsbench figures`` reads a trained network.

Inside the ``.npz``: ``epoch``; ``param/<name>`` for each canonical parameter (:mod:`harness.params`);
``adam/<key>`` for Adam's state; ``routing_algorithm``, the algorithm's name as a 0-d string array (absent
in checkpoints written before the setting, whose network routes with ``dynamic``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from harness import contract
from harness.results import ResultsFileError, atomic_output
from harness.spec import DEFAULT_ROUTING_ALGORITHM

ROUTING_ALGORITHM_KEY = "routing_algorithm"


def checkpoint_path(results: Path) -> Path:
    """Where the checkpoint of a results file lives: beside it."""
    return Path(results).with_suffix(".checkpoint.npz")


def save_checkpoint(results: Path, impl: contract.Implementation, epoch: int) -> Path:
    """Parameters, Adam's state and the routing algorithm after ``epoch``, written atomically beside the results
    file."""
    path = checkpoint_path(results)
    arrays = {ROUTING_ALGORITHM_KEY: np.array(impl.config.routing_algorithm)}
    arrays.update({f"param/{name}": value for name, value in impl.parameters().items()})
    arrays.update({f"adam/{key}": value for key, value in impl.adam_state().items()})
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as stream:
            np.savez(stream, epoch=np.int64(epoch), **arrays)
            stream.flush()
            os.fsync(stream.fileno())
    return path


def load_checkpoint(results: Path) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(epoch, parameters, Adam state) saved beside a results file; a clear error if it is missing."""
    path = checkpoint_path(results)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint beside {results} (a run saves one after each epoch)")
    with np.load(path) as saved:
        epoch = int(saved["epoch"])
        params = {key.split("/", 1)[1]: saved[key] for key in saved.files if key.startswith("param/")}
        adam = {key.split("/", 1)[1]: saved[key] for key in saved.files if key.startswith("adam/")}
    return epoch, params, adam


def saved_routing_algorithm(results: Path) -> str | None:
    """The routing algorithm the checkpoint beside ``results`` records, None for one written before the
    setting (its network routes with dynamic routing) or no checkpoint at all."""
    path = checkpoint_path(results)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return str(saved[ROUTING_ALGORITHM_KEY]) if ROUTING_ALGORITHM_KEY in saved.files else None


def check_routing_algorithm(results: Path, expected: str) -> None:
    """Nothing where the checkpoint beside ``results`` belongs to a network routing with ``expected`` (one
    without the record counts as dynamic); else ResultsFileError naming both, so that no run continues the
    parameters of another network."""
    saved = saved_routing_algorithm(results) or DEFAULT_ROUTING_ALGORITHM
    if saved != expected:
        raise ResultsFileError(f"{checkpoint_path(results)} holds a network that routes with {saved}, but "
                               f"{results} records the routing algorithm {expected}: they are not of one run")
