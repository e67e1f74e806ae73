"""Progress of a long loop (training epochs, evaluation), as a person and a log both want it: a tqdm bar
on a terminal; otherwise (piped logs, CI) a plain line every few steps and at the end."""

from __future__ import annotations

import math
import sys
import time

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety: plain lines instead
    tqdm = None

LINES_PER_EPOCH = 10  # without a terminal, about this many progress lines per loop


class Progress:
    """Progress of a loop: a tqdm bar on a terminal; otherwise (piped logs, CI) a plain line every
    ``every`` steps and at the end.  ``enabled`` False prints nothing (the non-root ranks)."""

    def __init__(self, total: int, description: str, every: int | None = None, enabled: bool = True,
                 stream=None) -> None:
        self.total, self.description, self.enabled = total, description, enabled
        self.stream = stream or sys.stderr
        self.every = every or max(1, math.ceil(total / LINES_PER_EPOCH))
        self.count = 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled and tqdm is not None and self.stream.isatty():
            self.bar = tqdm(total=total, desc=description, unit="step", leave=False, file=self.stream)

    def update(self, **values) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if values:
                self.bar.set_postfix({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in values.items()})
        elif self.count % self.every == 0 or self.count == self.total:
            shown = "".join(f", {k} {v:.4f}" if isinstance(v, float) else f", {k} {v}" for k, v in values.items())
            say(f"{self.description}: {self.count}/{self.total} steps, {time.perf_counter() - self.start:.1f} s{shown}",
                self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def say(line: str, stream=None) -> None:
    """``line`` and its newline in one write, flushed (to stderr by default): a whole line even where several
    processes share the stream.  The ranks of a data-parallel run write to one log, and ``print`` writes a
    line and its newline apart, so another rank's text could fall between them."""
    stream = sys.stderr if stream is None else stream
    stream.write(line + "\n")
    stream.flush()
