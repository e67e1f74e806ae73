"""capsbench report as a reader meets it: the headings of the report this repository ships step down one
level at a time (a Markdown outline, a table of contents or a screen reader skips none)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import report

RESULTS = Path(__file__).resolve().parent.parent / "results"
FENCE = re.compile(r"^(```|~~~)")


def heading_levels(markdown: str) -> list[tuple[int, str]]:
    """(level, text) of each ATX heading of ``markdown``, code blocks left out."""
    headings, in_code = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and (match := re.match(r"^(#{1,6}) (.*)", line)):
            headings.append((len(match.group(1)), match.group(2)))
    return headings


def test_heading_levels_counts_only_headings_outside_code():
    assert heading_levels("# a\n```\n## not\n```\n### b\ntext #### no") == [(1, "a"), (3, "b")]


@pytest.fixture
def no_plots(monkeypatch):
    """The report's text without drawing a figure (seconds each, and not what these tests read)."""
    monkeypatch.setattr(report, "benchmark_plots", lambda *args: None)
    monkeypatch.setattr(report, "draw", lambda name, suffix, out, build, entries: None)


def test_the_shipped_report_steps_down_one_heading_level_at_a_time(tmp_path, capsys, no_plots):
    """The training section jumped from '## Training' to '#### 60,000 training images, ...'."""
    assert report.main(["--results", str(RESULTS), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    headings = heading_levels((tmp_path / "report.md").read_text(encoding="utf-8"))
    assert headings[0][0] == 1 and ("## Training" in {f"{'#' * level} {text}" for level, text in headings})
    jumps = [f"{'#' * before} {above!r} -> {'#' * level} {text!r}"
             for (before, above), (level, text) in zip(headings, headings[1:]) if level > before + 1]
    assert jumps == []
