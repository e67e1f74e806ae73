"""The report's sections: each a view (Markdown) of a table of :mod:`harness.reporting.tables`, with the
sentences that say what stands behind it; the header of a run; the plots section and the figures it draws;
shared by ``python -m harness.report``, ``python -m harness.figures`` and ``python -m harness.readme``."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from harness.measure.scaling import MIN_RELIABLE_STEPS
from harness.reporting import plots
from harness.reporting.formatting import (
    NA,
    fmt,
    fmt_spread,
    fmt_unit_spread,
    formatted,
    markdown_table,
    sample_count,
    samples_heading,
)
from harness.reporting.ranking import (
    FAILED,
    NOT_MEASURED,
    RANKING_RULE,
    parity_cell,
    parity_mark,
    parity_table,
    parity_tolerance,
    ranking_lines,
    ranking_table,
)
from harness.reporting.tables import (
    CHANGE_FACTOR,
    FLAGS,
    SPEEDUP_PHASES,
    TIMINGS,
    TOO_FEW,
    memory_table,
    not_run,
    not_run_line,
    per_class_table,
    plan_lines,
    profile_layer_table,
    profile_rows,
    profile_summary,
    routing_algorithm_table,
    routing_gradient_table,
    run_rows,
    speedup_table,
    step_iterations,
    summary_table,
    table_algorithms,
    timed_under_dynamic_alone,
)
from harness.results import (
    FIGURES_JSON,
    Profile,
    atomic_output,
)
from harness.settings import (
    ASV_COMMIT_ENV,
    ASV_MACHINE_ENV,
)
from harness.suite.asv_results import DEFAULT_ROUTING_ALGORITHM, Run, routing_algorithm_facts, run_peak_sentence
from harness.suite.run_order import ANCESTRY, COMMIT_DATE, MEASURED, NAME

STALE_PLOTS = ("roofline",)  # plots of older reports under another name: removed when a report is written


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
    measured = (f"{run.measured_from:%Y-%m-%d %H:%M} to {run.measured:%Y-%m-%d %H:%M} UTC"
                if not (pd.isna(run.measured_from) or pd.isna(run.measured)) else "not recorded")
    profile = f"{run.profile} (network: {run.config_name})"
    if run.profile_assumed:
        profile += (" **assumed**: no machine-facts file beside this run, so the default profile's network is "
                    "assumed (and its plans and hardware peak are unknown); `asv run --python=same` tells the "
                    f"benchmarks neither commit nor machine: set {ASV_COMMIT_ENV} and, with --machine, "
                    f"{ASV_MACHINE_ENV} (docs/benchmarks.md)")
    lines = [f"### {run.label}", "", f"- machine: `{run.machine}`: {cpu}", f"- GPU: {gpu_line(facts)}",
             f"- commit: `{run.commit}` (commit date {date})", f"- measured: {measured}",
             f"- asv environment: `{run.env}`",
             f"- benchmark profile: {profile}"]
    if facts:
        threads = ", ".join(f"{k} {v}" for k, v in (facts.get("threads") or {}).items())
        versions = ", ".join(f"{k} {v}" for k, v in (facts.get("versions") or {}).items() if v)
        environment = f"; environment {facts['thread_env']}" if facts.get("thread_env") else ""
        lines += [f"- threads: {threads or '?'}{environment}",
                  f"- BLAS: numpy {facts.get('numpy_blas', '?')}, torch {facts.get('torch_blas', '?')}",
                  f"- Python {facts.get('python', '?')}; libraries: {versions}"]
    return "\n".join(lines)


def samples_sentence(samples) -> str:
    """What the times of a table rest on, in a sentence."""
    counts = sorted({n for n in (sample_count(value) for value in samples) if n is not None})
    if not counts:
        return "Times as asv recorded them (no sample statistics in this run)."
    if counts == [1]:
        return ("Every time is a single sample (`asv run --quick`): not a median, and with no spread to show; "
                "run asv without `--quick` for medians with their interquartile ranges.")
    if counts[0] == 1:
        return ("Times are medians with their interquartile range (q25–q75) where asv took several samples, and "
                "the sample itself where it took one (marked).")
    return "Times are medians with their interquartile range (q25–q75) of the samples asv took."


def timing_cells(frame: pd.DataFrame, metric: str, heading: str) -> tuple[str, list[str]]:
    """A column of times in ms with the samples behind them: counts shared by the whole column in the
    heading, otherwise in each cell."""
    shown = frame[metric].notna()
    suffix, per_cell = samples_heading(frame.loc[shown, f"{metric}_samples"])
    cells = [fmt_spread(value, q25, q75, samples, "ms", count=per_cell) for value, q25, q75, samples in zip(
        frame[metric], frame[f"{metric}_q25"], frame[f"{metric}_q75"], frame[f"{metric}_samples"])]
    return heading + suffix, cells


SUMMARY_TIMINGS = {"train_step": "train step ms", "forward": "forward ms", "backward": "backward ms",
                   "routing": "routing ms"}
SUMMARY_COLUMNS = {
    "images_per_second": ("images/s", "rate"), "train_gflops_per_s": ("train GFLOP/s", "rate"),
    "train_pct_of_peak": ("% of peak", "pct100"), "routing_share": ("routing share", "pct"),
    "host_memory_peak": ("host peak MiB (asv)", "mib"), "host_memory": ("host sampled MiB", "mib"),
    "gpu_memory_nvml": ("GPU NVML MiB", "mib"), "gpu_memory_allocator_live": ("GPU allocator live MiB", "mib"),
    "gpu_memory_allocator_reserved": ("GPU allocator reserved MiB", "mib"),
    "gpu_memory_allocator_mixed": ("GPU allocator MiB (old mixed figure)", "mib")}
PARITY_HEADING = "parity (max rel error)"


def summary_section(rows: pd.DataFrame, run: Run) -> str:
    iterations, note = step_iterations(rows, run.config_name)
    frame = summary_table(rows, iterations)
    if frame.empty:
        return f"### {run.label}\n\nNo per-implementation results in this run."
    absent = not_run(rows, run.facts)
    frame = frame[~frame["implementation"].isin(list(absent))].reset_index(drop=True)
    if frame.empty:
        return f"### {run.label}\n\nNo implementation has a result in this run. {not_run_line(absent)}"
    parity = parity_table(rows)
    status = parity.set_index("implementation")["parity"]
    cells = formatted(frame, {"implementation": ("implementation", "str"), "batch_size": ("batch", "int")})
    cells["implementation"] = [name + parity_mark(status.get(name, NOT_MEASURED)) for name in frame["implementation"]]
    for metric, heading in SUMMARY_TIMINGS.items():
        title, column = timing_cells(frame, metric, heading)
        cells[title] = column
    columns = dict(SUMMARY_COLUMNS)
    if frame["gpu_memory_allocator_mixed"].isna().all():
        del columns["gpu_memory_allocator_mixed"]  # only older runs record the mixed figure
    for name, (heading, kind) in columns.items():
        cells[heading] = [fmt(value, kind) for value in frame[name]]
    cells[PARITY_HEADING] = [parity_cell(status.get(name, NOT_MEASURED), error)
                             for name, error in zip(frame["implementation"], frame["max_rel_error"])]
    timed = [samples for metric in TIMINGS for samples in frame.loc[frame[metric].notna(), f"{metric}_samples"]]
    text = [f"### {run.label}", "", f"Times per call at {iterations} routing iterations. {samples_sentence(timed)} "
            "images/s = batch / train-step time; routing share = routing forward + backward alone / train step; "
            "GPU NVML = device memory in use (all processes, CUDA context included), GPU allocator live / reserved "
            "= the framework allocator's peak of bytes in live arrays / of bytes held from the device (its cache "
            "included); host peak = asv's peakmem of the benchmark process, host sampled = resident memory sampled "
            "during the step. n/a: not measured (skipped, failed or unavailable here)."]
    if "gpu_memory_allocator_mixed" in columns:
        text[-1] += (" GPU allocator (old mixed figure): older runs recorded torch's live peak and CuPy's pool "
                     "after the step in one figure, superseded by live and reserved.")
    note += (" " if note else "") + run_peak_sentence(rows, run.facts)
    if note:
        text += ["", note]
    text += ["", markdown_table(cells, text_columns=1)]
    if absent:
        text += ["", not_run_line(absent)]
    said = parity_sentence(parity[parity["implementation"].isin(frame["implementation"])])
    text += ["", said] if said else []
    text += ["", ranking_section(frame, parity)]
    plans = plan_lines(run.facts.get("plans") or {})
    if plans:
        text += ["", "Convolution plans the implementations chose where they ran (forward / weight gradient / "
                 "input gradient; from the run's facts):", "", *plans]
    return "\n".join(text)


def summary_rules() -> str:
    """What every run's parity column and ranking mean (:mod:`harness.reporting.ranking`), said once above them."""
    return (f"Parity: a run's largest error of any quantity of the parity check (`track_max_rel_error`, float32 "
            f"against the float64 reference) passes at or below {parity_tolerance():.0e}, the widest tolerance "
            "harness.check allows any quantity; an implementation without a passing figure in that run carries "
            f"\"{NOT_MEASURED}\" or \"{FAILED}\" beside its name wherever it is named, and one that FAILED is "
            f"not ranked. Each run's ranking is by the median train step per batch size, fastest first: {RANKING_RULE}")


