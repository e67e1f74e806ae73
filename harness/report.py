"""python -m harness.report: tables and plots from the benchmark, training and distributed-scaling results.

Reads ``<results>/asv`` (asv's own layout, with the suite's machine facts in ``<results>/asv-facts``),
``<results>/training/*.json`` (``python -m harness.train``) and ``<results>/distributed/*.json``, and writes
into ``<out>``:

* ``results_tidy.csv``: the tidy table, one row per benchmark x parameters x run (columns in
  :mod:`harness.asv_results`); a skipped or failed combination is a row with an empty value;
* ``report.md``: machine, libraries, threads, commit and profile of each run; per run a summary per
  implementation and batch size; the vectorised / looped speed-ups; training runs; distributed scaling;
  the comparison of runs; the plots (or why one was not drawn); every warning;
* ``comparison.md`` / ``comparison.csv`` when there is more than one run: each run against the one before
  it (by commit date), ratio new / old per benchmark and parameters, flagged when beyond the measured spread;
* the PNG plots of :mod:`harness.plots`.

A malformed results file is one warning line on stderr naming the file and the problem; the rest of the
report is still written.  No results at all is one error line saying how to produce them, exit status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import math
import sys
from pathlib import Path

import pandas as pd

from harness import plots
from harness.asv_results import ASV_RESULTS_SUBDIR, AsvResults, Run, load_asv, machine_names
from harness.formatting import NA, fmt, fmt_unit, formatted, markdown_table
from harness.results import (
    RUNS_DIR,
    SCALING_SUBDIR,
    TRAINING_SUBDIR,
    atomic_output,
    load_scaling_results,
    load_training_results,
    write_text_atomic,
)
from harness.tables import (
    CHANGE_FACTOR,
    SPEEDUP_PHASES,
    SUMMARY_METRICS,
    comparison_table,
    distributed_table,
    memory_table,
    run_rows,
    speedup_table,
    step_iterations,
    summary_table,
    training_table,
)

REPORT_SUBDIR = "report"
TIDY_CSV, REPORT_MD, COMPARISON_MD, COMPARISON_CSV = "results_tidy.csv", "report.md", "comparison.md", "comparison.csv"


# ------------------------------------------------------------------------------------------------ writing
def save_figure(figure, path: Path) -> Path:
    """Write a figure as PNG atomically and free it."""
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, format="png", dpi=plots.DPI)
    finally:
        plots.plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------ sections
def gpu_line(facts: dict) -> str:
    gpu = facts.get("gpu") or {}
    if gpu.get("available"):
        memory = gpu.get("memory_total_bytes")
        size = f", {memory / 2**30:.0f} GiB" if memory else ""
        return (f"{gpu.get('name', '?')}{size} (driver {gpu.get('driver', '?')}, CUDA driver "
                f"{gpu.get('cuda_driver', '?')}, {gpu.get('device_count', 1)} device(s))")
    if gpu:
        return f"none ({gpu.get('reason', 'not available')})"
    return "unknown (no machine facts)"


def run_header(run: Run, machine: dict) -> str:
    """The facts a reader needs to interpret one run's numbers."""
    facts = run.facts
    ram = machine.get("ram")
    ram_text = f", {int(ram) / 2**30:.1f} GiB RAM" if str(ram or "").isdigit() else ""
    cpu = (f"{machine.get('cpu') or facts.get('cpu', '?')}, {machine.get('num_cpu') or facts.get('cpu_count', '?')} "
           f"cores{ram_text}, {machine.get('os', facts.get('platform', '?'))}, {machine.get('arch', '')}").rstrip(", ")
    date = run.date.strftime("%Y-%m-%d %H:%M UTC") if not pd.isna(run.date) else "unknown date"
    profile = f"{run.profile} (network: {run.config_name})"
    if run.profile_assumed:
        profile += " **assumed**: no machine-facts file beside this run, so the default profile's network is assumed"
    lines = [f"### {run.label}", "", f"- machine: `{run.machine}`: {cpu}", f"- GPU: {gpu_line(facts)}",
             f"- commit: `{run.commit}` (commit date {date}), asv environment `{run.env}`",
             f"- benchmark profile: {profile}"]
    if facts:
        threads = ", ".join(f"{k} {v}" for k, v in (facts.get("threads") or {}).items())
        versions = ", ".join(f"{k} {v}" for k, v in (facts.get("versions") or {}).items() if v)
        environment = f"; environment {facts['thread_env']}" if facts.get("thread_env") else ""
        lines += [f"- threads: {threads or '?'}{environment}",
                  f"- BLAS: numpy {facts.get('numpy_blas', '?')}, torch {facts.get('torch_blas', '?')}",
                  f"- Python {facts.get('python', '?')}; libraries: {versions}"]
    return "\n".join(lines)


