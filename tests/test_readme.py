"""capsbench readme: the measured tables of README and docs/ are regenerated from results/, --check catches
drift; and README stays an overview whose links, and the manual's, all lead somewhere."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from harness import readme
from harness.settings import RESULTS_DIR

PROFILE = Path(__file__).parent / "fixtures" / "report" / "profile"
README = Path(__file__).parents[1] / "README.md"
DOCS = README.parent / "docs"
README_MOST_LINES = 250


def test_readme_and_docs_agree_with_the_results_they_cite(capsys):
    """The shipped README and docs/ against the shipped results: a figure typed by hand or a result changed
    without `capsbench readme` fails here; every block is somewhere, the headline in README itself."""
    assert "headline" in readme.block_names(README.read_text(encoding="utf-8"))
    names = [name for page in readme.pages(README, None) for name in readme.block_names(page.read_text())]
    assert set(readme.BLOCKS) <= set(names) and len(names) == len(set(names)), names
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
    assert f"generated block(s) differ from {root} ({page}: profile)" in capsys.readouterr().err
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


def test_a_stale_block_in_a_docs_page_is_found_then_rewritten(tmp_path, capsys):
    """A block in docs/ beside README is checked like one in README, and only its page is rewritten."""
    root = results_with_profile(tmp_path)
    page = tmp_path / "README.md"
    page.write_text("# overview\n")
    (tmp_path / "docs").mkdir()
    manual = tmp_path / "docs" / "profile.md"
    manual.write_text("# Profile\n<!-- generated: profile -->\ntyped by hand\n<!-- end generated: profile -->\n")
    assert readme.main(["--readme", str(page), "--results", str(root), "--check"]) == 1
    assert f"({manual}: profile)" in capsys.readouterr().err and "typed by hand" in manual.read_text()

    assert readme.main(["--readme", str(page), "--results", str(root)]) == 0
    assert "typed by hand" not in manual.read_text() and "| primary_caps, " in manual.read_text()
    assert page.read_text() == "# overview\n"
    assert readme.main(["--readme", str(page), "--results", str(root), "--check"]) == 0

    elsewhere = tmp_path / "manual"  # --docs names another folder: docs/ beside README is then not read
    elsewhere.mkdir()
    (elsewhere / "stale.md").write_text(manual.read_text().replace("| primary_caps, ", "| typed, "))
    assert readme.main(["--readme", str(page), "--docs", str(elsewhere), "--results", str(root), "--check"]) == 1
    assert f"({elsewhere / 'stale.md'}: profile)" in capsys.readouterr().err


def test_a_block_in_two_places_or_a_docs_folder_that_is_not_one_is_one_line(tmp_path, capsys):
    root = results_with_profile(tmp_path)
    page = tmp_path / "README.md"
    block = "<!-- generated: profile -->\n<!-- end generated: profile -->\n"
    page.write_text(block)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "profile.md").write_text(block)
    assert readme.main(["--readme", str(page), "--results", str(root)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"'profile' is in {page} and again in {tmp_path / 'docs' / 'profile.md'}" in error
    assert (tmp_path / "docs" / "profile.md").read_text() == block  # nothing written

    assert readme.main(["--readme", str(page), "--docs", str(tmp_path / "nowhere"), "--results", str(root)]) == 1
    assert "is not a folder" in capsys.readouterr().err


FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """A Markdown page without its fenced code (code is not a link)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(heading) for heading in re.findall(r"^#+ (.+)$", prose(path), re.M)}


def broken_links(pages: list[Path]) -> list[str]:
    """Every relative link or image of ``pages`` whose file, or heading after ``#``, does not exist."""
    broken = []
    for page in pages:
        for target in LINK.findall(prose(page)):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            if not where.exists() or (anchor and anchor not in anchors(where)):
                broken.append(f"{page.name}: {target}")
    return broken


def test_slugs_are_githubs():
    assert [slug(heading) for heading in ["Stop-gradient routing: full or final", "The machine's peak",
                                          "Data-parallel training (torch.distributed)"]] == [
        "stop-gradient-routing-full-or-final", "the-machines-peak", "data-parallel-training-torchdistributed"]


def test_a_broken_link_image_or_anchor_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "plot.png").write_bytes(b"png")
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## The machine's peak\n\n![plot](../plot.png) [b](b.md)\n")
    page = tmp_path / "README.md"
    page.write_text("[a](docs/a.md#the-machines-peak) [web](https://example.org/x)\n```\n[code](nowhere.md)\n```\n")
    assert broken_links([page, tmp_path / "docs" / "a.md"]) == ["a.md: b.md"]
    page.write_text("![plot](plot.png) ![moved](results/plot.png) [a](docs/a.md#peak) [me](#nowhere)\n")
    assert broken_links([page]) == ["README.md: results/plot.png", "README.md: docs/a.md#peak", "README.md: #nowhere"]


