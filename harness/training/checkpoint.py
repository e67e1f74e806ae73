"""The checkpoint of a training run: the parameters and Adam's state after the last completed epoch, in
``<results>.checkpoint.npz`` beside the results file, so that ``--resume`` continues exactly where the run
stopped and ``capsbench figures`` reads a trained network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from harness import contract
from harness.results import atomic_output


def checkpoint_path(results: Path) -> Path:
    """Where the checkpoint of a results file lives: beside it."""
    return Path(results).with_suffix(".checkpoint.npz")


def save_checkpoint(results: Path, impl: contract.Implementation, epoch: int) -> Path:
    """Parameters and Adam's state after ``epoch``, written atomically beside the results file."""
    path = checkpoint_path(results)
    arrays = {f"param/{name}": value for name, value in impl.parameters().items()}
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
