"""Results files: where they go, written atomically, read back with a clear error when malformed.

Two folders (named in :mod:`harness.settings`): ``runs/`` (git-ignored) is where every command writes by
default, so a user's runs never touch what the repository tracks; ``results/`` holds the results this
repository ships, written only when a command is pointed at it (``--out results/...``) or a run is kept
(``capsbench keep``).

A results file is replaced in one ``os.replace`` of a complete temporary file in the same folder, so a
crash, Ctrl-C or full disk never leaves a half-written file, and a file a user ran before is only ever
replaced by a complete newer one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import UserError
from harness.measure.peak import with_one_peak

if TYPE_CHECKING:
    import pandas as pd

TRAINING_KIND = "capsbench-training"
FIGURES_KIND = "capsbench-figures"
FIGURES_JSON, FIGURES_MD = "figures.json", "figures.md"
FIGURES_FILES = {"reconstructions": "reconstructions.png", "perturbations": "perturbations.png",
                 "confusion": "confusion.png"}
SCALING_KIND = "capsbench-distributed-scaling"
PROFILE_KIND = "capsbench-profile"
EPOCH_FIELDS = ("epoch", "mean_loss", "test_accuracy", "train_seconds", "images", "elapsed_seconds")
STEP_FIELDS = ("epoch", "step", "loss", "elapsed_seconds")
SCALING_RUN_FIELDS = ("world_size", "images_per_second")


class ResultsFileError(UserError, ValueError):
    """A results file that cannot be read or lacks what it must hold (exit status 2 where a command stops at
    it; the report and keep skip such a file with a warning)."""


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


def writable_folder(folder: str | os.PathLike) -> Path:
    """``folder``, created, once a file can be made in it as every results file is (a temporary file, then a
    rename); the OSError otherwise.  Every command that writes calls it on its output folder before its long
    work, so that an output it cannot write ends it at once in one line (:func:`unwritable_line`), never in
    a traceback after the work."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".capsbench-", suffix=".probe", dir=folder)
    except OSError as error:  # the folder is what cannot be written, not the probe's name
        raise OSError(error.errno, error.strerror, str(folder)) from error
    os.close(descriptor)
    os.unlink(probe)
    return folder


def unwritable_line(folder: str | os.PathLike, error: OSError, what: str = "the results", option: str = "--out") -> str:
    """One line for an output ``folder`` that cannot be written (without "error: "): the folder, why (a file
    in its way, else the system's reason, with the file that failed where it is not the folder) and the fix
    (another ``option``)."""
    folder = Path(folder)
    blocker = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
    why = f"{blocker} is a file, not a folder" if blocker else error.strerror or str(error)
    failed = Path(error.filename).name if error.filename and blocker is None and Path(error.filename) != folder \
        and folder in Path(error.filename).parents else None
    return f"cannot write {what} into {folder}: {why}{f' ({failed})' if failed else ''}; choose another {option}"


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


def read_scaling_result(path: str | os.PathLike) -> dict:
    """A distributed-scaling results file written by ``python -m harness.scaling``, checked for what the
    report needs: a non-empty list of runs, each with a positive world size and images/s."""
    payload = read_json(path)
    if payload.get("kind") != SCALING_KIND:
        raise ResultsFileError(f"{path}: not a capsbench distributed-scaling file (kind {payload.get('kind')!r})")
    runs = payload.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ResultsFileError(f"{path}: 'runs' must be a non-empty list")
    for index, run in enumerate(runs):
        if not isinstance(run, dict):
            raise ResultsFileError(f"{path}: runs[{index}] is not an object")
        for key in SCALING_RUN_FIELDS:
            value = run.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ResultsFileError(f"{path}: runs[{index}].{key} is missing or not a positive number")
    return payload


def read_figures_result(path: str | os.PathLike) -> dict:
    """A ``figures.json`` written by ``python -m harness.figures``, checked for what the report shows: a
    square confusion matrix of counts and the file names of the figures."""
    payload = read_json(path)
    if payload.get("kind") != FIGURES_KIND:
        raise ResultsFileError(f"{path}: not a capsbench figures file (kind {payload.get('kind')!r})")
    confusion = payload.get("confusion")
    if (not isinstance(confusion, list) or not confusion
            or any(not isinstance(row, list) or len(row) != len(confusion) for row in confusion)
            or any(not isinstance(count, int) or count < 0 for row in confusion for count in row)):
        raise ResultsFileError(f"{path}: 'confusion' must be a square matrix of counts")
    if not isinstance(payload.get("files"), dict):
        raise ResultsFileError(f"{path}: missing field 'files'")
    return payload


def load_figures_result(folder: Path, warnings: list[str]) -> dict | None:
    """``<folder>/figures.json``, or None where there is none (no section) or it is malformed (a warning)."""
    path = folder / FIGURES_JSON
    if not path.is_file():
        return None
    try:
        return read_figures_result(path)
    except ResultsFileError as error:
        warnings.append(f"warning: {error}; file skipped")
        return None


def json_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _load_all(folder: Path, read, warnings: list[str]) -> list[tuple[Path, dict]]:
    records = []
    for path in json_files(folder):
        try:
            records.append((path, read(path)))
        except ResultsFileError as error:
            warnings.append(f"warning: {error}; file skipped")
    return records


