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
import itertools
import datetime as dt
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from harness import plots
from harness.activations import im2col_bytes, kept_activations, parameter_state_bytes
from harness.asv_results import (
    ASV_RESULTS_SUBDIR,
    TIDY_COLUMNS,
    AsvResults,
    Run,
    implementation_facts,
    load_asv,
    machine_names,
)
from harness.results import (
    RESULTS_DIR,
    SCALING_DIR,
    SCALING_KIND,
    TRAINING_DIR,
    ResultsFileError,
    atomic_output,
    read_json,
    read_training_result,
    write_text_atomic,
)
from harness.spec import get_config

TRAINING_SUBDIR = TRAINING_DIR.name
REPORT_SUBDIR = "report"
TIDY_CSV, REPORT_MD, COMPARISON_MD, COMPARISON_CSV = "results_tidy.csv", "report.md", "comparison.md", "comparison.csv"
CHANGE_FACTOR = 1.1  # a ratio outside [1/1.1, 1.1] (asv compare's default factor) beyond the spread is flagged
LOWER_IS_BETTER = {"seconds", "bytes", "relative error"}
HIGHER_IS_BETTER = {"GFLOP/s"}
NA = "n/a"
SUMMARY_METRICS = ["train_step", "forward", "backward", "routing", "routing_backward", "host_memory_peak",
                   "host_memory", "gpu_memory_nvml", "gpu_memory_allocator"]
SPEEDUP_PHASES = ["train_step", "forward", "backward", "inference", "routing", "routing_backward"]


# ------------------------------------------------------------------------------------------------ writing
def save_figure(figure, path: Path) -> Path:
    """Write a figure as PNG atomically and free it."""
    try:
        with atomic_output(path) as temporary:
            figure.savefig(temporary, format="png", dpi=plots.DPI)
    finally:
        plots.plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------ inputs
def json_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def load_training(folder: Path, warnings: list[str]) -> list[tuple[Path, dict]]:
    """Every readable training results file in ``folder``; a malformed one is a warning."""
    records = []
    for path in json_files(folder):
        try:
            records.append((path, read_training_result(path)))
        except ResultsFileError as error:
            warnings.append(f"warning: {error}; file skipped")
    return records


def check_distributed(path: Path, payload: dict) -> None:
    """Raise ResultsFileError unless ``payload`` is a distributed-scaling results file with usable runs."""
    if payload.get("kind") != SCALING_KIND:
        raise ResultsFileError(f"{path}: not a capsbench distributed-scaling file (kind {payload.get('kind')!r})")
    runs = payload.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ResultsFileError(f"{path}: 'runs' must be a non-empty list")
    for index, run in enumerate(runs):
        if not isinstance(run, dict):
            raise ResultsFileError(f"{path}: runs[{index}] is not an object")
        for key in ("world_size", "images_per_second"):
            value = run.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ResultsFileError(f"{path}: runs[{index}].{key} is missing or not a positive number")


def load_distributed(folder: Path, warnings: list[str]) -> list[tuple[Path, dict]]:
    """Every readable distributed-scaling file in ``folder`` (none, silently, if the folder is absent)."""
    records = []
    for path in json_files(folder):
        try:
            payload = read_json(path)
            check_distributed(path, payload)
            records.append((path, payload))
        except ResultsFileError as error:
            warnings.append(f"warning: {error}; file skipped")
    return records


# ------------------------------------------------------------------------------------------------ tables
def run_rows(table: pd.DataFrame, run: Run) -> pd.DataFrame:
    """The tidy rows of one run."""
    return table[(table["machine"] == run.machine) & (table["commit"] == run.commit) & (table["env"] == run.env)]


def step_iterations(rows: pd.DataFrame, config_name: str) -> tuple[int, str]:
    """The routing iterations the summary shows: the network's default if the whole-network benchmarks
    measured it, else the nearest measured count (with a note saying so)."""
    default = get_config(config_name).routing_iterations
    measured = sorted(rows.loc[rows["metric"] == "train_step", "routing_iterations"].dropna().astype(int).unique())
    if not measured or default in measured:
        return default, ""
    nearest = min(measured, key=lambda value: (abs(value - default), value))
    return nearest, f"{default} routing iterations (the default) were not measured; showing {nearest}."