def summary_section(rows: pd.DataFrame, run: Run) -> str:
    iterations, note = step_iterations(rows, run.config_name)
    frame = summary_table(rows, iterations)
    if frame.empty:
        return f"### {run.label}\n\nNo per-implementation results in this run."
    columns = {"implementation": ("implementation", "str"), "batch_size": ("batch", "int"),
               "train_step": ("train step ms", "ms"), "forward": ("forward ms", "ms"),
               "backward": ("backward ms", "ms"), "routing": ("routing ms", "ms"),
               "images_per_second": ("images/s", "rate"), "train_gflops_per_s": ("train GFLOP/s", "rate"),
               "train_pct_of_peak": ("% of GEMM peak", "pct100"), "routing_share": ("routing share", "pct"),
               "host_memory_peak": ("host peak MiB (asv)", "mib"), "host_memory": ("host sampled MiB", "mib"),
               "gpu_memory_nvml": ("GPU NVML MiB", "mib"),
               "gpu_memory_allocator_live": ("GPU allocator live MiB", "mib"),
               "gpu_memory_allocator_reserved": ("GPU allocator reserved MiB", "mib"),
               "max_rel_error": ("max rel error", "sci")}
    unmeasured = frame[SUMMARY_METRICS + ["max_rel_error"]].isna().all(axis=1)
    missing = sorted(frame.loc[unmeasured, "implementation"].unique())
    text = [f"### {run.label}", "", f"Median times per call at {iterations} routing iterations. images/s = batch / "
            "train-step time; routing share = routing forward + backward alone / train step; GPU NVML = device "
            "memory in use (all processes, CUDA context included), GPU allocator live / reserved = the framework "
            "allocator's peak of bytes in live arrays / of bytes held from the device (its cache included); "
            "host peak = asv's peakmem of the benchmark process, host sampled = resident memory sampled during "
            "the step. n/a: not measured (skipped, failed or unavailable here)."]
    if frame["train_pct_of_peak"].isna().all():
        note += (" " if note else "") + ("% of GEMM peak is n/a: no GemmPeak (track_gemm_peak_gflops) result "
                                          "for these backends in this run.")
    if note:
        text += ["", note]
    text += ["", markdown_table(formatted(frame, columns), text_columns=1)]
    if missing:
        text += ["", f"No result at all on this run for: {', '.join(missing)}."]
    return "\n".join(text)


def memory_section(rows: pd.DataFrame, run: Run) -> str:
    iterations, _ = step_iterations(rows, run.config_name)
    frame = memory_table(rows, iterations, run.config_name)
    if frame.empty:
        return f"### {run.label}\n\nNo host-memory results (track_host_memory_train_step and " \
               "track_host_memory_before_model) in this run."
    columns = {"implementation": ("implementation", "str"), "batch_size": ("batch", "int"),
               "host_memory_before_model": ("before model MiB", "mib"), "host_memory": ("peak in step MiB", "mib"),
               "model_and_step": ("measured MiB", "mib"), "parameter_state": ("parameter state MiB", "mib"),
               "activations": ("activations MiB", "mib"), "im2col": ("im2col kept MiB", "mib"),
               "ratio": ("measured / expected", "times")}
    return (f"### {run.label}\n\nmeasured = resident memory at the peak of a training step minus resident memory "
            "before the model was built; expected = parameter state (parameters, gradients, Adam's two moments) "
            "+ the activations the backward pass needs (harness.activations), + the im2col matrices the "
            "NumPy/CuPy implementation keeps.  A ratio above 1 is what an implementation keeps beyond that: "
            "autograd's saved tensors and temporaries, the allocator's free lists.\n\n"
            + markdown_table(formatted(frame, columns), text_columns=1))