def parity_sentence(parity: pd.DataFrame) -> str:
    """Which implementations of a run did not pass parity, in a sentence (empty where all passed)."""
    failed = sorted(parity.loc[parity["parity"] == FAILED, "implementation"])
    unmeasured = sorted(parity.loc[parity["parity"] == NOT_MEASURED, "implementation"])
    text = []
    if failed:
        text.append(f"**Parity FAILED**: {', '.join(failed)} (not ranked: its times are not of the same function).")
    if unmeasured and len(unmeasured) == len(parity):
        text.append("No implementation's parity was measured in this run (its correctness benchmark did not run).")
    elif unmeasured:
        text.append(f"Parity not measured in this run: {', '.join(unmeasured)}.")
    return " ".join(text)


def ranking_section(frame: pd.DataFrame, parity: pd.DataFrame) -> str:
    """Per batch size, the implementations by train step, fastest first, with the pairs the samples cannot
    rank (:func:`harness.reporting.ranking.ranking_lines`)."""
    lines = ranking_lines(ranking_table(frame, parity))
    if not lines:
        return "No train-step time to rank."
    return "\n".join(["Ranking by train step, fastest first:", "", *lines])


ROUTING_GRADIENT_TIMINGS = {"backward": "backward", "train_step": "train step",
                            "routing_backward": "routing fwd+bwd"}