def summary_table(rows: pd.DataFrame, iterations: int) -> pd.DataFrame:
    """Per implementation x batch size: the median phase times (s), images/s, train-step GFLOP/s and % of
    peak, routing share, host and GPU memory (bytes), max relative error.  Every implementation and batch
    size of the run is a row, measured or not."""
    step = rows[rows["implementation"].notna() & rows["batch_size"].notna()]
    step = step[step["routing_iterations"] == iterations]
    index = step[["implementation", "batch_size"]].drop_duplicates().sort_values(["implementation", "batch_size"])
    values = step[step["metric"].isin(SUMMARY_METRICS)].pivot_table(
        index=["implementation", "batch_size"], columns="metric", values="value", aggfunc="first", dropna=False)
    train = step[step["metric"] == "train_step"].set_index(["implementation", "batch_size"])
    frame = index.set_index(["implementation", "batch_size"]).join(values).reindex(columns=SUMMARY_METRICS)
    frame["images_per_second"] = frame.index.get_level_values("batch_size").astype(float) / frame["train_step"]
    frame["train_gflops_per_s"] = train["gflops_per_s"].reindex(frame.index)
    frame["train_pct_of_peak"] = train["pct_of_peak"].reindex(frame.index)
    frame["routing_share"] = frame["routing_backward"] / frame["train_step"]
    errors = rows[rows["metric"] == "max_rel_error"].drop_duplicates("implementation").set_index("implementation")["value"]
    frame["max_rel_error"] = errors.reindex(frame.index.get_level_values("implementation")).to_numpy()
    return frame.reset_index()


def speedup_table(rows: pd.DataFrame, iterations: int) -> pd.DataFrame:
    """Vectorised over looped routing: for every framework and device with both variants, per batch size
    and phase, the looped time divided by the vectorised time (NaN where either is missing)."""
    timed = rows[rows["metric"].isin(SPEEDUP_PHASES) & (rows["routing_iterations"] == iterations)]
    timed = timed[timed["routing"].isin(["vectorised", "looped"])]
    out = []
    for (framework, device), group in timed.groupby(["framework", "device"], sort=True):
        vectorised = sorted(group.loc[group["routing"] == "vectorised", "implementation"].unique())
        looped = sorted(group.loc[group["routing"] == "looped", "implementation"].unique())
        times = group.set_index(["implementation", "metric", "batch_size"])["value"]
        for fast in vectorised:
            for slow in looped:
                pair = f"{framework} ({device})" if len(vectorised) == len(looped) == 1 else f"{fast} / {slow}"
                for (metric, batch), _ in group.groupby(["metric", "batch_size"], sort=True):
                    v, l = times.get((fast, metric, batch), math.nan), times.get((slow, metric, batch), math.nan)
                    out.append({"framework": framework, "device": device, "pair": pair, "vectorised": fast,
                                "looped": slow, "batch_size": batch, "phase": metric, "vectorised_s": v,
                                "looped_s": l, "speedup": l / v})
    return pd.DataFrame(out, columns=["framework", "device", "pair", "vectorised", "looped", "batch_size", "phase",
                                      "vectorised_s", "looped_s", "speedup"])


def parameter_label(row: pd.Series, extra_columns: list[str]) -> str:
    """The parameters of a tidy row in words: ``torch-vectorised, batch 32, 3 it.`` or ``backend=torch``."""
    parts = []
    if isinstance(row.get("implementation"), str):
        parts.append(row["implementation"])
    elif isinstance(row.get("framework"), str):
        parts.append(f"framework={row['framework']}")
    if isinstance(row.get("backend"), str) and not isinstance(row.get("implementation"), str):
        parts.append(f"backend={row['backend']}")
    if pd.notna(row.get("batch_size")):
        parts.append(f"batch {int(row['batch_size'])}")
    if pd.notna(row.get("routing_iterations")):
        parts.append(f"{int(row['routing_iterations'])} it.")
    parts += [f"{column}={row[column]}" for column in extra_columns if pd.notna(row.get(column))]
    return ", ".join(parts)


