"""Which implementations of a run may be ranked by speed, and which neighbours in the ranking its samples can
tell apart.

**Parity.**  The suite records one correctness figure per implementation and run (``track_max_rel_error``,
benchmarks/bench_correctness.py): the largest normwise relative error of any quantity of :mod:`harness.check`
(outputs, gradients, parameters after three Adam steps) against the float64 reference.  harness.check holds
each quantity to the tolerance of its kind (``TOLERANCES``); one largest figure can only be held to the widest
of them, :func:`parity_tolerance`.  So, per implementation in a run:

* **passed**: the figure is at most that tolerance (no quantity is beyond every tolerance the check allows;
  ``capsbench check`` gives the per-quantity verdict);
* **parity FAILED**: above it, or not finite (a quantity wrong beyond what any tolerance allows: a softmax
  over the wrong axis gives errors of order one);
* **parity not measured**: no figure in that run (the correctness benchmark was not run, was skipped, or
  raised or timed out).

Every implementation that did not pass carries its mark (:func:`parity_mark`) wherever it is named beside a
speed, and one that FAILED is not ranked at all.

**Ranking.**  Per batch size, the ranked implementations by the median train-step time, fastest first; each
pair of neighbours is judged by :func:`pair_verdict`: the faster is faster by the samples only where both
figures rest on more than one sample, both interquartile ranges are recorded, and the faster's q75 is below
the slower's q25 (the ranges apart).  Otherwise the samples cannot rank the pair, and the reason is given:
a single sample, no spread recorded, or interquartile ranges that overlap.  docs/report.md states the rule.
"""

from __future__ import annotations

import math

import pandas as pd

from harness.tolerances import widest_tolerance

PASSED, FAILED, NOT_MEASURED = "passed", "parity FAILED", "parity not measured"
FASTER = "faster"
SINGLE_SAMPLE = "a single sample"
NO_SPREAD = "no spread recorded"
OVERLAP = "interquartile ranges overlap"
PARITY_METRIC = "max_rel_error"  # harness.suite.asv_results' name of track_max_rel_error


def parity_tolerance() -> float:
    """The widest tolerance harness.check allows any quantity in any dtype
    (:func:`harness.tolerances.widest_tolerance`): the suite records one largest error per implementation."""
    return widest_tolerance()


def parity_of(value, tolerance: float) -> str:
    """:data:`PASSED`, :data:`FAILED` or :data:`NOT_MEASURED` for one recorded largest error (NaN / None: no
    figure)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return NOT_MEASURED
    return PASSED if math.isfinite(value) and value <= tolerance else FAILED


def parity_table(rows: pd.DataFrame, tolerance: float | None = None) -> pd.DataFrame:
    """One row per implementation named in one run's ``rows``: ``max_rel_error`` (NaN where not measured)
    and ``parity`` (:func:`parity_of`)."""
    tolerance = parity_tolerance() if tolerance is None else tolerance
    names = sorted(rows["implementation"].dropna().unique())
    errors = rows[(rows["metric"] == PARITY_METRIC) & rows["value"].notna()]
    errors = errors.drop_duplicates("implementation").set_index("implementation")["value"]
    frame = pd.DataFrame({"implementation": names, "max_rel_error": [errors.get(name, math.nan) for name in names]})
    frame["parity"] = [parity_of(value, tolerance) for value in frame["max_rel_error"]]
    return frame


def parity_mark(parity: str) -> str:
    """What follows an implementation's name wherever it is shown beside a speed: nothing where parity passed."""
    return "" if parity == PASSED else f" ({parity})"


def parity_cell(parity: str, error, tolerance: float | None = None) -> str:
    """The parity column of a table: "passed (6.2e-04)", "FAILED (3.1e-01 > 1e-02)", "not measured"."""
    if parity == NOT_MEASURED:
        return "not measured"
    if parity == PASSED:
        return f"passed ({error:.1e})"
    tolerance = parity_tolerance() if tolerance is None else tolerance
    return f"FAILED ({error:.1e} > {tolerance:.0e})"