def speedup_section(rows: pd.DataFrame, run: Run) -> tuple[str, pd.DataFrame]:
    iterations, _ = step_iterations(rows, run.config_name)
    table = speedup_table(rows, iterations)
    if table.empty:
        return f"### {run.label}\n\nNo framework has both a vectorised and a looped implementation.", table
    wide = table.pivot_table(index=["pair", "batch_size"], columns="phase", values="speedup", aggfunc="first",
                             dropna=False).reindex(columns=SPEEDUP_PHASES).reset_index()
    columns = {"pair": ("framework (device)", "str"), "batch_size": ("batch", "int"),
               **{phase: (plots.PHASE_LABELS[phase], "times") for phase in SPEEDUP_PHASES}}
    text = (f"### {run.label}\n\nLooped time / vectorised time at {iterations} routing iterations "
            f"(> 1×: vectorised is faster).\n\n" + markdown_table(formatted(wide, columns), text_columns=1))
    return text, table


def comparison_section(comparison: pd.DataFrame, old: Run, new: Run) -> str:
    """The comparison of two runs as Markdown: changes first, then missing, then the rest."""
    both_na = comparison["change"] == f"{NA} in both"
    shown = comparison[~both_na].copy()
    order = {"worse": 0, "better": 1, "higher": 2, "lower": 2}
    shown["order"] = [order.get(change, 3 if change.startswith("missing") else 4 if change.startswith(NA) else 5)
                      for change in shown["change"]]
    shown = shown.sort_values(["order", "benchmark", "implementation", "batch_size", "routing_iterations", "params"],
                              kind="stable", na_position="first")
    flagged = int(shown["change"].isin(list(order)).sum())
    present = {side: set(comparison.loc[comparison[f"{side}_status"] != "missing", "implementation"].dropna())
               for side in ("old", "new")}
    only = {"old": sorted(present["old"] - present["new"]), "new": sorted(present["new"] - present["old"])}
    text = [f"### {new.label} against {old.label}", "",
            f"old: `{old.machine}` commit `{old.commit[:12]}` ({old.env}); new: `{new.machine}` commit "
            f"`{new.commit[:12]}` ({new.env}). ratio = new / old; flagged (**worse** / **better**, or higher / "
            f"lower where neither is better) when the ratio is outside [{1 / CHANGE_FACTOR:.3f}, {CHANGE_FACTOR}] "
            "and the interquartile ranges [q25, q75] of the two runs do not overlap (by the ratio alone where "
            "a run records no spread).", "",
            f"{flagged} change(s) flagged; {int(both_na.sum())} combination(s) without a result in either run "
            "not listed."]
    for side in ("old", "new"):
        if only[side]:
            text.append(f"\nOnly in the {side} run (shown as missing in the other): {', '.join(only[side])}.")
    cells = pd.DataFrame({
        "benchmark": shown["benchmark"], "parameters": shown["params"],
        **{side: [fmt_unit(v, u) if s != "missing" else "missing"
                  for v, u, s in zip(shown[side], shown["unit"], shown[f"{side}_status"])] for side in ("old", "new")},
        "ratio": [fmt(r, "times") if math.isfinite(r) else NA for r in shown["ratio"]],
        "change": [f"**{c}**" if c in order else c for c in shown["change"]],
    })
    return "\n".join(text + ["", markdown_table(cells, text_columns=2, left={"change"})])


def training_section(frame: pd.DataFrame) -> str:
    columns = {"file": ("file", "str"), "implementation": ("implementation", "str"), "device": ("device", "str"),
               "config": ("network", "str"),
               "batch_size": ("batch", "int"), "epochs": ("epochs", "int"), "status": ("status", "str"),
               "final_test_accuracy": ("final test accuracy", "pct"), "final_mean_loss": ("final mean loss", "num"),
               "train_seconds": ("training time s", "num"), "images_per_second": ("images/s", "rate")}
    cells = formatted(frame, columns)
    cells["epochs"] = [f"{done}/{asked}" for done, asked in zip(frame["epochs"], frame["epochs_requested"])]
    return ("Training time counts the training steps only (not evaluation); images/s = training images / "
            "training time.\n\n" + markdown_table(cells, text_columns=7))