def keyed(rows: pd.DataFrame, extra_columns: list[str]) -> pd.DataFrame:
    """Rows indexed by (benchmark, parameters) for the comparison."""
    rows = rows.assign(params=[parameter_label(row, extra_columns) for _, row in rows.iterrows()])
    return rows.drop_duplicates(["benchmark", "params"]).set_index(["benchmark", "params"])


def change_of(row: pd.Series) -> str:
    """Whether new differs from old beyond the factor and beyond the measured spread, and which way."""
    old, new = row["old"], row["new"]
    if row["old_status"] == "missing" or row["new_status"] == "missing":
        return "missing in " + ("old" if row["old_status"] == "missing" else "new")
    if not (math.isfinite(old) and math.isfinite(new)):
        return f"{NA} in " + ("both" if not (math.isfinite(old) or math.isfinite(new)) else "old" if not math.isfinite(old) else "new")
    ratio = row["ratio"]
    if not (ratio > CHANGE_FACTOR or ratio < 1 / CHANGE_FACTOR):
        return ""
    ranges = [row[c] for c in ("old_q25", "old_q75", "new_q25", "new_q75")]
    if all(math.isfinite(value) for value in ranges):
        if ranges[0] <= ranges[3] and ranges[2] <= ranges[1]:
            return ""  # the [q25, q75] ranges overlap: within the noise
    up = ratio > 1
    if row["unit"] in LOWER_IS_BETTER:
        return "worse" if up else "better"
    if row["unit"] in HIGHER_IS_BETTER:
        return "better" if up else "worse"
    return "higher" if up else "lower"


def comparison_table(table: pd.DataFrame, old: Run, new: Run) -> pd.DataFrame:
    """Every benchmark x parameters of two runs side by side with ratio new / old and the change flag;
    a combination absent from one run is 'missing' on that side, one with no result is 'n/a'."""
    extra = [column for column in table.columns if column not in TIDY_COLUMNS]
    left, right = keyed(run_rows(table, old), extra), keyed(run_rows(table, new), extra)
    index = left.index.union(right.index, sort=False)
    frame = pd.DataFrame(index=index)
    for side, rows in (("old", left), ("new", right)):
        frame[side] = rows["value"].reindex(index)
        frame[f"{side}_q25"] = rows["q25"].reindex(index)
        frame[f"{side}_q75"] = rows["q75"].reindex(index)
        frame[f"{side}_status"] = rows["status"].reindex(index).fillna("missing")
    for column in ("unit", "implementation", "batch_size", "routing_iterations"):
        frame[column] = right[column].reindex(index).fillna(left[column].reindex(index))
    frame["ratio"] = frame["new"] / frame["old"]
    frame["change"] = [change_of(row) for _, row in frame.iterrows()] if len(frame) else []
    return frame.reset_index()


def training_table(records: list[tuple[Path, dict]]) -> pd.DataFrame:
    """One row per training results file: what was trained, how far, how well, how fast."""
    out = []
    for path, record in records:
        epochs = record.get("epochs") or []
        last = epochs[-1] if epochs else {}
        seconds = sum(epoch.get("train_seconds", 0.0) for epoch in epochs)
        images = sum(epoch.get("images", 0) for epoch in epochs)
        out.append({"file": path.name, "implementation": record["implementation"],
                    "device": record.get("device", "?"), "config": record.get("config_name", "?"),
                    "batch_size": record.get("batch_size"), "epochs": len(epochs),
                    "epochs_requested": record.get("epochs_requested", len(epochs)),
                    "status": record.get("status", "?"), "final_test_accuracy": last.get("test_accuracy", math.nan),
                    "final_mean_loss": last.get("mean_loss", math.nan), "train_seconds": seconds,
                    "images_per_second": images / seconds if seconds else math.nan})
    return pd.DataFrame(out)