def test_readme_is_an_overview_that_links_every_page_of_the_manual():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MOST_LINES, f"README has {len(lines)} lines: move reference text into docs/"
    linked = {(README.parent / target.split("#")[0]).resolve() for target in LINK.findall(prose(README))}
    manual = sorted(DOCS.glob("*.md"))
    assert len(manual) >= 10 and not [page.name for page in manual if page.resolve() not in linked]
    for page in manual:  # each page opens with its title and one line saying what it is
        title, blank, what, after, *_ = page.read_text(encoding="utf-8").splitlines()
        assert title.startswith("# ") and blank == after == "" and what and not what.startswith("#"), page.name


def test_every_relative_link_and_image_in_readme_and_docs_leads_to_a_file_and_heading():
    assert not broken_links([README, *sorted(DOCS.glob("*.md"))])


def test_the_headline_never_names_an_implementation_without_passing_parity_fastest_without_its_mark(tmp_path):
    """torch-looped computes the wrong function at half the time (fastest at both batches) and numpy-looped's
    parity was not measured: each is marked in the headline, the wrong one is last in its batch and unranked."""
    from test_report import results_layout, with_a_wrong_and_an_unchecked_implementation

    root = results_layout(tmp_path / "results")
    with_a_wrong_and_an_unchecked_implementation(root)
    block = readme.headline_block(root)
    rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    for batch in ("32", "128"):
        names = [cells[0].lstrip("| ") for cells in rows if cells[1] == batch]
        assert names[-1] == "torch-looped (parity FAILED)" and "numpy-looped (parity not measured)" in names
        assert all(name.endswith(")") or name in ("torch-vectorised", "numpy-vectorised") for name in names)
    assert [cells[-1] for cells in rows if cells[0] == "| torch-looped (parity FAILED)"] == \
        ["FAILED (3.0e-01 > 1e-02) |"] * 2
    rankings = re.findall(r"batch (?:32|128): [^.]*\.", block.split("\n\n")[0])  # in the paragraph above the table
    assert len(rankings) == 2 and not [line for line in rankings if "torch-looped" in line]
    assert all("numpy-looped (parity not measured)" in line and "(a single sample)" in line for line in rankings)


def test_the_headline_carries_both_routing_algorithms_where_its_run_measured_both(tmp_path):
    """Under self-attention the fixture's times x 0.8 (train step) and 0.4 (routing alone), numpy-vectorised
    under dynamic routing alone: after the headline's table a second one sets them beside dynamic routing's
    with the ratio, and names what ran under dynamic routing alone; a run of dynamic routing alone has none."""
    from test_report import TRAIN_STEP, fixture_value, results_layout, with_self_attention

    root = results_layout(tmp_path / "results")
    assert "self-attention" not in readme.headline_block(root)
    with_self_attention(root)
    block = readme.headline_block(root)
    first, intro, second = block.split("\n\n")[1:4]
    assert "under dynamic routing alone (not self-attention): numpy-vectorised" in intro
    header, _, *rows = second.splitlines()
    headings = [cell.strip() for cell in header.strip("|").split(" | ")]
    assert headings[:5] == ["implementation", "batch", "train step dynamic ms", "train step self-attention ms",
                            "train step self-attention / dynamic"]
    cells = {(row[0], row[1]): dict(zip(headings, row)) for line in rows
             for row in [[cell.strip() for cell in line.strip("|").split(" | ")]]}
    assert {name for name, _ in cells} == {"numpy-looped", "torch-looped", "torch-vectorised"}
    line = cells[("torch-vectorised", "128")]
    step = fixture_value(TRAIN_STEP, "'torch-vectorised'", "128", "3")
    assert line["train step self-attention ms"].startswith(f"{0.8 * step * 1e3:.1f}")
    assert line["train step self-attention / dynamic"] == "0.80×"
    assert line["routing fwd+bwd self-attention / dynamic"] == "0.40×"
    assert "self-attention" not in first  # the headline's own table: dynamic routing


def test_the_routing_algorithms_block_is_the_headline_s_second_part_and_refuses_a_dynamic_only_run(tmp_path):
    """A page whose headline is another run names the run of its routing comparison: the block is the
    headline's part after its own table, under a line naming the run; a run of dynamic routing alone is one
    line saying what to measure."""
    from test_report import results_layout, with_self_attention

    root = results_layout(tmp_path / "results")
    with pytest.raises(readme.ReadmeError, match="measured dynamic routing alone"):
        readme.routing_algorithms_block(root)
    with_self_attention(root)
    block = readme.routing_algorithms_block(root)
    assert block.startswith("asv run `") and "train step self-attention / dynamic" in block
    assert block.split("\n\n", 1)[1] == readme.headline_block(root).split("\n\n", 2)[2]
