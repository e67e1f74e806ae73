"""harness.reporting.ranking on hand-made inputs whose answers are known: parity's three states at and around the
tolerance, the tolerance itself read from harness.check, which neighbours the samples can rank (and why not),
and the ranking with a FAILED implementation left out and an unchecked one marked."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from harness.reporting.ranking import (
    FAILED,
    FASTER,
    NO_SPREAD,
    NOT_MEASURED,
    OVERLAP,
    PASSED,
    SINGLE_SAMPLE,
    pair_verdict,
    parity_cell,
    parity_of,
    parity_table,
    parity_tolerance,
    ranking_lines,
    ranking_sentence,
    ranking_table,
)
from harness.tolerances import TOLERANCES

NAN = math.nan


def test_the_tolerance_is_the_widest_harness_check_allows_any_quantity():
    assert parity_tolerance() == max(value for kinds in TOLERANCES.values() for value in kinds.values()) == 1e-2


@pytest.mark.parametrize("error, expected", [
    (6.2e-4, PASSED), (1e-2, PASSED), (1.01e-2, FAILED), (0.3, FAILED), (math.inf, FAILED), (NAN, NOT_MEASURED),
    (None, NOT_MEASURED)])
def test_parity_of_one_figure(error, expected):
    assert parity_of(error, 1e-2) == expected


def test_parity_cells_word_for_word():
    assert parity_cell(PASSED, 6.2e-4, 1e-2) == "passed (6.2e-04)"
    assert parity_cell(FAILED, 0.3) == "FAILED (3.0e-01 > 1e-02)"  # harness.check's widest tolerance
    assert parity_cell(FAILED, 0.3, 1e-3) == "FAILED (3.0e-01 > 1e-03)"  # the one it is given
    assert parity_cell(NOT_MEASURED, NAN, 1e-2) == "not measured"


def test_parity_table_holds_each_figure_to_the_tolerance_given_else_harness_check_s_widest():
    rows = parity_rows({"a": 5e-3, "b": 2e-2})
    assert list(parity_table(rows)["parity"]) == [PASSED, FAILED]
    assert list(parity_table(rows, 1e-3)["parity"]) == [FAILED, FAILED]
    assert list(parity_table(rows, 1e-1)["parity"]) == [PASSED, PASSED]


def side(value, q25, q75, samples):
    return {"value": value, "q25": q25, "q75": q75, "samples": samples}


@pytest.mark.parametrize("faster, slower, verdict", [
    (side(1.0, 0.9, 1.1, 7), side(2.0, 1.9, 2.1, 7), FASTER),  # ranges apart
    (side(1.0, 0.9, 1.1, 2), side(2.0, 1.9, 2.1, 2), FASTER),  # two samples each are enough
    (side(1.0, 0.9, 1.5, 7), side(2.0, 1.4, 2.1, 7), OVERLAP),  # q75 above the other's q25
    (side(1.0, 0.9, 1.4, 7), side(2.0, 1.4, 2.1, 7), OVERLAP),  # touching: not apart
    (side(1.0, 1.0, 1.0, 1), side(2.0, 2.0, 2.0, 1), SINGLE_SAMPLE),  # asv --quick: q25 = q75 = the sample
    (side(1.0, 0.9, 1.1, 7), side(9.0, 9.0, 9.0, 1), SINGLE_SAMPLE),  # one side a single sample, however far
    (side(1.0, NAN, NAN, NAN), side(2.0, NAN, NAN, NAN), NO_SPREAD),  # no statistics recorded
    (side(1.0, 0.9, 1.1, NAN), side(2.0, 1.9, 2.1, 7), NO_SPREAD),  # a range without its sample count
    (side(1.0, NAN, 1.1, 7), side(2.0, 1.9, 2.1, 7), NO_SPREAD),  # a quartile missing
])
def test_which_neighbours_the_samples_rank(faster, slower, verdict):
    assert pair_verdict(faster, slower) == verdict


def summary(*rows) -> pd.DataFrame:
    """A summary (harness.reporting.tables.summary_table's columns that the ranking reads) of (name, batch, median, q25,
    q75, samples) rows."""
    return pd.DataFrame(rows, columns=["implementation", "batch_size", "train_step", "train_step_q25",
                                       "train_step_q75", "train_step_samples"])


def parity_rows(errors: dict) -> pd.DataFrame:
    return pd.DataFrame([{"implementation": name, "metric": "max_rel_error", "value": error}
                         for name, error in errors.items()])


def test_a_failed_implementation_is_not_ranked_and_an_unchecked_one_is_marked():
    frame = summary(("fast", 128, 4.0, 4.0, 4.0, 1), ("close", 128, 5.0, 5.0, 5.0, 1),  # the larger batch first
                    ("wrong-axis", 32, 0.5, 0.45, 0.55, 7),  # the fastest, and wrong
                    ("unchecked", 32, 2.0, 1.9, 2.1, 7), ("close", 32, 1.2, 1.05, 1.3, 7),
                    ("fast", 32, 1.0, 0.9, 1.1, 7), ("untimed", 32, NAN, NAN, NAN, NAN))
    parity = parity_table(parity_rows({"wrong-axis": 0.3, "fast": 6e-4, "close": 5e-4, "unchecked": NAN,
                                       "untimed": 1e-4}), 1e-2)
    assert dict(zip(parity["implementation"], parity["parity"])) == {
        "close": PASSED, "fast": PASSED, "unchecked": NOT_MEASURED, "untimed": PASSED, "wrong-axis": FAILED}
    ranking = ranking_table(frame, parity)
    assert list(ranking["batch_size"]) == [32, 32, 32, 128, 128]  # batch sizes in order, whatever the input's
    at_32 = ranking[ranking["batch_size"] == 32]
    assert list(at_32["implementation"]) == ["fast", "close", "unchecked"]
    assert list(at_32["position"]) == [1, 2, 3]
    assert list(at_32["against_next"]) == [OVERLAP, FASTER, ""]
    assert at_32.iloc[1][["train_step", "q25", "q75", "samples"]].tolist() == [1.2, 1.05, 1.3, 7]
    assert ranking_lines(ranking) == [
        "- batch 32: fast ≈ close < unchecked (parity not measured); the samples cannot rank fast / close "
        "(interquartile ranges overlap).",
        "- batch 128: fast ≈ close; the samples cannot rank fast / close (a single sample)."]


def test_an_implementation_without_a_parity_row_is_not_measured():
    parity = parity_table(pd.DataFrame([{"implementation": "a", "metric": "train_step", "value": 1.0}]), 1e-2)
    assert list(parity["parity"]) == [NOT_MEASURED]
    ranking = ranking_table(summary(("b", 32, 1.0, 0.9, 1.1, 5), ("a", 32, 2.0, 1.9, 2.1, 5)), parity)
    assert ranking_lines(ranking) == ["- batch 32: b (parity not measured) < a (parity not measured)."]


def test_reasons_are_grouped_and_the_headline_sentence_runs_the_lines_together():
    ranking = ranking_table(summary(("a", 32, 1.0, 0.9, 1.1, 5), ("b", 32, 1.05, 1.0, 1.2, 5),
                                    ("c", 32, 1.1, 1.1, 1.1, 1), ("d", 32, 1.2, 1.1, 1.3, 5),
                                    ("e", 32, 1.3, 1.25, 1.4, 5), ("a", 64, 2.0, 1.9, 2.1, 5),
                                    ("b", 64, 3.0, 2.9, 3.1, 5)),
                            parity_table(parity_rows({name: 1e-4 for name in "abcde"}), 1e-2))
    assert ranking_lines(ranking) == [
        "- batch 32: a ≈ b ≈ c ≈ d ≈ e; the samples cannot rank a / b, d / e (interquartile ranges overlap); "
        "b / c, c / d (a single sample).",
        "- batch 64: a < b."]
    assert ranking_sentence(ranking) == (
        "batch 32: a ≈ b ≈ c ≈ d ≈ e; the samples cannot rank a / b, d / e (interquartile ranges overlap); "
        "b / c, c / d (a single sample). batch 64: a < b.")
