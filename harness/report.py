"""python -m harness.report: tables and plots from the benchmark, training, profile and scaling results.

Reads ``<results>/asv`` (asv's own layout, with the suite's machine facts in ``<results>/asv-facts``),
``<results>/training/*.json`` (``python -m harness.train``), ``<results>/profile/profile.csv`` with
``profile.json`` (``python -m harness.profile``), ``<results>/distributed/*.json`` and
``<results>/figures/figures.json`` with the figures beside it (``python -m harness.figures``), and writes into
``<out>``:

* ``results_tidy.csv``: the tidy table, one row per benchmark x parameters x run (columns in
  :mod:`harness.suite.asv_results`); a skipped or failed combination is a row with an empty value;
* ``report.md``: machine, environment, libraries, threads, commit, measuring times and profile of each run, in
  the order of :mod:`harness.suite.run_order` (printed); per run a summary per implementation and batch size (every
  time with the samples behind it: one sample as itself, several as the median and interquartile range; parity
  passed, FAILED or not measured, marked beside every name that did not pass) and the ranking per batch size with
  the pairs of neighbours the samples cannot rank (:mod:`harness.reporting.ranking`); the vectorised / looped speed-ups;
  the routing gradient's saving and the routing algorithms side by side, where the run measured them;
  training runs, grouped by the images they trained and tested on; where the time of a training step goes (the
  profile); distributed scaling; what the capsules learned (a checkpoint's figures and per-class table, linked
  from the figures' folder); the comparison of runs; the plots (or why one was not drawn); every warning.
  Implementations with no result at all in a run are one line per table, not rows of n/a;
* ``comparison.md`` / ``comparison.csv`` when there is more than one run: each run against the one before
  it (:mod:`harness.suite.run_order`: git ancestry where the repository knows both commits, else when measured),
  ratio new / old per benchmark and parameters, flagged when beyond the factor and the measured spread, and
  "too few samples" where a side rests on one sample; combinations without a result on either side, and
  benchmarks one run did not measure at all, are one line each, not rows;
* the PNG plots of :mod:`harness.reporting.plots` (a stale plot of an older report, such as ``roofline.png``, is
  removed).

A malformed results file is one warning line on stderr naming the file and the problem; the rest of the
report is still written.  No results at all is one error line saying how to produce them, exit status 1;
so is an ``<out>`` that cannot be written (the folder, why, and the fix), found before anything is drawn.
Every file is written under a temporary name and renamed, so a write that fails leaves the earlier file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import itertools
import os
import sys
from pathlib import Path

import pandas as pd

from harness import cli
from harness.errors import EXIT_FAILURE, UserError
from harness.reporting import plots
from harness.reporting.sections import (
    benchmark_plots,
    comparison_section,
    distributed_section,
    draw,
    memory_section,
    per_class_section,
    plots_section,
    profile_section,
    remove_plots_not_drawn,
    routing_algorithm_section,
    routing_gradient_section,
    run_header,
    speedup_section,
    summary_rules,
    summary_section,
    training_section,
)
from harness.reporting.tables import (
    comparison_table,
    distributed_table,
    run_rows,
    training_table,
)
from harness.results import (
    Profile,
    atomic_output,
    load_figures_result,
    load_profile_result,
    load_scaling_results,
    load_training_results,
    unwritable_line,
    writable_folder,
    write_text_atomic,
)
from harness.settings import (
    ASV_RESULTS_SUBDIR,
    FIGURES_SUBDIR,
    PROFILE_SUBDIR,
    REPORT_SUBDIR,
    RUNS_DIR,
    SCALING_SUBDIR,
    TRAINING_SUBDIR,
)
from harness.suite.asv_results import AsvResults, Run, load_asv, machine_names
from harness.suite.run_order import ORDER_RULE, Ancestry, newer

TIDY_CSV, REPORT_MD, COMPARISON_MD, COMPARISON_CSV = "results_tidy.csv", "report.md", "comparison.md", "comparison.csv"


# ------------------------------------------------------------------------------------------------ main
def no_results_message(root: Path) -> str:
    """The error line (without ``error: ``) of a results folder holding none of the kinds the report reads."""
    return (f"no results under {root} (none in {ASV_RESULTS_SUBDIR}/, {TRAINING_SUBDIR}/, {PROFILE_SUBDIR}/ "
            f"or {SCALING_SUBDIR}/): any one of `asv run --quick` (benchmarks), `python -m harness.train --impl NAME "
            "--data-dir DIR`, `python -m harness.profile` or `python -m harness.scaling` makes a report "
            "(see docs/report.md)")


def start_line(root: Path, out: Path) -> str:
    """The first line of a report: what it reads and where it writes."""
    return (f"report from the results under {root} ({ASV_RESULTS_SUBDIR}/, {TRAINING_SUBDIR}/, {PROFILE_SUBDIR}/, "
            f"{SCALING_SUBDIR}/) -> {out / REPORT_MD} and its tables and plots in {out}")


def build_report(root: Path, out: Path, asv: AsvResults, training: list, distributed: list,
                 warnings: list[str], profile: Profile | None = None, figures: dict | None = None) -> list[Path]:
    """Write every output into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    table = asv.table
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = ["# capsbench report", "",
          f"Generated {generated} by `python -m harness.report` from `{root}`. " +
          (f"The tidy table of every benchmark result is [`{TIDY_CSV}`]({TIDY_CSV})." if not table.empty else
           "No benchmark (asv) results, so no tidy table of them."), ""]
    if not table.empty:
        written.append(write_csv(table, out / TIDY_CSV))
    else:
        (out / TIDY_CSV).unlink(missing_ok=True)  # an older report's table would contradict this one
    md += ["## Runs", "", "Each run is named by machine, commit and asv environment (shortened: the tool and "
           f"the unpinned build requirements left out). {ORDER_RULE} The per-run plots are drawn from the newest "
           "run of each machine and environment.", ""]
    md += [run_header(run, asv.machines.get(run.machine, {})) + "\n" for run in asv.runs] or ["No asv results.", ""]
    speedups, sections = {}, {"summary": [], "speedup": [], "memory": [], "gradient": [], "algorithm": []}
    for run in asv.runs:
        rows = run_rows(table, run)
        sections["summary"].append(summary_section(rows, run))
        text, speedups[run.key] = speedup_section(rows, run)
        sections["speedup"].append(text)
        sections["memory"].append(memory_section(rows, run))
        sections["gradient"].append(routing_gradient_section(run_rows(table, run, None), run))
        sections["algorithm"].append(routing_algorithm_section(run_rows(table, run, routing_algorithm=None), run))
    if asv.runs:
        md += ["## Summary per implementation", "", summary_rules(), "", "\n\n".join(sections["summary"]), "",
               "## Vectorised vs looped routing", "", "\n\n".join(sections["speedup"]), "",
               "## Host memory of a training step: measured and expected", "", "\n\n".join(sections["memory"]), ""]
    if any(sections["gradient"]):
        md += ["## Routing gradient: what final saves over full", "",
               "\n\n".join(text for text in sections["gradient"] if text), ""]
    if any(sections["algorithm"]):
        md += ["## Routing algorithms", "",
               "\n\n".join(text for text in sections["algorithm"] if text), ""]
    comparisons = compare_runs(table, asv.runs, out, written, asv.ancestry)
    if comparisons:
        md += ["## Comparison of runs", "", f"Also in [`{COMPARISON_MD}`]({COMPARISON_MD}) and "
               f"[`{COMPARISON_CSV}`]({COMPARISON_CSV}).", "", comparisons, ""]
    md += ["## Training", ""]
    md += [training_section(training_table(training)), ""] if training else [
        f"No training results under `{root / TRAINING_SUBDIR}` (`python -m harness.train` writes them).", ""]
    if profile is not None:
        md += ["## Where the time of a training step goes", "", profile_section(profile), ""]
    distributed_frame = distributed_table(distributed)
    if distributed:
        md += ["## Distributed scaling", "", distributed_section(distributed_frame), ""]
    if figures is not None:
        relative = Path(os.path.relpath(root / FIGURES_SUBDIR, out))
        md += ["## What the capsules learned", "", per_class_section(figures, relative), ""]
    entries: list[tuple[str, str, str]] = []
    if asv.runs:
        benchmark_plots(table, asv.runs, out, entries, speedups)
    draw("training_curves", "", out, lambda: plots.training_curves([(p.stem, r) for p, r in training]), entries)
    if profile is not None:
        draw("profile", "", out, lambda: plots.profile_breakdown(profile), entries)
    if distributed:
        draw("distributed_scaling", "", out, lambda: plots.distributed_scaling(distributed_frame), entries)
    remove_plots_not_drawn(out, entries)
    written += [out / file for file, _, problem in entries if not problem]
    md += ["## Plots", "", plots_section(entries), ""]
    if warnings:
        md += ["## Warnings", "", "These inputs were skipped:", "", *[f"- {w}" for w in warnings], ""]
    written.append(write_text_atomic(out / REPORT_MD, "\n".join(md)))
    return written