def distributed_table(records: list[tuple[Path, dict]]) -> pd.DataFrame:
    """One row per world size per file: the ideal linear throughput from the smallest world size (world
    size 1 when measured) and the scaling efficiency against it; and, since runs on one machine often split
    a fixed set of cores among the ranks, the same against the cores used (ranks x threads per rank)."""
    out = []
    labels = [f"{record.get('implementation', '?')} ({record.get('backend', '?')}, {record.get('device', '?')}"
              + (f", {record['scaling']} scaling" if record.get("scaling") else "") + ")" for _, record in records]
    for (path, record), label in zip(records, labels):
        label = f"{label} [{path.stem}]" if labels.count(label) > 1 else label
        runs = sorted(record["runs"], key=lambda run: run["world_size"])
        base = runs[0]
        for run in runs:
            ideal = base["images_per_second"] * run["world_size"] / base["world_size"]
            on_cpu = record.get("device") == "cpu"  # GPU ranks bring their own device: threads say nothing
            cores = run["world_size"] * run.get("threads_per_rank", math.nan) if on_cpu else math.nan
            base_cores = base["world_size"] * base.get("threads_per_rank", math.nan) if on_cpu else math.nan
            core_ideal = base["images_per_second"] * cores / base_cores
            out.append({"label": label, "implementation": record.get("implementation"),
                        "backend": record.get("backend"), "device": record.get("device"),
                        "config": record.get("config_name"), **{key: run.get(key, math.nan) for key in (
                            "world_size", "threads_per_rank", "per_rank_batch_size", "global_batch_size", "steps",
                            "step_seconds", "images_per_second", "allreduce_seconds", "allreduce_share")},
                        "ideal_images_per_second": ideal, "efficiency": run["images_per_second"] / ideal,
                        "cores": cores, "core_efficiency": run["images_per_second"] / core_ideal})
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------------ formatting
def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def fmt(value, kind: str) -> str:
    """One number as the report shows it; missing values as 'n/a'."""
    if is_missing(value):
        return NA
    if kind == "ms":
        ms = value * 1e3
        return f"{ms:.1f}" if abs(ms) >= 1 else f"{ms:.2g}"
    if kind == "mib":
        return f"{value / plots.MIB:.1f}"
    if kind == "rate":
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "pct100":
        return f"{value:.1f}%"
    if kind == "times":
        return f"{value:.2f}×"
    if kind == "sci":
        return f"{value:.1e}"
    if kind == "int":
        return f"{int(value)}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def fmt_unit(value, unit: str) -> str:
    """A value of a tidy row in its own unit: seconds as ms, bytes as MiB."""
    if is_missing(value):
        return NA
    if unit == "seconds":
        return f"{fmt(value, 'ms')} ms"
    if unit == "bytes":
        return f"{fmt(value, 'mib')} MiB"
    if unit == "relative error":
        return f"{value:.2e}"
    return f"{value:.4g} {unit}"