def pair_verdict(faster: dict, slower: dict) -> str:
    """Whether the samples rank ``faster`` (the lower median) ahead of ``slower``: :data:`FASTER`, else why
    not (:data:`SINGLE_SAMPLE`, :data:`NO_SPREAD`, :data:`OVERLAP`).  Each side is a mapping with ``value``,
    ``q25``, ``q75`` and ``samples``."""
    counts = [side.get("samples") for side in (faster, slower)]
    if any(isinstance(n, (int, float)) and n == 1 for n in counts):
        return SINGLE_SAMPLE
    quartiles = [faster.get("q25"), faster.get("q75"), slower.get("q25"), slower.get("q75")]
    if any(not isinstance(q, (int, float)) or not math.isfinite(q) for q in quartiles) or \
            any(not isinstance(n, (int, float)) or not n > 1 for n in counts):
        return NO_SPREAD
    return FASTER if quartiles[1] < quartiles[2] else OVERLAP


def ranking_table(summary: pd.DataFrame, parity: pd.DataFrame) -> pd.DataFrame:
    """Per batch size of a run's summary (:func:`harness.reporting.tables.summary_table`), the implementations with a
    train-step time and no FAILED parity, fastest first: ``batch_size``, ``position`` (1 = fastest median),
    ``implementation``, ``parity``, the train step with its ``q25``, ``q75``, ``samples``, and
    ``against_next``: :func:`pair_verdict` against the next slower one ("" for the slowest)."""
    status = parity.set_index("implementation")["parity"]
    timed = summary[summary["train_step"].notna()].assign(
        parity=lambda frame: [status.get(name, NOT_MEASURED) for name in frame["implementation"]])
    timed = timed[timed["parity"] != FAILED]
    out = []
    for batch, group in timed.groupby("batch_size", sort=True):
        group = group.sort_values(["train_step", "implementation"], kind="stable")
        sides = [{"value": row.train_step, "q25": row.train_step_q25, "q75": row.train_step_q75,
                  "samples": row.train_step_samples} for row in group.itertuples()]
        for position, (row, side) in enumerate(zip(group.itertuples(), sides)):
            verdict = pair_verdict(side, sides[position + 1]) if position + 1 < len(sides) else ""
            out.append({"batch_size": batch, "position": position + 1, "implementation": row.implementation,
                        "parity": row.parity, "train_step": side["value"], "q25": side["q25"], "q75": side["q75"],
                        "samples": side["samples"], "against_next": verdict})
    return pd.DataFrame(out, columns=["batch_size", "position", "implementation", "parity", "train_step", "q25",
                                      "q75", "samples", "against_next"])


RANKING_RULE = ("`a < b`: a's train step is faster by the samples (more than one sample each, a's q75 below "
                "b's q25); `a ≈ b`: the samples cannot rank them (one sample on a side, no spread recorded, or "
                "interquartile ranges that overlap), whatever the medians' order.")


def ranking_lines(ranking: pd.DataFrame) -> list[str]:
    """One Markdown bullet per batch size: the implementations fastest first, joined by ``<`` where the
    samples rank the pair and ``≈`` where they cannot, then which pairs cannot be ranked and why."""
    lines = []
    for batch, group in ranking.groupby("batch_size", sort=True):
        names = [f"{row.implementation}{parity_mark(row.parity)}" for row in group.itertuples()]
        verdicts = list(group["against_next"])[:-1]
        chain = names[0] + "".join(f" {'<' if verdict == FASTER else '≈'} {name}"
                                   for verdict, name in zip(verdicts, names[1:]))
        unranked: dict[str, list[str]] = {}
        for verdict, a, b in zip(verdicts, group["implementation"], list(group["implementation"])[1:]):
            if verdict != FASTER:
                unranked.setdefault(verdict, []).append(f"{a} / {b}")
        why = "; ".join(f"{', '.join(pairs)} ({reason})" for reason, pairs in unranked.items())
        lines.append(f"- batch {int(batch)}: {chain}" + (f"; the samples cannot rank {why}" if why else "") + ".")
    return lines


def ranking_sentence(ranking: pd.DataFrame) -> str:
    """:func:`ranking_lines` as one run of sentences, for a paragraph: "batch 32: a < b. batch 128: a ≈ b; ..."."""
    return " ".join(line.removeprefix("- ") for line in ranking_lines(ranking))