def writing_failed(error: OSError, out: Path) -> bool:
    """``error`` was met writing the report into ``out`` (a file there, or a full disk), not elsewhere."""
    if error.filename is None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return Path(error.filename) == out or out in Path(error.filename).parents


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_output(path) as temporary:
        frame.to_csv(temporary, index=False)
    return path


def compare_runs(table: pd.DataFrame, runs: list[Run], out: Path, written: list[Path],
                 ancestry: Ancestry | None = None) -> str:
    """Each run against the one before it on the same machine and environment (``runs`` are oldest first,
    :mod:`harness.suite.run_order`), or, with one run per machine, the machines against each other in that order:
    comparison.md and .csv written, the Markdown returned (empty with a single run, and a stale comparison
    removed).  ``ancestry`` says why the new run is the newer, in each heading."""
    pairs = [(old, new) for _, group in itertools.groupby(sorted(runs, key=lambda run: (run.machine, run.env)),
                                                          key=lambda run: (run.machine, run.env))
             for group in [list(group)] for old, new in zip(group, group[1:])]
    if len(runs) > 1 and not pairs:  # one run per machine: compare the machines, in date order
        pairs = list(zip(runs, runs[1:]))
    if not pairs:
        for name in (COMPARISON_MD, COMPARISON_CSV):
            (out / name).unlink(missing_ok=True)
        return ""
    sections, frames = [], []
    for old, new in pairs:
        comparison = comparison_table(table, old, new)
        why = newer(new, old, ancestry or Ancestry(None))[1]
        sections.append(comparison_section(comparison, old, new, why))
        frames.append(comparison.assign(old_run=old.label, new_run=new.label))
    text = "\n\n".join(sections)
    written.append(write_text_atomic(out / COMPARISON_MD, "# capsbench comparison\n\n" + text + "\n"))
    written.append(write_csv(pd.concat(frames, ignore_index=True), out / COMPARISON_CSV))
    return text


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=cli.prog("report"), description=cli.description(__doc__))
    parser.add_argument("--results", type=Path, default=RUNS_DIR,
                        help="folder holding asv/, asv-facts/, training/, profile/, distributed/ and figures/ "
                             "(default: runs, where every command writes; the results this repository ships are "
                             "in results)")
    parser.add_argument("--out", type=Path, help="output folder (default: <results>/report)")
    parser.add_argument("--machine", metavar="NAME",
                        help="only the asv results of this machine (default: every machine's)")
    return parser


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root, out = args.results, args.out or args.results / REPORT_SUBDIR
    print(start_line(root, out), flush=True)
    if args.machine and args.machine not in machine_names(root / ASV_RESULTS_SUBDIR):
        known = ", ".join(machine_names(root / ASV_RESULTS_SUBDIR)) or "none"
        raise UserError(f"no asv results for machine {args.machine!r} under {root / ASV_RESULTS_SUBDIR} "
                        f"(machines there: {known})", EXIT_FAILURE)
    asv = load_asv(root, args.machine)
    warnings = list(asv.warnings)
    training = load_training_results(root / TRAINING_SUBDIR, warnings)
    distributed = load_scaling_results(root / SCALING_SUBDIR, warnings)
    profile = load_profile_result(root / PROFILE_SUBDIR, warnings)
    figures = load_figures_result(root / FIGURES_SUBDIR, warnings)
    for warning in warnings:
        print(warning, file=sys.stderr)
    if asv.table.empty and not training and not distributed and profile is None and figures is None:
        raise UserError(f"no readable results under {root} (every results file was skipped, see the warnings above)"
                        if warnings else no_results_message(root), EXIT_FAILURE)
    try:
        writable_folder(out)
    except OSError as error:
        raise UserError(unwritable_line(out, error, "the report")) from None
    try:
        written = build_report(root, out, asv, training, distributed, warnings, profile, figures)
    except OSError as error:  # every file is written to a temporary name and renamed: none is left half-written
        if not writing_failed(error, out):
            raise
        raise UserError(unwritable_line(out, error, "the report"), EXIT_FAILURE) from None
    plots_written = sum(path.suffix == ".png" for path in written)
    print(f"report written to {out / REPORT_MD} ({plots_written} plots, {len(written)} files in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
