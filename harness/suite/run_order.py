"""Which of two asv runs is the newer: git's ancestry where the repository knows both commits, else when they
were measured.

A commit's date says little: two commits made in the same second (a rebase, a quick amend and commit) have
equal dates, and a branch merged later can carry an older date.  So the report orders runs by:

1. **ancestry**: where the repository the results came from knows both commits, the descendant is the newer
   (``git merge-base --is-ancestor``);
2. **when measured**: otherwise (no git, a commit the repository does not know, two branches neither of
   which contains the other, or one commit measured twice) the run whose benchmarks ended later is the newer
   (asv's results file has each benchmark's start and duration; :attr:`harness.suite.asv_results.Run.measured`);
3. then the commit date, then the environment's name, then the commit hash, so that the order is total.

Two environments of one commit are never ordered by ancestry: the one measured later is the newer
(:data:`ORDER_RULE` says so in the report).  The runs are described by their attributes only (``commit``,
``env``, ``measured``, ``date``), so this module imports nothing of the harness.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

GIT_TIMEOUT_S = 10

ORDER_RULE = ("Runs are ordered oldest first: of two commits the repository knows, the descendant (git ancestry) "
              "is the newer; otherwise, and for two environments of one commit, the run whose benchmarks ended "
              "later (the time asv recorded for them), then the later commit date, then the environment's and "
              "the commit's names.")

ANCESTRY, MEASURED, COMMIT_DATE, NAME = "descendant", "measured later", "later commit date", "name order"


class Ancestry:
    """Answers "is commit a an ancestor of commit b?" from the git repository at ``repository`` (or one
    that contains it), and None wherever git cannot: no git, not a repository, a commit it does not know.
    Answers are cached: the report asks about each pair of runs once per sort."""

    def __init__(self, repository: str | Path | None):
        self.repository = Path(repository) if repository is not None else None
        self._known: dict[str, bool] = {}
        self._ancestor: dict[tuple[str, str], bool | None] = {}

    def _git(self, *args: str) -> int | None:
        """git's exit status in the repository, or None where git cannot run there."""
        if self.repository is None or not self.repository.is_dir():
            return None
        try:
            completed = subprocess.run(["git", "-C", str(self.repository), *args], capture_output=True,
                                       timeout=GIT_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return completed.returncode

    def knows(self, commit: str) -> bool:
        if commit not in self._known:
            self._known[commit] = self._git("cat-file", "-e", f"{commit}^{{commit}}") == 0
        return self._known[commit]

    def is_ancestor(self, a: str, b: str) -> bool | None:
        """True where ``a`` is an ancestor of ``b`` (or the same commit), False where it is not, None where
        git does not know both."""
        if (a, b) not in self._ancestor:
            if not (self.knows(a) and self.knows(b)):
                self._ancestor[(a, b)] = None
            else:
                status = self._git("merge-base", "--is-ancestor", a, b)
                self._ancestor[(a, b)] = {0: True, 1: False}.get(status)
        return self._ancestor[(a, b)]


def _later(x, y) -> int:
    """1 where time ``x`` is later than ``y``, -1 where earlier, 0 where equal or either is unknown."""
    if x is None or y is None or x != x or y != y:  # None, NaN and NaT compare unequal to themselves
        return 0
    try:
        return (x > y) - (x < y)
    except TypeError:
        return 0


def newer(a, b, ancestry: Ancestry) -> tuple[int, str]:
    """(1, why) where run ``a`` is newer than run ``b``, (-1, why) where older, (0, "") where they are one run;
    ``why`` is the rule that decided (:data:`ANCESTRY`, :data:`MEASURED`, :data:`COMMIT_DATE`, :data:`NAME`)."""
    if a.commit != b.commit:
        if ancestry.is_ancestor(b.commit, a.commit):
            return 1, ANCESTRY
        if ancestry.is_ancestor(a.commit, b.commit):
            return -1, ANCESTRY
    for rule, x, y in ((MEASURED, a.measured, b.measured), (COMMIT_DATE, a.date, b.date)):
        order = _later(x, y)
        if order:
            return order, rule
    names_a, names_b = (a.env, a.commit, a.machine), (b.env, b.commit, b.machine)
    return ((names_a > names_b) - (names_a < names_b), NAME) if names_a != names_b else (0, "")


def order_runs(runs: list, ancestry: Ancestry) -> list:
    """``runs`` oldest first by :func:`newer`."""
    return sorted(runs, key=functools.cmp_to_key(lambda a, b: newer(a, b, ancestry)[0]))