def distributed_section(frame: pd.DataFrame) -> str:
    columns = {"label": ("run", "str"), "world_size": ("world size", "int"),
               "threads_per_rank": ("threads/rank", "int"),
               "per_rank_batch_size": ("batch/rank", "int"), "global_batch_size": ("global batch", "int"),
               "compute_units": ("compute used", "int"), "step_seconds": ("step ms", "ms"),
               "images_per_second": ("images/s", "rate"), "efficiency": ("scaling efficiency", "pct"),
               "allreduce_seconds": ("all-reduce ms", "ms"), "allreduce_share": ("all-reduce share", "pct")}
    text = ("Scaling efficiency = speed-up over the smallest world size / growth of the compute used (CPU: ranks × "
            "threads per rank, so ranks that split a fixed set of cores are judged against those cores; GPU: "
            "ranks); the scaling command prints the same figure. One rank has no all-reduce (n/a).")
    return text + "\n\n" + markdown_table(formatted(frame, columns), text_columns=1)


# ------------------------------------------------------------------------------------------------ plots
PLOT_DESCRIPTIONS = {
    "phase_times": "time of each phase per implementation at the largest batch size",
    "batch_scaling": "train-step time and images/s against batch size (log-log)",
    "routing_iterations": "routing alone (forward; forward + backward) against routing iterations",
    "vectorised_speedup": "speed-up of vectorised over looped routing per framework and phase",
    "memory": "GPU memory (NVML and allocator) against batch size, or host memory where there is no GPU result",
    "roofline": "achieved share of the measured GEMM peak per implementation and phase",
    "training_curves": "training loss and test accuracy against training time",
    "distributed_scaling": "images/s against world size with the ideal line, and scaling efficiency",
}


def draw(name: str, suffix: str, out: Path, build, entries: list[tuple[str, str, str]]) -> None:
    """Build and save one figure, or record why it was not drawn (and remove a stale file of that name)."""
    path = out / f"{name}{suffix}.png"
    try:
        figure = build()
    except plots.NoData as reason:
        path.unlink(missing_ok=True)
        entries.append((path.name, PLOT_DESCRIPTIONS[name], f"not drawn: {reason}"))
        return
    save_figure(figure, path)
    entries.append((path.name, PLOT_DESCRIPTIONS[name], ""))


def benchmark_plots(table: pd.DataFrame, runs: list[Run], out: Path, entries: list, speedups: dict) -> None:
    """The benchmark figures of the newest run of each machine (file names get the machine when there are
    several)."""
    newest = {run.machine: run for run in runs}  # runs are sorted by date
    palette = plots.colours(table["implementation"].dropna())
    for machine, run in sorted(newest.items()):
        rows = run_rows(table, run)
        suffix = f"_{machine}" if len(newest) > 1 else ""
        iterations, _ = step_iterations(rows, run.config_name)
        where = run.label
        draw("phase_times", suffix, out, lambda: plots.phase_times(rows, iterations, where), entries)
        draw("batch_scaling", suffix, out, lambda: plots.batch_scaling(rows, iterations, where, palette), entries)
        draw("routing_iterations", suffix, out, lambda: plots.routing_iterations(rows, where, palette), entries)
        draw("vectorised_speedup", suffix, out, lambda: plots.vectorised_speedup(speedups[run.key], where), entries)
        draw("memory", suffix, out, lambda: plots.memory(rows, iterations, where, palette), entries)
        draw("roofline", suffix, out, lambda: plots.roofline(rows, iterations, where), entries)