def markdown_table(frame: pd.DataFrame, text_columns: int = 1, left: set[str] = frozenset()) -> str:
    """A GitHub Markdown table of already formatted cells; the first ``text_columns`` and those named in
    ``left`` left-aligned, the rest (numbers) right-aligned."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" if i < text_columns or name in left else "---:"
                             for i, name in enumerate(frame.columns)) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def formatted(frame: pd.DataFrame, columns: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """``frame`` with the ``columns`` (name -> (heading, format kind)) formatted, in that order."""
    return pd.DataFrame({heading: [fmt(value, kind) for value in frame[name]] for name, (heading, kind) in columns.items()})


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
        lines += [f"- threads: {threads or '?'}" + (f"; environment {facts['thread_env']}" if facts.get("thread_env") else ""),
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
               "gpu_memory_nvml": ("GPU NVML MiB", "mib"), "gpu_memory_allocator": ("GPU allocator MiB", "mib"),
               "max_rel_error": ("max rel error", "sci")}
    missing = sorted(frame.loc[frame[SUMMARY_METRICS + ["max_rel_error"]].isna().all(axis=1), "implementation"].unique())
    text = [f"### {run.label}", "", f"Median times per call at {iterations} routing iterations. images/s = batch / "
            "train-step time; routing share = routing forward + backward alone / train step; GPU NVML = device "
            "memory in use (all processes, CUDA context included), GPU allocator = the framework allocator's peak; "
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


def memory_table(rows: pd.DataFrame, iterations: int, config_name: str) -> pd.DataFrame:
    """Per CPU implementation x batch size: host memory measured around a training step beside the
    analytic figure of :mod:`harness.activations` (bytes)."""
    step = rows[rows["implementation"].notna() & (rows["routing_iterations"] == iterations)
                & (rows["device"] == "cpu")]
    measured = step[step["metric"].isin(["host_memory", "host_memory_before_model"])].pivot_table(
        index=["implementation", "batch_size"], columns="metric", values="value", aggfunc="first")
    if measured.empty or not {"host_memory", "host_memory_before_model"} <= set(measured.columns):
        return pd.DataFrame()
    config = get_config(config_name).replace(routing_iterations=iterations)
    frame = measured.reset_index()
    frame["model_and_step"] = frame["host_memory"] - frame["host_memory_before_model"]
    frame["parameter_state"] = parameter_state_bytes(config)
    frame["activations"] = [sum(kept_activations(config, int(batch)).values()) for batch in frame["batch_size"]]
    frame["expected"] = frame["parameter_state"] + frame["activations"]
    keeps_patches = frame["implementation"].map(lambda name: implementation_facts(name)["framework"]) == "numpy"
    frame["im2col"] = [im2col_bytes(config, int(batch)) if keeps else 0
                       for batch, keeps in zip(frame["batch_size"], keeps_patches)]
    frame["ratio"] = frame["model_and_step"] / (frame["expected"] + frame["im2col"])
    return frame


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
            f"{flagged} change(s) flagged; {int(both_na.sum())} combination(s) without a result in either run not listed."]
    for side in ("old", "new"):
        if only[side]:
            text.append(f"\nOnly in the {side} run (shown as missing in the other): {', '.join(only[side])}.")
    cells = pd.DataFrame({
        "benchmark": shown["benchmark"], "parameters": shown["params"],
        "old": [fmt_unit(v, u) if s != "missing" else "missing" for v, u, s in zip(shown["old"], shown["unit"], shown["old_status"])],
        "new": [fmt_unit(v, u) if s != "missing" else "missing" for v, u, s in zip(shown["new"], shown["unit"], shown["new_status"])],
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
    columns = {"label": ("run", "str"), "world_size": ("world size", "int"), "threads_per_rank": ("threads/rank", "int"),
               "per_rank_batch_size": ("batch/rank", "int"), "global_batch_size": ("global batch", "int"),
               "step_seconds": ("step ms", "ms"), "images_per_second": ("images/s", "rate"),
               "efficiency": ("scaling efficiency", "pct"), "allreduce_seconds": ("allreduce ms", "ms"),
               "allreduce_share": ("allreduce share", "pct")}
    columns["cores"] = ("cores used", "int")
    columns["core_efficiency"] = ("efficiency per core", "pct")
    text = ("Scaling efficiency = images/s / (images/s at the smallest world size × world size / that size); "
            "efficiency per core does the same with the cores used (ranks × threads per rank) instead of the "
            "world size.")
    if (frame["cores"].notna() & ~np.isclose(frame["efficiency"], frame["core_efficiency"])).any():
        text += (" Where the ranks share a fixed number of cores (cores used does not grow with the world size), "
                 "linear scaling with the world size is out of reach by construction: read the efficiency per core.")
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
    parser.add_argument("--results", type=Path, default=RESULTS_DIR,
                        help="folder holding asv/, asv-facts/, training/ and distributed/ (default: results)")
    parser.add_argument("--out", type=Path, help="output folder (default: <results>/report)")
    parser.add_argument("--machine", metavar="NAME", help="only the asv results of this machine")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root, out = args.results, args.out or args.results / REPORT_SUBDIR
    if args.machine and args.machine not in machine_names(root / ASV_RESULTS_SUBDIR):
        known = ", ".join(machine_names(root / ASV_RESULTS_SUBDIR)) or "none"
        print(f"error: no asv results for machine {args.machine!r} under {root / ASV_RESULTS_SUBDIR} (machines there: {known})",
              file=sys.stderr)
        return 1
    asv = load_asv(root, args.machine)
    warnings = list(asv.warnings)
    training = load_training(root / TRAINING_SUBDIR, warnings)
    distributed = load_distributed(root / SCALING_DIR.name, warnings)
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
