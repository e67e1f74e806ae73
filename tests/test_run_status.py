"""The status sequence of a training results file (harness.training.run_status), as train and distributed write it:
each status and message read back from the file, for every way a run ends."""

from __future__ import annotations

import json
import os

import pytest

from harness.training.run_status import RunStatus, Terminated, TrainingDiverged


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_a_run_is_written_running_by_this_process_then_completed(tmp_path):
    out = tmp_path / "run.json"
    run = RunStatus(out, {"epochs": []})
    run.start()
    assert read(out)["status"] == "running" and read(out)["pid"] == os.getpid() and read(out)["message"] == ""
    run.completed()
    assert (read(out)["status"], read(out)["message"]) == ("completed", "")


@pytest.mark.parametrize("error, status, message", [
    (TrainingDiverged("loss is nan"), "stopped", "training diverged: loss is nan"),
    (Terminated(15), "interrupted", "terminated by signal 15"),
    (KeyboardInterrupt(), "interrupted", "interrupted by the user"),
    (MemoryError("out of memory"), "failed", "MemoryError: out of memory"),
])
def test_a_run_ended_by_an_error_says_how(tmp_path, error, status, message):
    out = tmp_path / "run.json"
    run = RunStatus(out, {})
    run.start()
    assert run.ended_by(error) == message
    assert (read(out)["status"], read(out)["message"]) == (status, message)


def test_a_message_given_replaces_the_default_but_not_the_status(tmp_path):
    out = tmp_path / "run.json"
    RunStatus(out, {}).ended_by(TrainingDiverged("nan"), message="rank 1: TrainingDiverged: nan")
    assert (read(out)["status"], read(out)["message"]) == ("stopped", "rank 1: TrainingDiverged: nan")