def routing_gradient_section(rows: pd.DataFrame, run: Run) -> str:
    """The saving of the routing gradient ``final`` over ``full`` in one run (``rows`` at both gradients);
    empty when the run did not measure ``final``."""
    iterations, _ = step_iterations(rows[rows["routing_gradient"] == "full"], run.config_name)
    frame = routing_gradient_table(rows, iterations)
    if frame.empty:
        return ""
    cells = formatted(frame, {"implementation": ("implementation", "str"), "batch_size": ("batch", "int")})
    for phase, heading in ROUTING_GRADIENT_TIMINGS.items():
        for gradient in ("full", "final"):
            columns = {f"{phase}_{gradient}{suffix}": f"{phase}{suffix}" for suffix in ("", "_q25", "_q75", "_samples")}
            title, column = timing_cells(frame.rename(columns=columns), phase, f"{heading} {gradient} ms")
            cells[title] = column
        cells[f"{heading} saving"] = [fmt(value, "pct") for value in frame[f"{phase}_saving"]]
    cells["routing share full"] = [fmt(value, "pct") for value in frame["routing_share_full"]]
    cells["routing share final"] = [fmt(value, "pct") for value in frame["routing_share_final"]]
    timed = [samples for phase in ROUTING_GRADIENT_TIMINGS for gradient in ("full", "final")
             for samples in frame.loc[frame[f"{phase}_{gradient}"].notna(), f"{phase}_{gradient}_samples"]]
    text = [f"### {run.label}", "", f"Times per call at {iterations} routing iterations, each implementation and "
            f"batch at both routing gradients of harness.spec: full (the gradient through every iteration) and "
            f"final (through the last iteration's weighted sum alone). {samples_sentence(timed)} saving = 1 - "
            "final / full (negative: final was slower); routing share = routing forward + backward alone / train "
            "step, at each gradient. A saving within the spreads of the two times is not a measured difference.",
            "", markdown_table(cells, text_columns=1)]
    return "\n".join(text)


ROUTING_ALGORITHM_TIMINGS = {"train_step": "train step", "routing_backward": "routing fwd+bwd"}
ROUTING_ALGORITHM_MEMORY = {"host_model_and_step": "host model+step", "gpu_memory_allocator_live": "GPU allocator live"}


def iterative_algorithms(rows: pd.DataFrame, facts: dict) -> dict[str, bool]:
    """Whether each routing algorithm of ``rows`` is iterative, as the run's facts (or capsbench's built-ins)
    say; True where nothing says (every iteration count then stands for itself)."""
    names = set(rows["routing_algorithm"].dropna()) if "routing_algorithm" in rows else set()
    return {name: routing_algorithm_facts(name, facts).get("iterative", True) is not False for name in names}


def ratio_cell(ratio, low, high) -> str:
    """A ratio with its range over the two interquartile ranges where there is one: "0.42× (0.40–0.45×)"."""
    text = fmt(ratio, "times")
    if text == NA or pd.isna(low) or pd.isna(high) or low == high:
        return text
    return f"{text} ({low:.2f}–{high:.2f}×)"


def measured_iterations_text(rows: pd.DataFrame, algorithm: str) -> str:
    """At which routing-iteration count(s) the run timed ``algorithm`` (the grid cell of one that is not
    iterative, where the count means nothing)."""
    timed = rows[(rows["routing_algorithm"] == algorithm) & rows["value"].notna()
                 & rows["metric"].isin(list(ROUTING_ALGORITHM_TIMINGS))]
    counts = sorted({int(count) for count in timed["routing_iterations"].dropna()})
    return ", ".join(map(str, counts)) or "?"