def plots_section(entries: list[tuple[str, str, str]]) -> str:
    lines = []
    for file, description, problem in entries:
        lines.append(f"- `{file}`: {description}: {problem}" if problem else f"- [`{file}`]({file}): {description}")
    for file, description, problem in entries:
        if not problem:
            lines += ["", f"![{description}]({file})"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def no_results_message(root: Path) -> str:
    return (f"error: no results under {root / ASV_RESULTS_SUBDIR} or {root / TRAINING_SUBDIR}: run `asv run --quick` "
            "(benchmarks) or `python -m harness.train --impl NAME --data-dir DIR` first (see README)")


def build_report(root: Path, out: Path, asv: AsvResults, training: list, distributed: list,
                 warnings: list[str]) -> list[Path]:
    """Write every output into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    table = asv.table
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = ["# capsbench report", "",
          f"Generated {generated} by `python -m harness.report` from `{root}`. "
          f"The tidy table of every benchmark result is [`{TIDY_CSV}`]({TIDY_CSV}).", ""]
    if not table.empty:
        written.append(write_csv(table, out / TIDY_CSV))
    md += ["## Runs", ""]
    md += [run_header(run, asv.machines.get(run.machine, {})) + "\n" for run in asv.runs] or ["No asv results.", ""]
    speedups, sections = {}, {"summary": [], "speedup": [], "memory": []}
    for run in asv.runs:
        rows = run_rows(table, run)
        sections["summary"].append(summary_section(rows, run))
        text, speedups[run.key] = speedup_section(rows, run)
        sections["speedup"].append(text)
        sections["memory"].append(memory_section(rows, run))
    if asv.runs:
        md += ["## Summary per implementation", "", "\n\n".join(sections["summary"]), "",
               "## Vectorised vs looped routing", "", "\n\n".join(sections["speedup"]), "",
               "## Host memory of a training step: measured and expected", "", "\n\n".join(sections["memory"]), ""]
    comparisons = compare_runs(table, asv.runs, out, written)
    if comparisons:
        md += ["## Comparison of runs", "", f"Also in [`{COMPARISON_MD}`]({COMPARISON_MD}) and "
               f"[`{COMPARISON_CSV}`]({COMPARISON_CSV}).", "", comparisons, ""]
    md += ["## Training", ""]
    md += [training_section(training_table(training)), ""] if training else [
        f"No training results under `{root / TRAINING_SUBDIR}` (`python -m harness.train` writes them).", ""]
    distributed_frame = distributed_table(distributed)
    if distributed:
        md += ["## Distributed scaling", "", distributed_section(distributed_frame), ""]
    entries: list[tuple[str, str, str]] = []
    if asv.runs:
        benchmark_plots(table, asv.runs, out, entries, speedups)
    draw("training_curves", "", out, lambda: plots.training_curves([(p.stem, r) for p, r in training]), entries)
    if distributed:
        draw("distributed_scaling", "", out, lambda: plots.distributed_scaling(distributed_frame), entries)
    written += [out / file for file, _, problem in entries if not problem]
    md += ["## Plots", "", plots_section(entries), ""]
    if warnings:
        md += ["## Warnings", "", "These inputs were skipped:", "", *[f"- {w}" for w in warnings], ""]
    written.append(write_text_atomic(out / REPORT_MD, "\n".join(md)))
    return written


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_output(path) as temporary:
        frame.to_csv(temporary, index=False)
    return path


def compare_runs(table: pd.DataFrame, runs: list[Run], out: Path, written: list[Path]) -> str:
    """Each run against the one before it on the same machine and environment (by commit date), or, with
    one run per machine, the machines against each other: comparison.md and .csv written, the Markdown
    returned (empty with a single run, and a stale comparison removed)."""
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
        sections.append(comparison_section(comparison, old, new))
        frames.append(comparison.assign(old_run=old.label, new_run=new.label))
    text = "\n\n".join(sections)
    written.append(write_text_atomic(out / COMPARISON_MD, "# capsbench comparison\n\n" + text + "\n"))
    written.append(write_csv(pd.concat(frames, ignore_index=True), out / COMPARISON_CSV))
    return text


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RUNS_DIR,
                        help="folder holding asv/, asv-facts/, training/, profile/ and distributed/ (default: runs, "
                             "where every command writes; the results this repository ships are in results)")
    parser.add_argument("--out", type=Path, help="output folder (default: <results>/report)")
    parser.add_argument("--machine", metavar="NAME", help="only the asv results of this machine")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root, out = args.results, args.out or args.results / REPORT_SUBDIR
    if args.machine and args.machine not in machine_names(root / ASV_RESULTS_SUBDIR):
        known = ", ".join(machine_names(root / ASV_RESULTS_SUBDIR)) or "none"
        print(f"error: no asv results for machine {args.machine!r} under {root / ASV_RESULTS_SUBDIR} "
              f"(machines there: {known})", file=sys.stderr)
        return 1
    asv = load_asv(root, args.machine)
    warnings = list(asv.warnings)
    training = load_training_results(root / TRAINING_SUBDIR, warnings)
    distributed = load_scaling_results(root / SCALING_SUBDIR, warnings)
    for warning in warnings:
        print(warning, file=sys.stderr)
    if asv.table.empty and not training and not distributed:
        print(f"error: no readable results under {root} (every results file was skipped, see the warnings above)"
              if warnings else no_results_message(root), file=sys.stderr)
        return 1
    written = build_report(root, out, asv, training, distributed, warnings)
    plots_written = sum(path.suffix == ".png" for path in written)
    print(f"report written to {out / REPORT_MD} ({plots_written} plots, {len(written)} files in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
