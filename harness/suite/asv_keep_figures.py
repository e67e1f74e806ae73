"""capsbench's asv plugin (``"plugins"`` in asv.conf.json): a re-run never erases a figure with a skip.

asv keeps one results file per machine, commit and environment, and when a run measures a benchmark again it
replaces every cell of the benchmark's grid, a skipped cell with n/a.  The suite skips the cells of every
implementation the run leaves out (not named in ``CAPSBENCH_IMPLEMENTATIONS``, compiling in a quick profile,
unavailable here), so without this plugin a run narrowed to some implementations would remove the earlier
figures of all the others at that commit.  With it, a cell this run skips keeps the figure an earlier run
stored there, with its samples and statistics, through asv's own merge: the cells outside ``selected_idx``
of ``Results.add_result``, which is how asv keeps the cells a ``--bench`` pattern over parameters leaves
out.  A new figure replaces the old one, and so does a failure (that is news); only a skip leaves it.

asv imports this module in its own process (never in a benchmark's) when it loads asv.conf.json; the
leading dot of ``.harness.suite.asv_keep_figures`` there makes asv import it from the repository root.
"""

from __future__ import annotations

import functools
import inspect

from asv import util
from asv.results import Results

REQUIRED = "asv 0.6's Results.add_result(benchmark, result, ..., selected_idx=...)"


def cells_to_keep(results: Results, benchmark: dict, new_values: list) -> set[int]:
    """The cells of ``benchmark`` this run skipped (NaN, asv's mark of a skip) where ``results`` already holds a
    figure from an earlier run (asv itself merges only within one version of the benchmark's code: a changed
    benchmark keeps nothing)."""
    name = benchmark["name"]
    if name not in results.get_all_result_keys():
        return set()
    old_values = results.get_result_value(name, benchmark["params"])
    return {index for index, (new, old) in enumerate(zip(new_values, old_values))
            if util.is_nan(new) and not util.is_na(old)}


def keeping_skipped_figures(add_result):
    """``Results.add_result`` that leaves the cells of :func:`cells_to_keep` out of the selection it updates."""

    @functools.wraps(add_result)
    def add(self, benchmark, result, *args, selected_idx=None, **kwargs):
        keep = cells_to_keep(self, benchmark, list(result.result))
        if keep:
            selected = set(range(len(result.result))) if selected_idx is None else set(selected_idx)
            selected_idx = selected - keep
        return add_result(self, benchmark, result, *args, selected_idx=selected_idx, **kwargs)

    add.keeps_skipped_figures = True
    return add


def setup() -> None:
    """asv's plugin hook, called once when asv loads the configuration: wrap ``Results.add_result``."""
    add_result = Results.add_result
    if getattr(add_result, "keeps_skipped_figures", False):
        return
    if "selected_idx" not in inspect.signature(add_result).parameters:
        raise util.UserError(f"capsbench's asv plugin (harness/suite/asv_keep_figures.py) needs {REQUIRED}; this asv "
                             f"has no such argument: install asv>=0.6.4,<0.7 (pip install -e '.[bench]')")
    Results.add_result = keeping_skipped_figures(add_result)