def routing_algorithm_section(rows: pd.DataFrame, run: Run) -> str:
    """Each routing algorithm the run measured beside dynamic routing (``rows``: the run's at the full routing
    gradient and every algorithm), per implementation and batch
    (:func:`harness.reporting.tables.routing_algorithm_table`); empty when the run measured dynamic alone."""
    dynamic = rows[rows["routing_algorithm"] == DEFAULT_ROUTING_ALGORITHM]
    iterations, _ = step_iterations(dynamic, run.config_name)
    iterative = iterative_algorithms(rows, run.facts)
    frame = routing_algorithm_table(rows, iterations, iterative)
    if frame.empty:
        return ""
    algorithms = table_algorithms(frame)
    others = algorithms[1:]
    cells = formatted(frame, {"implementation": ("implementation", "str"), "batch_size": ("batch", "int")})
    compared = {metric for metric in [*ROUTING_ALGORITHM_TIMINGS, "routing_share", *ROUTING_ALGORITHM_MEMORY]
                if frame[[f"{metric}_{algorithm}" for algorithm in others]].notna().any().any()}
    timed = []
    for metric, heading in ROUTING_ALGORITHM_TIMINGS.items():
        if metric not in compared:
            continue  # dynamic routing's figure alone: the summary has it
        for algorithm in algorithms:
            renamed = {f"{metric}_{algorithm}{suffix}": f"{metric}{suffix}"
                       for suffix in ("", "_q25", "_q75", "_samples")}
            title, column = timing_cells(frame.rename(columns=renamed), metric, f"{heading} {algorithm} ms")
            cells[title] = column
            timed += list(frame.loc[frame[f"{metric}_{algorithm}"].notna(), f"{metric}_{algorithm}_samples"])
        for algorithm in others:
            cells[f"{heading} {algorithm} / dynamic"] = [
                ratio_cell(*values) for values in zip(frame[f"{metric}_ratio_{algorithm}"],
                                                      frame[f"{metric}_ratio_{algorithm}_low"],
                                                      frame[f"{metric}_ratio_{algorithm}_high"])]
    for algorithm in algorithms if "routing_share" in compared else []:
        cells[f"routing share {algorithm}"] = [fmt(value, "pct") for value in frame[f"routing_share_{algorithm}"]]
    for metric, heading in ROUTING_ALGORITHM_MEMORY.items():
        if metric not in compared:
            continue  # not measured under another algorithm (GPU memory on a CPU machine): no column of n/a
        for algorithm in algorithms:
            cells[f"{heading} {algorithm} MiB"] = [fmt(value, "mib") for value in frame[f"{metric}_{algorithm}"]]
        for algorithm in others:
            cells[f"{heading} {algorithm} / dynamic"] = [
                fmt(v, "times") for v in frame[f"{metric}_ratio_{algorithm}"]]
    where = "; ".join(f"{algorithm} at the grid's {measured_iterations_text(rows, algorithm)} routing iterations"
                      + (" (it is not iterative: the count means nothing to it, the other counts are not measured)"
                         if not iterative.get(algorithm, True) else "") for algorithm in others)
    text = [f"### {run.label}", "", f"Times per call, each implementation and batch under every routing algorithm "
            f"the run measured (harness.spec), at the full routing gradient: dynamic routing at {iterations} routing "
            f"iterations; {where}. {samples_sentence(timed)} ratio = algorithm / dynamic of the same "
            "implementation, batch and run (below 1: it takes less), with its range over the two interquartile "
            "ranges in brackets (q25 / the other's q75 to q75 / the other's q25): a range that holds 1 is no "
            "measured difference. routing share = routing forward + backward alone / train step; host model+step "
            "= resident memory at the peak of a training step minus before the model was built.",
            "", markdown_table(cells, text_columns=1)]
    missing = [heading for metric, heading in [*ROUTING_ALGORITHM_TIMINGS.items(), ("routing_share", "routing share"),
                                               ("host_model_and_step", "host memory")] if metric not in compared]
    if missing:
        text += ["", f"Not measured under {' or '.join(others)} in this run, so not in the table: "
                 f"{', '.join(missing)}."]
    for algorithm, alone in timed_under_dynamic_alone(rows, frame).items():
        if alone:
            text += ["", f"Timed under dynamic routing alone in this run, not under {algorithm} (skipped: the "
                     f"implementation does not compute it, or the run left it out): {', '.join(alone)}."]
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
            "+ the activations the backward pass needs (harness.measure.expected_memory), + the im2col matrices the "
            "NumPy/CuPy implementation keeps.  A ratio above 1 is what an implementation keeps beyond that: "
            "autograd's saved tensors and temporaries, the allocator's free lists.\n\n"
            + markdown_table(formatted(frame, columns), text_columns=1))


def speedup_basis(rows: pd.DataFrame) -> str:
    """What the times behind the speed-ups rest on, in a sentence."""
    timed = rows.loc[rows["metric"].isin(SPEEDUP_PHASES) & rows["value"].notna(), "samples"]
    counts = sorted({n for n in (sample_count(value) for value in timed) if n is not None})
    if not counts:
        return ""
    if counts == [1]:
        return "Both times of each ratio are single samples (no medians, no spread)."
    if counts[0] > 1:
        return "Ratios of medians" + (f" of {counts[0]} samples each." if len(counts) == 1 else " of several samples.")
    return "Ratios of medians or, where asv took one sample, of single samples."


def speedup_section(rows: pd.DataFrame, run: Run) -> tuple[str, pd.DataFrame]:
    iterations, _ = step_iterations(rows, run.config_name)
    table = speedup_table(rows, iterations)
    if table.empty:
        return f"### {run.label}\n\nNo framework has both a vectorised and a looped implementation.", table
    wide = table.pivot_table(index=["pair", "batch_size"], columns="phase", values="speedup", aggfunc="first",
                             dropna=False).reindex(columns=SPEEDUP_PHASES).reset_index()
    measured = table.groupby("pair", sort=False)["speedup"].apply(lambda values: values.notna().any())
    unmeasured = [pair for pair, any_value in measured.items() if not any_value]
    wide = wide[~wide["pair"].isin(unmeasured)]
    absent = not_run(rows, run.facts)
    reasons = {}
    for pair in unmeasured:
        names = table.loc[table["pair"] == pair, ["vectorised", "looped"]].iloc[0].tolist()
        why = sorted({absent[name] for name in names if name in absent})
        reasons[pair] = "; ".join(why) if why else "no result for both variants"
    basis = " " + speedup_basis(rows) if speedup_basis(rows) else ""
    text = [f"### {run.label}", "", f"Looped time / vectorised time at {iterations} routing iterations "
            f"(> 1×: vectorised is faster).{basis}"]
    if not wide.empty:
        columns = {"pair": ("framework (device)", "str"), "batch_size": ("batch", "int"),
                   **{phase: (plots.PHASE_LABELS[phase], "times") for phase in SPEEDUP_PHASES}}
        text += ["", markdown_table(formatted(wide, columns), text_columns=1)]
    if reasons:
        text += ["", not_run_line(reasons)]
    return "\n".join(text), table


