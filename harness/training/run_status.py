"""How a training run's results file says where the run stands, written once for ``capsbench train``
(:mod:`harness.train`) and data-parallel training (:mod:`harness.distributed`).

The sequence: ``running`` when the run starts (with the pid and host of the process writing it), then one
of ``stopped`` (the loss diverged, :class:`TrainingDiverged`), ``interrupted`` (Ctrl-C, or SIGTERM as
:class:`Terminated`), ``failed`` (any other error) or ``completed``; each is written to the file at once
(atomically), so a file never says ``running`` for a run that has ended (a report reading one whose
process is gone says it ended without a status).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from harness.results import write_json_atomic

RUNNING, COMPLETED, STOPPED, INTERRUPTED, FAILED = "running", "completed", "stopped", "interrupted", "failed"


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a scheduler's kill, CI's time limit), raised in the main thread so that the run
    ends as Ctrl-C ends it: results up to the last completed epoch, status 'interrupted'."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def process_facts() -> dict:
    """Which process writes the record ('pid', 'host'): a report reading a file left 'running' by a process
    that no longer exists (SIGKILL, a crashed machine) can say it ended without a status."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def mark_running(record: dict) -> None:
    """Status 'running', by this process (a resumed run is written by a new one)."""
    record.update(status=RUNNING, message="", **process_facts())


def status_of(error: BaseException) -> str:
    """The status a run ended by ``error`` ends with: stopped, interrupted or failed."""
    if isinstance(error, TrainingDiverged):
        return STOPPED
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    return FAILED


def message_of(error: BaseException) -> str:
    """What the results file says of ``error``: the divergence, the signal or Ctrl-C, or the error's type and
    message."""
    if isinstance(error, TrainingDiverged):
        return f"training diverged: {error}"
    if isinstance(error, KeyboardInterrupt):
        return str(error) if isinstance(error, Terminated) else "interrupted by the user"
    return f"{type(error).__name__}: {error}"


class RunStatus:
    """The status sequence of one results file: :meth:`start`, then :meth:`completed` or :meth:`ended_by`."""

    def __init__(self, out: Path, record: dict) -> None:
        self.out, self.record = out, record

    def start(self) -> None:
        """Status 'running', written."""
        mark_running(self.record)
        write_json_atomic(self.out, self.record)

    def completed(self) -> None:
        """Status 'completed', written."""
        self._write(COMPLETED, "")

    def ended_by(self, error: BaseException, message: str | None = None) -> str:
        """Status stopped / interrupted / failed as ``error`` says, with ``message`` (default
        :func:`message_of`), written; returns the message."""
        message = message_of(error) if message is None else message
        self._write(status_of(error), message)
        return message

    def _write(self, status: str, message: str) -> None:
        self.record.update(status=status, message=message)
        write_json_atomic(self.out, self.record)
