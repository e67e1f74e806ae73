"""Every command that writes answers an output it cannot write with one line, before its work: the folder,
why, and the option to change; never a traceback after minutes of work (issue: a read-only --out of report
and train ended in tracebacks).  Root ignores permissions here, so the output is placed under a file, which
stops root too."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from harness import figures, keep, profile, report, scaling, train
from harness.results import unwritable_line, writable_folder

from conftest import REPO_ROOT


def commands(blocked: Path, tmp_path: Path) -> dict:
    """Each writing command's argv, its output under ``blocked`` (a file), and the option it names."""
    runs = tmp_path / "runs"
    (runs / "training").mkdir(parents=True)
    return {
        "report": (report.main, ["--results", str(REPO_ROOT / "results"), "--out", str(blocked / "report")], "--out"),
        "train": (train.main, ["--impl", "numpy-vectorised", "--config", "small", "--out", str(blocked / "run.json")],
                  "--out"),
        "profile": (profile.main, ["--impl", "numpy-vectorised", "--out", str(blocked / "profile")], "--out"),
        "figures": (figures.main, ["--checkpoint", str(tmp_path / "none.checkpoint.npz"), "--out",
                                   str(blocked / "figures")], "--out"),
        "keep": (keep.main, ["--from", str(runs), "--to", str(blocked / "results")], "--to"),
        "scaling": (scaling.main, ["--impl", "torch-vectorised", "--config", "small", "--world-sizes", "1",
                                   "--out", str(blocked / "scaling.json")], "--out"),
    }


@pytest.mark.parametrize("command", ["report", "train", "profile", "figures", "keep", "scaling"])
def test_an_output_under_a_file_is_one_line_before_any_work(command, tmp_path, capsys, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder\n")
    monkeypatch.setenv("CAPSBENCH_DATA_DIR", str(tmp_path / "no-mnist"))  # work would stop at the data
    main, argv, option = commands(blocked, tmp_path)[command]
    capsys.readouterr()
    code = main(argv)
    error = capsys.readouterr().err.strip()
    assert code == 2, error  # the same mistake, the same status in every command (report and keep said 1)
    assert "\n" not in error and error.startswith("error: cannot write "), error
    assert f"{blocked} is a file, not a folder; choose another {option}" in error
    assert blocked.read_text() == "not a folder\n"


def test_the_line_names_the_file_that_failed_inside_a_writable_folder(tmp_path):
    error = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "report.md"))
    assert unwritable_line(tmp_path, error, "the report") == (
        f"cannot write the report into {tmp_path}: Permission denied (report.md); choose another --out")
    error = PermissionError(errno.EACCES, "Permission denied", str(tmp_path))
    assert unwritable_line(tmp_path, error, "the kept results", "--to") == (
        f"cannot write the kept results into {tmp_path}: Permission denied; choose another --to")


def test_a_writable_folder_is_created_and_left_as_it_was(tmp_path):
    folder = tmp_path / "new" / "runs"
    assert writable_folder(folder) == folder and folder.is_dir() and list(folder.iterdir()) == []