WHY_NEWER = {ANCESTRY: "new is a descendant of old in git", MEASURED: "new was measured later",
             COMMIT_DATE: "new's commit date is later (neither git nor the measuring times tell)",
             NAME: "neither git, the measuring times nor the commit dates tell: by name"}


def comparison_section(comparison: pd.DataFrame, old: Run, new: Run, why: str = "") -> str:
    """The comparison of two runs as Markdown: changes first, then those with too few samples to judge,
    then missing, then the rest.  Not rows but one line each: the combinations with no result on either
    side (an implementation unavailable in both runs), and every benchmark one run did not measure at all
    (a run of some benchmarks only); ``why`` (:mod:`harness.suite.run_order`) says why new is the newer."""
    present = {side: set(comparison.loc[comparison[f"{side}_status"] != "missing", "benchmark"])
               for side in ("old", "new")}
    benchmark_only = {"old": sorted(present["old"] - present["new"]), "new": sorted(present["new"] - present["old"])}
    one_sided = comparison["benchmark"].isin(benchmark_only["old"] + benchmark_only["new"])
    both_na = ~(comparison["old"].map(math.isfinite) | comparison["new"].map(math.isfinite)) & ~one_sided
    shown = comparison[~both_na & ~one_sided].copy()
    too_few = shown["change"].str.startswith(TOO_FEW)

    def rank(change: str) -> int:
        if change in FLAGS:
            return FLAGS.index(change) if change in ("worse", "better") else 2
        return 3 if change.startswith(TOO_FEW) else 4 if change.startswith("missing") else \
            5 if change.startswith(NA) else 6

    shown["order"] = [rank(change) for change in shown["change"]]
    shown = shown.sort_values(["order", "benchmark", "implementation", "batch_size", "routing_iterations", "params"],
                              kind="stable", na_position="first")
    flagged = int(shown["change"].isin(FLAGS).sum())
    only = {side: sorted(name for name, group in shown.groupby("implementation")
                         if (group[f"{other}_status"] == "missing").all())
            for side, other in (("old", "new"), ("new", "old"))}
    single = {side: bool((comparison[f"{side}_samples"] == 1).any()) for side in ("old", "new")}
    newer_because = f" ({WHY_NEWER[why]})" if why in WHY_NEWER else ""
    text = [f"### {new.label} against {old.label}", "",
            f"old: `{old.machine}` commit `{old.commit[:12]}` ({old.env}); new: `{new.machine}` commit "
            f"`{new.commit[:12]}` ({new.env}){newer_because}. ratio = new / old; flagged (**worse** / "
            f"**better**, or higher / lower where neither is better) when the ratio is outside "
            f"[{1 / CHANGE_FACTOR:.3f}, {CHANGE_FACTOR}] and the interquartile ranges [q25, q75] of the two runs "
            "do not overlap. Where either side rests on a "
            f"single sample nothing is flagged: a ratio beyond the factor reads \"{TOO_FEW}\". A figure asv "
            "records without statistics (peakmem_ and track_ benchmarks: one measurement, no sample count) is "
            "judged by the ratio alone."]
    if single["old"] or single["new"]:
        sides = " and ".join(side for side in ("old", "new") if single[side])
        both = " and " in sides
        text += ["", f"**Too few samples to judge**: the {sides} run{'s' if both else ''} "
                 f"{'have' if both else 'has'} timings of one sample each (`asv run --quick`), so "
                 f"{int(too_few.sum())} ratio(s) beyond the factor are listed without calling them worse or better. "
                 "Run asv without `--quick` on both commits to compare them."]
    absent_both = sorted(set(comparison.loc[both_na, "implementation"].dropna())
                         - set(shown["implementation"].dropna()))
    text += ["", f"{flagged} change(s) flagged; {int(both_na.sum())} combination(s) without a result in either run "
             "not listed" + (f" (not run in either: {', '.join(absent_both)})" if absent_both else "") + "."]
    for side in ("old", "new"):
        if only[side]:
            text.append(f"\nOnly in the {side} run (shown as missing in the other): {', '.join(only[side])}.")
        if benchmark_only[side]:
            count = int((one_sided & comparison["benchmark"].isin(benchmark_only[side])).sum())
            text.append(f"\nMeasured in the {side} run only, not listed ({count} combination(s)): "
                        f"{', '.join(benchmark_only[side])}.")
    cells = pd.DataFrame({
        "benchmark": shown["benchmark"], "parameters": shown["params"],
        **{side: [fmt_unit_spread(v, q25, q75, n, u) if s != "missing" else "missing"
                  for v, q25, q75, n, u, s in zip(shown[side], shown[f"{side}_q25"], shown[f"{side}_q75"],
                                                  shown[f"{side}_samples"], shown["unit"], shown[f"{side}_status"])]
           for side in ("old", "new")},
        "ratio": [fmt(r, "times") if math.isfinite(r) else NA for r in shown["ratio"]],
        "change": [f"**{c}**" if c in FLAGS else c for c in shown["change"]],
    })
    return "\n".join(text + ["", markdown_table(cells, text_columns=2, left={"change"})])


