"""capsbench readme: README's measured tables are regenerated from results/, and --check catches drift."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from harness import readme
from harness.settings import RESULTS_DIR

PROFILE = Path(__file__).parent / "fixtures" / "report" / "profile"
README = Path(__file__).parents[1] / "README.md"


def test_readme_agrees_with_the_results_it_cites(capsys):
    """The shipped README against the shipped results: a figure typed by hand or a result changed without
    `capsbench readme` fails here."""
    text = README.read_text(encoding="utf-8")
    assert {"headline", "profile", "training", "scaling"} <= {match["name"] for match in readme.OPEN.finditer(text)}
    assert readme.main(["--readme", str(README), "--results", str(RESULTS_DIR), "--check"]) == 0, \
        capsys.readouterr().err


def results_with_profile(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    shutil.copytree(PROFILE, root / "profile")
    return root


def test_a_stale_block_is_found_then_rewritten_from_the_results(tmp_path, capsys):
    root = results_with_profile(tmp_path)
    page = tmp_path / "README.md"
    page.write_text("before\n<!-- generated: profile -->\ntyped by hand\n<!-- end generated: profile -->\nafter\n")
    assert readme.main(["--readme", str(page), "--results", str(root), "--check"]) == 1
    assert "generated block(s) profile differ" in capsys.readouterr().err
    assert "typed by hand" in page.read_text()  # --check rewrites nothing

    assert readme.main(["--readme", str(page), "--results", str(root)]) == 0
    text = page.read_text()
    assert text.startswith("before\n<!-- generated: profile -->\n") and text.endswith(
        "<!-- end generated: profile -->\nafter\n") and "typed by hand" not in text
    frame = pd.read_csv(PROFILE / "profile.csv")
    for name, rows in frame.groupby("implementation"):
        largest = rows.nlargest(readme.LARGEST_LAYERS, "time_s")
        lines = [line for line in text.splitlines() if line.startswith("| ")]
        for _, row in largest.iterrows():
            assert any(f"| {row['layer']}, {row['phase']} |" in line for line in lines), (name, row["layer"])
        smaller = rows[rows["time_s"] < largest["time_s"].min()]
        assert not any(f"| {row['layer']}, {row['phase']} | {1e3 * row['time_s']:.1f}" in line
                       for _, row in smaller.iterrows() for line in lines)
    assert readme.main(["--readme", str(page), "--results", str(root), "--check"]) == 0

    elsewhere = tmp_path / "another-clone" / "results"  # the same results in another checkout: no path in README
    shutil.copytree(root, elsewhere)
    assert readme.main(["--readme", str(page), "--results", str(elsewhere), "--check"]) == 0


def test_marker_errors_are_one_line(tmp_path, capsys):
    root = results_with_profile(tmp_path)
    page = tmp_path / "README.md"
    page.write_text("<!-- generated: figures -->\n<!-- end generated: figures -->\n")
    assert readme.main(["--readme", str(page), "--results", str(root)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown generated block 'figures'" in error and "headline" in error

    page.write_text("<!-- generated: profile -->\nno end\n")
    assert readme.main(["--readme", str(page), "--results", str(root)]) == 1
    assert "has no closing marker: add '<!-- end generated: profile -->'" in capsys.readouterr().err

    page.write_text("<!-- generated: profile colour=red -->\n<!-- end generated: profile -->\n")
    assert readme.main(["--readme", str(page), "--results", str(root)]) == 1
    assert "takes no argument(s) colour" in capsys.readouterr().err


def test_a_block_without_its_results_says_what_to_run(tmp_path, capsys):
    page = tmp_path / "README.md"
    page.write_text("<!-- generated: headline commit=0123abcd -->\n<!-- end generated: headline -->\n")
    assert readme.main(["--readme", str(page), "--results", str(tmp_path / "empty")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no asv run at commit 0123abcd" in error and "capsbench keep" in error
    assert page.read_text().count("generated") == 2  # nothing written
