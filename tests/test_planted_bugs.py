"""The planted-bug list (tests/planted_bugs.py) still fits the code: every bug's text occurs exactly once in
its file and names tests that exist.  Running the bugs takes minutes: `python tests/planted_bugs.py`."""

from __future__ import annotations

import pytest
from planted_bugs import BUGS

from conftest import REPO_ROOT


@pytest.mark.parametrize("bug", BUGS, ids=[bug.name for bug in BUGS])
def test_the_bug_applies_to_the_code_once_and_names_real_tests(bug):
    text = (REPO_ROOT / bug.path).read_text(encoding="utf-8")
    assert text.count(bug.old) == 1, f"{bug.path} holds the text {text.count(bug.old)} times"
    assert bug.new != bug.old
    for test in bug.tests:
        path, _, name = test.partition("::")
        name = name.partition("[")[0]  # a parametrised test's id ends in [PARAMETERS]
        source = (REPO_ROOT / path).read_text(encoding="utf-8")
        assert not name or f"def {name}(" in source, test


def test_bug_names_are_unique():
    assert len({bug.name for bug in BUGS}) == len(BUGS)