TRAINING_COLUMNS = {
    "file": ("file", "str"), "implementation": ("implementation", "str"), "device": ("device", "str"),
    "config": ("network", "str"), "batch_size": ("batch", "int"), "ranks": ("ranks", "int"),
    "train_images": ("training images", "count"), "test_images": ("test images", "count"),
    "schedule": ("schedule", "str"), "routing_algorithm": ("routing", "str"),
    "routing_gradient": ("routing gradient", "str"), "epochs": ("epochs", "int"),
    "status": ("status", "str"),
    "best_test_accuracy": ("best test accuracy", "pct"), "final_test_accuracy": ("final test accuracy", "pct"),
    "final_mean_loss": ("final mean loss", "num"), "train_seconds": ("training s", "num"),
    "eval_seconds": ("evaluation s", "num"), "wall_seconds": ("wall s", "num"),
    "images_per_second": ("images/s", "rate")}


def training_section(frame: pd.DataFrame) -> str:
    """The training runs, one table per (network, training images, test images): runs on different data
    are never rows of one table."""
    text = ["Runs are grouped by network and by the images they trained and tested on; numbers are read across "
            "rows of one table only. Times add up all epochs: training counts the training loop alone (batches "
            "prepared and augmented), evaluation the test set, wall the whole epoch with both and the saving "
            "of results (n/a: not recorded by older runs); images/s = training images / training time; ranks = "
            "processes training together (data-parallel)."]
    columns = dict(TRAINING_COLUMNS)
    for optional in ("eval_seconds", "wall_seconds"):
        if frame[optional].isna().all():
            del columns[optional]
    groups = frame.groupby(["config", "train_images", "test_images"], sort=False)
    keys = sorted(groups.groups, key=lambda key: (-int(key[1]), -int(key[2]), str(key[0])))
    for key in keys:
        group = groups.get_group(key).sort_values(["implementation", "file"], kind="stable")
        config, train_images, test_images = key
        cells = pd.DataFrame({heading: [f"{int(v):,}" if kind == "count" else fmt(v, kind) for v in group[name]]
                              for name, (heading, kind) in columns.items()})
        cells["epochs"] = [f"{done}/{asked}" for done, asked in zip(group["epochs"], group["epochs_requested"])]
        text += ["", f"### {int(train_images):,} training images, {int(test_images):,} test images ({config} "
                 "network)", "", markdown_table(cells, text_columns=6,
                                                  left={"schedule", "routing", "routing gradient", "epochs", "status"})]
    return "\n".join(text)


def distributed_section(frame: pd.DataFrame) -> str:
    steps = {int(n) for n in frame["steps"].dropna()} if "steps" in frame else set()
    step_heading = f"step ms (median of {steps.pop()} steps)" if len(steps) == 1 else "step ms (median)"
    columns = {"label": ("run", "str"), "world_size": ("world size", "int"),
               "threads_per_rank": ("threads/rank", "int"),
               "per_rank_batch_size": ("batch/rank", "int"), "global_batch_size": ("global batch", "int"),
               "compute_units": ("compute used", "int"), "step_seconds": (step_heading, "ms"),
               "images_per_second": ("images/s", "rate"), "efficiency": ("scaling efficiency", "pct"),
               "allreduce_seconds": ("all-reduce ms", "ms"), "allreduce_share": ("all-reduce share", "pct")}
    if len(steps) > 1:
        columns["steps"] = ("timed steps", "int")
    text = ("Scaling efficiency = speed-up over the smallest world size / growth of the compute used (CPU: ranks × "
            "threads per rank, so ranks that split a fixed set of cores are judged against those cores; GPU: "
            "ranks); the scaling command prints the same figure. Step and all-reduce times are medians over the "
            "timed steps (the slowest rank's); the scaling command records their interquartile range (older "
            "results record no spread), and an efficiency from fewer than "
            f"{MIN_RELIABLE_STEPS} timed steps or within that spread is said not reliable. One rank has no "
            "all-reduce (n/a).")
    caveats = [f"Not reliable: {row.label}, world size {row.world_size}: {row.efficiency_caveat}."
               for row in frame.itertuples() if getattr(row, "efficiency_caveat", "")]
    return "\n\n".join([text, markdown_table(formatted(frame, columns), text_columns=1), *caveats])


