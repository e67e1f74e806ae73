"""capsbench report as a reader and a shell user meet it: the headings of the report this repository ships
step down one level at a time (a Markdown outline, a table of contents or a screen reader skips none), and an
--out that cannot be written is one line naming the folder, why, and the fix, not a traceback, with nothing an
earlier report wrote lost."""

from __future__ import annotations

import errno
import re
import tempfile
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


def one_error_line(code: int, capsys, status: int = 2) -> str:
    """The one line on stderr of a report that ended with ``status``: 2 for an output found unwritable before
    the work (as every writing command), 1 for a write that failed after it."""
    captured = capsys.readouterr()
    assert code == status and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_an_out_under_a_file_is_one_line_naming_the_folder_and_the_fix(tmp_path, capsys, no_plots):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file where a folder was meant\n")
    out = blocker / "report"
    line = one_error_line(report.main(["--results", str(RESULTS), "--out", str(out)]), capsys)
    assert line == f"error: cannot write the report into {out}: {blocker} is a file, not a folder; choose another --out"
    assert blocker.read_text() == "a file where a folder was meant\n"


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys, no_plots):
    out = tmp_path / "report.md"
    out.write_text("an earlier report\n")
    line = one_error_line(report.main(["--results", str(RESULTS), "--out", str(out)]), capsys)
    assert line == f"error: cannot write the report into {out}: {out} is a file, not a folder; choose another --out"
    assert out.read_text() == "an earlier report\n"


def refuse_files_in(monkeypatch, folder: Path, starting: str = "") -> None:
    """Files created through tempfile.mkstemp in ``folder`` (every report file is written through one, then
    renamed) fail as in a read-only folder for a user who is not root; only those whose name starts with
    ``starting`` where it is given."""
    real = tempfile.mkstemp

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        if dir is not None and Path(dir) == folder and (prefix or "").startswith(starting):
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / f"{prefix}XXXX{suffix or ''}"))
        return real(suffix, prefix, dir, text)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_a_read_only_out_is_one_line_before_anything_is_drawn(tmp_path, capsys, monkeypatch, no_plots):
    refuse_files_in(monkeypatch, tmp_path)
    line = one_error_line(report.main(["--results", str(RESULTS), "--out", str(tmp_path)]), capsys)
    assert line == f"error: cannot write the report into {tmp_path}: Permission denied; choose another --out"
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_midway_is_one_line_and_keeps_the_earlier_report(tmp_path, capsys, monkeypatch, no_plots):
    (tmp_path / "report.md").write_text("an earlier report\n")
    refuse_files_in(monkeypatch, tmp_path, starting=".report.md.")
    line = one_error_line(report.main(["--results", str(RESULTS), "--out", str(tmp_path)]), capsys, status=1)
    assert line.startswith(f"error: cannot write the report into {tmp_path}: Permission denied (")
    assert "report.md" in line and line.endswith("; choose another --out")
    assert (tmp_path / "report.md").read_text() == "an earlier report\n"