def load_training_results(folder: Path, warnings: list[str]) -> list[tuple[Path, dict]]:
    """Every readable training results file in ``folder``; a malformed one is a warning line."""
    return _load_all(folder, read_training_result, warnings)


def load_scaling_results(folder: Path, warnings: list[str]) -> list[tuple[Path, dict]]:
    """Every readable distributed-scaling file in ``folder`` (none, silently, if the folder is absent)."""
    return _load_all(folder, read_scaling_result, warnings)


# Profile results (capsbench profile's folder) ---------------------------------------------------------------

PROFILE_CSV, PROFILE_JSON = "profile.csv", "profile.json"
PROFILE_PHASES = ("forward", "backward", "update")
PROFILE_TEXT_COLUMNS = ["implementation", "framework", "device", "config_name", "dtype", "phase", "layer"]
PROFILE_NUMBER_COLUMNS = ["batch_size", "order", "steps", "time_s", "time_q25_s", "time_q75_s", "share", "flops",
                          "gflops_per_s", "peak_gflops", "pct_of_peak", "memory_allocated_bytes",
                          "memory_peak_bytes"]
PROFILE_REQUIRED = ["implementation", "phase", "layer", "order", "steps", "time_s", "share"]  # columns it must have
PROFILE_NOT_EMPTY = ["order", "steps"]  # numbers every row must give (a layer a plugin does not time: empty time)


@dataclass
class Profile:
    """``python -m harness.profile``'s results: the tidy per-layer table and the metadata beside it."""

    frame: pd.DataFrame  # one row per implementation x phase x layer, PROFILE_TEXT/NUMBER_COLUMNS
    meta: dict = field(default_factory=dict)  # profile.json ({} where absent or skipped)
    path: Path | None = None

    def implementations(self) -> list[str]:
        return list(dict.fromkeys(self.frame["implementation"]))

    def about(self, name: str) -> dict:
        """profile.json's entry for an implementation, else what the CSV rows say of it."""
        described = (self.meta.get("implementations") or {}).get(name)
        if isinstance(described, dict):
            return described
        rows = self.frame[self.frame["implementation"] == name]
        if rows.empty:
            return {}
        first = rows.iloc[0]
        return {key: first[key] for key in ("framework", "device", "config_name", "batch_size", "dtype", "steps")
                if first[key] == first[key] and first[key] != ""}  # not NaN, not empty


def read_profile_csv(path: Path) -> pd.DataFrame:
    """profile.csv checked for what the report needs; ResultsFileError names the file and the problem."""
    import pandas as pd  # here: the commands that only write results never import pandas

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ResultsFileError(f"{path}: not a readable CSV file ({str(error).strip()})") from None
    missing = [column for column in PROFILE_REQUIRED if column not in frame.columns]
    if missing:
        raise ResultsFileError(f"{path}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise ResultsFileError(f"{path}: no rows")
    for column in PROFILE_TEXT_COLUMNS + PROFILE_NUMBER_COLUMNS:
        if column not in frame:
            frame[column] = ""
    for column in PROFILE_NUMBER_COLUMNS:
        text = frame[column].str.strip()
        numbers = pd.to_numeric(text.where(text != ""), errors="coerce")
        bad = numbers.isna() & (text != "")
        if column in PROFILE_NOT_EMPTY:
            bad |= text == ""
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise ResultsFileError(f"{path}: row {row + 2}: {column} is {frame[column].iloc[row]!r}, not a number")
        frame[column] = numbers.astype(float)
    phases = set(frame["phase"]) - set(PROFILE_PHASES)
    if phases:
        raise ResultsFileError(f"{path}: phase {sorted(phases)[0]!r} is not one of {', '.join(PROFILE_PHASES)}")
    if (frame["implementation"].str.strip() == "").any() or (frame["layer"].str.strip() == "").any():
        raise ResultsFileError(f"{path}: a row without an implementation or a layer")
    duplicated = frame.duplicated(["implementation", "phase", "layer"])
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        raise ResultsFileError(f"{path}: two rows for {row['implementation']} {row['phase']} {row['layer']}")
    return frame[PROFILE_TEXT_COLUMNS + PROFILE_NUMBER_COLUMNS]


def read_profile_json(path: Path) -> dict:
    payload = read_json(path)
    if payload.get("kind") != PROFILE_KIND:
        raise ResultsFileError(f"{path}: not a capsbench profile file (kind {payload.get('kind')!r})")
    if not isinstance(payload.get("implementations", {}), dict):
        raise ResultsFileError(f"{path}: 'implementations' is not an object")
    return payload


def load_profile_result(folder: Path, warnings: list[str]) -> Profile | None:
    """``<folder>/profile.csv`` with ``profile.json`` beside it; None where there is no CSV (no section) or it
    is malformed (one warning naming it).  A malformed profile.json is a warning too, and the table is
    shown without it."""
    csv, meta = folder / PROFILE_CSV, folder / PROFILE_JSON
    if not csv.is_file():
        return None
    try:
        frame = read_profile_csv(csv)
    except ResultsFileError as error:
        warnings.append(f"warning: {error}; file skipped")
        return None
    payload = {}
    if meta.is_file():
        try:
            payload = read_profile_json(meta)
        except ResultsFileError as error:
            warnings.append(f"warning: {error}; file skipped (the profile table is shown without it)")
    return Profile(with_one_peak(frame, payload), payload, csv)