def profile_section(profile: Profile) -> str:
    """Where the time of a training step goes: per implementation, a table of layers x phases."""
    meta = profile.meta
    machine = meta.get("machine") or {}
    text = ["Per implementation, each layer's time in each phase of a training step (`python -m harness.profile`): "
            "the median per step over the profiled steps with its interquartile range (q25–q75), its share of the "
            "profiled step, the achieved GFLOP/s (analytic FLOPs / time) and its % of peak (one figure for every "
            "implementation), "
            "and the memory the profiler saw where it reports it. The profiler's own cost is the overhead: the "
            "profiled step against the same step timed without it."]
    if machine:
        cpu = machine.get("cpu") or "?"
        text += ["", f"Profiled on `{machine.get('hostname', '?')}`: {cpu}, {machine.get('cpu_count', '?')} cores; "
                 f"GPU: {gpu_line(machine)}."]
    for name in profile.implementations():
        rows = profile_rows(profile, name)
        about = profile.about(name)
        described = ", ".join(str(about[key]) for key in ("framework", "device") if about.get(key))
        if about.get("routing_variant"):
            described += f", {about['routing_variant']} routing"
        summary = profile_summary(rows, about)
        text += ["", f"### {name}" + (f" ({described})" if described else ""), "",
                 profile_facts_line(summary), "", f"Per phase: {profile_phases_line(summary)}.", "",
                 markdown_table(profile_cells(profile_layer_table(rows), summary["steps"]), text_columns=2)]
    return "\n".join(text)


def profile_facts_line(summary: dict) -> str:
    """The sentence above an implementation's profile table (:func:`harness.reporting.tables.profile_summary`)."""
    n, step, plain, overhead = summary["steps"], summary["step_s"], summary["unprofiled_step_s"], summary["overhead"]
    facts = [f"batch {summary['batch_size']}" if summary["batch_size"] is not None else "",
             f"{summary['config_name']} network" if summary["config_name"] else "", str(summary["dtype"] or ""),
             f"{n} profiled step{'s' if n != 1 else ''}" if n is not None else ""]
    if step is not None:
        facts.append(f"profiled step {fmt(step, 'ms')} ms")
    if plain is not None:
        facts.append(f"unprofiled step {fmt(plain, 'ms')} ms")
    if overhead is not None:
        facts.append(f"profiler overhead {100 * overhead:+.1f}%")
    share = summary["layers_share_of_step"]
    facts.append(f"the layers add up to {fmt(summary['layers_s'], 'ms')} ms"
                 + (f" ({share:.1%} of the profiled step)" if share is not None else ""))
    return "; ".join(fact for fact in facts if fact) + "."


def profile_phases_line(summary: dict) -> str:
    """Each phase's time and share of the step, and the phase measured whole where it was."""
    return "; ".join(
        f"{phase} {fmt(time, 'ms')} ms of layers ({fmt(share, 'pct')} of the step"
        + (f"; the phase measured whole: {fmt(whole, 'ms')} ms" if whole is not None else "") + ")"
        for phase, time, share, whole in summary["phases"])


def profile_cells(table: pd.DataFrame, steps: int | None) -> pd.DataFrame:
    """:func:`harness.reporting.tables.profile_layer_table` formatted: times with their spread over ``steps``."""
    samples = [steps] * len(table) if steps is not None else [math.nan] * len(table)
    suffix, per_cell = samples_heading(samples)
    suffix = suffix.replace("samples", "steps").replace("sample", "step")
    cells = pd.DataFrame({
        "phase": table["phase"], "layer": table["layer"],
        f"time ms{suffix}": [fmt_spread(value, q25, q75, count, "ms", count=per_cell)
                             for value, q25, q75, count in zip(table["time_s"], table["time_q25_s"],
                                                               table["time_q75_s"], samples)],
        "share of step": [fmt(value, "pct") for value in table["share"]],
        "GFLOP/s": [fmt(value, "rate") for value in table["gflops_per_s"]],
        "% of peak": [fmt(value, "pct100") for value in table["pct_of_peak"]],
    })
    for column, heading in (("memory_allocated_bytes", "allocated MiB"), ("memory_peak_bytes", "peak MiB")):
        if column in table:
            cells[heading] = [fmt(value, "mib") for value in table[column]]
    return cells


def per_class_section(record: dict, figures_dir: Path) -> str:
    """What a trained network's figures show (:mod:`harness.figures`): where they come from, the accuracy,
    the per-class table (accuracy, most frequent confusion) and the three images, linked from
    ``figures_dir`` (the figures' folder relative to the Markdown file)."""
    confusion = record["confusion"]
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(confusion)))
    run = record.get("training_run") or {}
    trained = f", trained by {run['implementation']}" if run.get("implementation") else ""
    grid = record.get("perturbation_grid") or []
    table = per_class_table(confusion)
    cells = pd.DataFrame({
        "class": [str(value) for value in table["class"]],
        "test images": [fmt(value, "int") for value in table["images"]],
        "correct": [fmt(value, "int") for value in table["correct"]],
        "accuracy": [NA if math.isnan(value) else f"{value:.2%}" for value in table["accuracy"]],
        "most frequent confusion": ["none" if pd.isna(other) else f"{int(other)} ({count} image"
                                    + ("s)" if count != 1 else ")")
                                    for other, count in zip(table["confused_with"], table["confusions"])]})
    accuracy = f"{correct / total:.2%}" if total else NA
    lines = [f"From `{record.get('checkpoint', '?')}` (after epoch {record.get('checkpoint_epoch', '?')}, "
             f"{record.get('config_name', '?')} network{trained}), computed by {record.get('implementation', '?')} "
             f"({record.get('dtype', '?')}) on {total:,} test images: accuracy {accuracy} ({correct:,} / {total:,}). "
             f"What was drawn, image by image: [`{FIGURES_JSON}`]({(figures_dir / FIGURES_JSON).as_posix()}).", "",
             markdown_table(cells, text_columns=1, left={"most frequent confusion"}), ""]
    files = record["files"]
    shown = [("reconstructions", "Reconstructions", "test images and their reconstructions from the predicted "
              f"class's capsule ({record.get('per_class', '?')} per class, seeded; misclassified ones in red)"),
             ("perturbations", "Perturbations", "each dimension of the predicted capsule plus "
              + (f"{grid[0]:+.2f} … {grid[-1]:+.2f} ({len(grid)} steps)" if grid else "a step")
              + ", decoded: one test image per class, one row a dimension (the paper's Figure 4)"),
             ("confusion", "Confusion", "rows the true class, columns the predicted one")]
    for key, title, description in shown:
        if key in files:
            link = (figures_dir / files[key]).as_posix()
            lines += [f"**{title}** ([`{files[key]}`]({link})): {description}.", "", f"![{title}]({link})", ""]
    return "\n".join(lines).rstrip()


