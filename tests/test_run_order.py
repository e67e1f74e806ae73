"""Which run is the newer (harness.suite.run_order) and what the report does with it: two commits made in the same
second are ordered by git's ancestry, not by their hashes; without git, or with commits it does not know, by
when they were measured; two environments of one commit by when measured, a rule the report prints; the
comparison says new / old the right way round and the per-run plots come from the newest run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_report import FIXTURE, MACHINE, RUN_FILE, TRAIN_STEP, fixture_json, fixture_value, ms, run_report

from harness import report
from harness.reporting import plots
from harness.suite.asv_results import load_asv
from harness.suite.run_order import ANCESTRY, COMMIT_DATE, MEASURED, NAME, ORDER_RULE, Ancestry, newer, order_runs

ONE_SECOND = "2026-12-06T10:00:00+00:00"
HOUR_MS = 3_600_000


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_DATE": ONE_SECOND, "GIT_COMMITTER_DATE": ONE_SECOND,
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def parent_and_child_of_one_second(repo: Path) -> tuple[str, str]:
    """Two commits made in the same second, the child's hash sorting before its parent's (so that an order by
    date, then hash, calls the child the older)."""
    git(repo, "init", "-q")
    parent = None
    for attempt in range(64):
        git(repo, "commit", "-q", "--allow-empty", "-m", f"commit {attempt}")
        commit = git(repo, "rev-parse", "HEAD")
        if parent is not None and commit < parent:
            return parent, commit
        parent = commit
    pytest.fail("no child hash below its parent's in 64 commits")


def write_run(root: Path, commit: str, *, measured_ms: int, factor: float = 1.0, env: str | None = None) -> Path:
    """The fixture's run as one of ``commit``: the fixture's commit date, every benchmark started at
    ``measured_ms``, every result and quartile times ``factor``, in environment ``env`` (default the
    fixture's)."""
    payload = fixture_json()
    payload["commit_hash"] = commit
    payload["env_name"] = env or payload["env_name"]
    columns = payload["result_columns"]
    for entry in payload["results"].values():
        for column in ("result", "stats_q_25", "stats_q_75"):
            index = columns.index(column)
            if index < len(entry) and isinstance(entry[index], list):
                entry[index] = [v * factor if isinstance(v, (int, float)) else v for v in entry[index]]
        entry[columns.index("started_at")] = measured_ms
    folder = root / "asv" / MACHINE
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{commit[:8]}-{payload['env_name']}.json"
    path.write_text(json.dumps(payload))
    return path


def results_without_the_fixture_run(root: Path) -> Path:
    """The fixture's benchmarks.json, machine.json and facts under ``root``, without its run."""
    (root / "asv" / MACHINE).mkdir(parents=True)
    for name in ("benchmarks.json",):
        (root / "asv" / name).write_bytes((FIXTURE / name).read_bytes())
    (root / "asv" / MACHINE / "machine.json").write_bytes((FIXTURE / MACHINE / "machine.json").read_bytes())
    return root


@pytest.fixture
def tables_only(monkeypatch):
    """Skip the benchmark figures (a second or two each run) in tests about the tables."""
    monkeypatch.setattr(report, "benchmark_plots", lambda *args: None)


def heading_of_comparison(root: Path) -> str:
    return next(line for line in (root / "report" / "comparison.md").read_text().splitlines()
                if line.startswith("### "))


def test_two_commits_of_one_second_are_ordered_by_ancestry_and_plots_come_from_the_newer(tmp_path, capsys,
                                                                                           monkeypatch):
    """The child measured first and twice as slow: git's ancestry wins over both the hash and the measuring
    times; the comparison reads new = child, ratio 2.00x; the per-run plots are drawn from the child's run."""
    repo = tmp_path / "repo"
    repo.mkdir()
    parent, child = parent_and_child_of_one_second(repo)
    root = results_without_the_fixture_run(repo / "results")
    start = fixture_json()["results"][TRAIN_STEP][fixture_json()["result_columns"].index("started_at")]
    write_run(root, parent, measured_ms=start + HOUR_MS)
    write_run(root, child, measured_ms=start, factor=2.0)
    asv = load_asv(root)
    assert [run.commit for run in asv.runs] == [parent, child]
    assert asv.runs[0].date == asv.runs[1].date  # the same commit second: the date cannot tell
    drawn = []
    monkeypatch.setattr(plots, "phase_times", lambda rows, iterations, where: drawn.append(where) or
                        (_ for _ in ()).throw(plots.NoData("not drawn in this test")))
    code, _, err = run_report(root, capsys)
    assert code == 0, err
    assert heading_of_comparison(root).startswith(f"### {MACHINE} @ {child[:8]}")
    comparison = (root / "report" / "comparison.md").read_text()
    assert f"new: `{MACHINE}` commit `{child[:12]}`" in comparison and "new is a descendant of old in git" in comparison
    line = next(line for line in comparison.splitlines()
                if line.startswith("| time_train_step | torch-vectorised, batch 32, 3 it. |"))
    old = fixture_value(TRAIN_STEP, "'torch-vectorised'", "32", "3")
    assert f"| {ms(old)} ms (1 sample) | {ms(2 * old)} ms (1 sample) | 2.00× |" in line
    assert drawn == [asv.runs[1].label]
    assert ORDER_RULE in (root / "report" / "report.md").read_text()


def test_without_git_runs_are_ordered_by_when_they_were_measured(tmp_path, capsys, monkeypatch, tables_only):
    """git not on PATH and two commits it could not know anyway, of one commit second: the run measured later
    is the newer, whatever the hashes say."""
    root = results_without_the_fixture_run(tmp_path / "results")
    earlier, later = "f" * 40, "0" * 40
    write_run(root, earlier, measured_ms=1_000 * HOUR_MS)
    write_run(root, later, measured_ms=1_001 * HOUR_MS, factor=2.0)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    asv = load_asv(root)
    assert [run.commit for run in asv.runs] == [earlier, later]
    assert asv.runs[1].measured > asv.runs[0].measured
    code, _, err = run_report(root, capsys)
    assert code == 0, err
    assert heading_of_comparison(root).startswith(f"### {MACHINE} @ {later[:8]}")
    assert "new was measured later" in (root / "report" / "comparison.md").read_text()


def test_two_environments_of_one_commit_by_when_measured_with_the_rule_printed(tmp_path, capsys, tables_only):
    root = results_without_the_fixture_run(tmp_path / "results")
    write_run(root, "a" * 40, measured_ms=2 * HOUR_MS, env="virtualenv-py3.11-zzz")
    write_run(root, "a" * 40, measured_ms=3 * HOUR_MS, env="virtualenv-py3.11-aaa")
    asv = load_asv(root)
    assert [run.env for run in asv.runs] == ["virtualenv-py3.11-zzz", "virtualenv-py3.11-aaa"]
    code, _, err = run_report(root, capsys)
    assert code == 0, err
    text = (root / "report" / "report.md").read_text()
    assert ORDER_RULE in text and "two environments of one commit" in ORDER_RULE
    assert "- measured: 1970-01-01 02:00 to 1970-01-01 02:00 UTC" in text  # durations of the fixture: 0 here


class FakeRun:
    def __init__(self, commit, measured=pd.NaT, date=pd.NaT, env="e", machine="m"):
        self.commit, self.measured, self.date, self.env, self.machine = commit, measured, date, env, machine


class FakeAncestry(Ancestry):
    """Ancestry from a dict child -> parent, without git."""

    def __init__(self, parents: dict[str, str]):
        super().__init__(None)
        self.parents = parents

    def is_ancestor(self, a, b):
        if a not in self.parents and a not in self.parents.values() or b not in self.parents and \
                b not in self.parents.values():
            return None
        while b is not None:
            if a == b:
                return True
            b = self.parents.get(b)
        return False


def test_the_rules_in_their_order_by_hand():
    t = pd.Timestamp
    known = FakeAncestry({"c2": "c1", "c3": "c2"})
    # ancestry beats measuring time and date
    assert newer(FakeRun("c2", t(1, unit="s"), t(9, unit="s")), FakeRun("c1", t(5, unit="s"), t(9, unit="s")),
                 known) == (1, ANCESTRY)
    # an unknown commit: measured later is newer, even with an earlier commit date
    assert newer(FakeRun("x", t(6, unit="s"), t(1, unit="s")), FakeRun("c1", t(5, unit="s"), t(9, unit="s")),
                 known) == (1, MEASURED)
    runs = [FakeRun("c3", t(1, unit="s")), FakeRun("c1", t(3, unit="s")), FakeRun("c2", t(2, unit="s"))]
    assert [run.commit for run in order_runs(runs, known)] == ["c1", "c2", "c3"]


def test_unknown_or_equal_times_fall_through_to_the_next_rule_by_hand():
    t = pd.Timestamp
    nobody = FakeAncestry({})
    # measuring time unknown on one side, or equal: the commit date decides
    assert newer(FakeRun("x", pd.NaT, t(2, unit="s")), FakeRun("y", t(5, unit="s"), t(1, unit="s")),
                 nobody) == (1, COMMIT_DATE)
    assert newer(FakeRun("x", t(5, unit="s"), t(1, unit="s")), FakeRun("y", t(5, unit="s"), t(2, unit="s")),
                 nobody) == (-1, COMMIT_DATE)
    # nothing known but the names: environment first, then commit; one run is neither older nor newer
    assert newer(FakeRun("x", env="b"), FakeRun("y", env="a"), nobody) == (1, NAME)
    assert newer(FakeRun("x", env="a"), FakeRun("y", env="b"), nobody) == (-1, NAME)
    assert newer(FakeRun("y", env="a"), FakeRun("x", env="a"), nobody) == (1, NAME)
    assert newer(FakeRun("x"), FakeRun("x"), nobody) == (0, "")


def test_git_is_asked_in_the_repository_and_an_unknown_commit_is_none(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    parent, child = parent_and_child_of_one_second(repo)
    ancestry = Ancestry(repo)
    assert ancestry.is_ancestor(parent, child) is True and ancestry.is_ancestor(child, parent) is False
    assert ancestry.is_ancestor(parent, "0" * 40) is None
    assert Ancestry(tmp_path / "not-a-repository").is_ancestor(parent, child) is None
    assert RUN_FILE is not None
