"""The report's tables as pandas frames, built from the tidy benchmark table and the results records, and
testable without rendering anything; :mod:`harness.report` turns them into Markdown, :mod:`harness.plots`
into figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.activations import im2col_bytes, kept_activations, parameter_state_bytes
from harness.asv_results import TIDY_COLUMNS, Run
from harness.scaling import compute_units, scaling_efficiency
from harness.spec import get_config

CHANGE_FACTOR = 1.1  # a ratio outside [1/1.1, 1.1] (asv compare's default factor) beyond the spread is flagged
LOWER_IS_BETTER = {"seconds", "bytes", "relative error"}
HIGHER_IS_BETTER = {"GFLOP/s"}
NA = "n/a"
SUMMARY_METRICS = ["train_step", "forward", "backward", "routing", "routing_backward", "host_memory_peak",
                   "host_memory", "gpu_memory_nvml", "gpu_memory_allocator_live", "gpu_memory_allocator_reserved"]
SPEEDUP_PHASES = ["train_step", "forward", "backward", "inference", "routing", "routing_backward"]


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
    errors = rows[rows["metric"] == "max_rel_error"].drop_duplicates("implementation")
    errors = errors.set_index("implementation")["value"]
    frame["max_rel_error"] = errors.reindex(frame.index.get_level_values("implementation")).to_numpy()
    return frame.reset_index()


def speedup_table(rows: pd.DataFrame, iterations: int) -> pd.DataFrame:
    """Vectorised over looped routing: for every framework and device with both variants, per batch size
    and phase, the looped time divided by the vectorised time (NaN where either is missing)."""
    timed = rows[rows["metric"].isin(SPEEDUP_PHASES) & (rows["routing_iterations"] == iterations)]
    timed = timed[timed["routing_variant"].isin(["vectorised", "looped"])]
    out = []
    for (framework, device), group in timed.groupby(["framework", "device"], sort=True):
        vectorised = sorted(group.loc[group["routing_variant"] == "vectorised", "implementation"].unique())
        looped = sorted(group.loc[group["routing_variant"] == "looped", "implementation"].unique())
        times = group.set_index(["implementation", "metric", "batch_size"])["value"]
        for fast in vectorised:
            for slow in looped:
                pair = f"{framework} ({device})" if len(vectorised) == len(looped) == 1 else f"{fast} / {slow}"
                for (metric, batch), _ in group.groupby(["metric", "batch_size"], sort=True):
                    fast_s = times.get((fast, metric, batch), math.nan)
                    slow_s = times.get((slow, metric, batch), math.nan)
                    out.append({"framework": framework, "device": device, "pair": pair, "vectorised": fast,
                                "looped": slow, "batch_size": batch, "phase": metric, "vectorised_s": fast_s,
                                "looped_s": slow_s, "speedup": slow_s / fast_s})
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
        side = "both" if not (math.isfinite(old) or math.isfinite(new)) else "old" if not math.isfinite(old) else "new"
        return f"{NA} in {side}"
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
    """One row per world size per file: the compute used (ranks x threads per rank on the CPU, ranks on
    GPUs), the ideal images/s (linear in the compute from the smallest world size) and the scaling
    efficiency, :func:`harness.scaling.scaling_efficiency`, the figure the scaling command prints."""
    out = []
    labels = [f"{record.get('implementation', '?')} ({record.get('backend', '?')}, {record.get('device', '?')}"
              + (f", {record['scaling']} scaling" if record.get("scaling") else "") + ")" for _, record in records]
    for (path, record), label in zip(records, labels):
        label = f"{label} [{path.stem}]" if labels.count(label) > 1 else label
        device = record.get("device", "cpu")
        runs = sorted(record["runs"], key=lambda run: run["world_size"])
        base = runs[0]
        for run in runs:
            efficiency = scaling_efficiency(run, base, device)
            out.append({"label": label, "implementation": record.get("implementation"),
                        "backend": record.get("backend"), "device": device,
                        "config": record.get("config_name"), **{key: run.get(key, math.nan) for key in (
                            "world_size", "threads_per_rank", "per_rank_batch_size", "global_batch_size", "steps",
                            "step_seconds", "images_per_second", "allreduce_seconds", "allreduce_share")},
                        "compute_units": compute_units(run, device),
                        "ideal_images_per_second": run["images_per_second"] / efficiency,
                        "efficiency": efficiency})
    frame = pd.DataFrame(out)
    for column in ("allreduce_seconds", "allreduce_share"):  # None (one rank: nothing to all-reduce) -> NaN
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


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
    frameworks = step.drop_duplicates("implementation").set_index("implementation")["framework"]
    frame = measured.reset_index()
    frame["model_and_step"] = frame["host_memory"] - frame["host_memory_before_model"]
    frame["parameter_state"] = parameter_state_bytes(config)
    frame["activations"] = [sum(kept_activations(config, int(batch)).values()) for batch in frame["batch_size"]]
    frame["expected"] = frame["parameter_state"] + frame["activations"]
    keeps_patches = frame["implementation"].map(frameworks) == "numpy"
    frame["im2col"] = [im2col_bytes(config, int(batch)) if keeps else 0
                       for batch, keeps in zip(frame["batch_size"], keeps_patches)]
    frame["ratio"] = frame["model_and_step"] / (frame["expected"] + frame["im2col"])
    return frame