# ------------------------------------------------------------------------------------------------ plots
PLOT_DESCRIPTIONS = {
    "phase_times": "time of each phase per implementation at the largest batch size",
    "batch_scaling": "train-step time and images/s against batch size (log-log)",
    "routing_iterations": "routing alone (forward; forward + backward) against routing iterations",
    "vectorised_speedup": "speed-up of vectorised over looped routing per framework and phase",
    "memory": "GPU memory (NVML and allocator) against batch size, or host memory where there is no GPU result",
    "peak_share": "achieved GFLOP/s as a share of the machine's one peak per implementation and phase",
    "routing_gradient_saving": "time the routing gradient final saves over full per implementation and batch size "
                               "(backward, train step, routing forward + backward)",
    "routing_algorithms": "train step, routing forward + backward and host memory under each routing algorithm "
                          "per implementation and batch size, with the ratio to dynamic routing",
    "training_curves": "training loss and test accuracy against training time",
    "profile": "where the time of a training step goes, by phase and layer, per implementation",
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


def file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def benchmark_plots(table: pd.DataFrame, runs: list[Run], out: Path, entries: list, speedups: dict) -> None:
    """The benchmark figures of the newest run of each machine and environment (file names get the machine,
    and the environment where a machine has several, when there is more than one)."""
    newest = {(run.machine, run.env): run for run in runs}  # runs are sorted by date
    machines = {machine for machine, _ in newest}
    for (machine, _), run in sorted(newest.items()):
        rows = run_rows(table, run)
        suffix = "" if len(newest) == 1 else f"_{file_part(machine)}" if len(newest) == len(machines) else \
            f"_{file_part(machine)}_{file_part(run.short_env)}"
        iterations, _ = step_iterations(rows, run.config_name)
        where = run.label
        draw("phase_times", suffix, out, lambda: plots.phase_times(rows, iterations, where), entries)
        draw("batch_scaling", suffix, out, lambda: plots.batch_scaling(rows, iterations, where), entries)
        draw("routing_iterations", suffix, out, lambda: plots.routing_iterations(rows, where), entries)
        draw("vectorised_speedup", suffix, out,
             lambda: plots.vectorised_speedup(speedups[run.key], where, speedup_basis(rows)), entries)
        draw("memory", suffix, out, lambda: plots.memory(rows, iterations, where), entries)
        draw("peak_share", suffix, out, lambda: plots.peak_share(rows, iterations, where), entries)
        both = run_rows(table, run, None)
        if (both["routing_gradient"] != "full").any():  # only a run that measured final has this figure
            draw("routing_gradient_saving", suffix, out, lambda: plots.routing_gradient_saving(
                routing_gradient_table(both, iterations), where, iterations), entries)
        algorithms = run_rows(table, run, routing_algorithm=None)
        if (algorithms["value"].notna() & (algorithms["routing_algorithm"] != DEFAULT_ROUTING_ALGORITHM)).any():
            compared = routing_algorithm_table(algorithms, iterations, iterative_algorithms(algorithms, run.facts))
            draw("routing_algorithms", suffix, out, lambda: plots.routing_algorithms(
                compared, where, iterations, timed_under_dynamic_alone(algorithms, compared)), entries)


def remove_plots_not_drawn(out: Path, entries: list[tuple[str, str, str]]) -> None:
    """Remove every plot an older report left in ``out`` that this one did not draw: one under a name no
    longer used (roofline.png is now peak_share.png), or for a set of machines the results no longer have
    (phase_times.png of a single machine beside phase_times_<machine>.png of several), so the folder never
    shows a figure of results it was not built from."""
    drawn = {file for file, _, problem in entries if not problem}
    for name in [*PLOT_DESCRIPTIONS, *STALE_PLOTS]:
        for path in [out / f"{name}.png", *out.glob(f"{name}_*.png")]:
            if path.name not in drawn:
                path.unlink(missing_ok=True)


def plots_section(entries: list[tuple[str, str, str]]) -> str:
    lines = []
    for file, description, problem in entries:
        lines.append(f"- `{file}`: {description}: {problem}" if problem else f"- [`{file}`]({file}): {description}")
    for file, description, problem in entries:
        if not problem:
            lines += ["", f"![{description}]({file})"]
    return "\n".join(lines)
