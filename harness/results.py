"""Results files: written atomically, read back with a clear error when malformed.

A results file is replaced in one ``os.replace`` of a complete temporary file in the same folder, so a
crash, Ctrl-C or full disk never leaves a half-written file, and a file a user ran before is only ever
replaced by a complete newer one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"
TRAINING_DIR = RESULTS_DIR / "training"
TRAINING_KIND = "capsbench-training"
SCALING_DIR = RESULTS_DIR / "distributed"
SCALING_KIND = "capsbench-distributed-scaling"
EPOCH_FIELDS = ("epoch", "mean_loss", "test_accuracy", "train_seconds", "images", "elapsed_seconds")
STEP_FIELDS = ("epoch", "step", "loss", "elapsed_seconds")


class ResultsFileError(ValueError):
    """A results file that cannot be read or lacks what it must hold."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """A temporary path in ``path``'s folder that replaces ``path`` in one rename if the block succeeds;
    if it fails, ``path`` is untouched and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as JSON to ``path`` through a temporary file and an atomic rename."""
    with atomic_output(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=1, allow_nan=True)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


def read_json(path: str | os.PathLike) -> dict:
    """Parse a JSON object from ``path``; ResultsFileError names the file and the problem."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as stream:
            payload = json.load(stream)
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsFileError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(payload, dict):
        raise ResultsFileError(f"{path}: expected a JSON object, found {type(payload).__name__}")
    return payload


def read_training_result(path: str | os.PathLike) -> dict:
    """A training results file written by ``python -m harness.train``, checked for the fields it needs."""
    payload = read_json(path)
    if payload.get("kind") != TRAINING_KIND:
        raise ResultsFileError(f"{path}: not a capsbench training results file (kind {payload.get('kind')!r})")
    for key in ("implementation", "epochs", "steps"):
        if key not in payload:
            raise ResultsFileError(f"{path}: missing field {key!r}")
    for key, fields in (("epochs", EPOCH_FIELDS), ("steps", STEP_FIELDS)):
        if not isinstance(payload[key], list):
            raise ResultsFileError(f"{path}: {key!r} is not a list")
        for index, entry in enumerate(payload[key]):
            if not isinstance(entry, dict) or any(field not in entry for field in fields):
                raise ResultsFileError(f"{path}: {key}[{index}] lacks one of {', '.join(fields)}")
    return payload
