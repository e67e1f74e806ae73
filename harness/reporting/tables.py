"""The report's tables as pandas frames, built from the tidy benchmark table and the results records, and
testable without rendering anything; :mod:`harness.report` turns them into Markdown, :mod:`harness.reporting.plots`
into figures.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pandas as pd

from harness.measure.expected_memory import im2col_bytes, kept_activations, parameter_state_bytes
from harness.measure.scaling import compute_units, efficiency_caveat, scaling_efficiency
from harness.reporting.formatting import NA
from harness.results import PROFILE_PHASES, Profile
from harness.spec import get_config
from harness.suite.asv_results import (
    DEFAULT_ROUTING_ALGORITHM,
    DEFAULT_ROUTING_GRADIENT,
    NOT_APPLICABLE,
    ROUTING_ALGORITHM_COLUMN,
    ROUTING_GRADIENT_COLUMN,
    TIDY_COLUMNS,
    Run,
)

CHANGE_FACTOR = 1.1  # a ratio outside [1/1.1, 1.1] (asv compare's default factor) beyond the spread is flagged
LOWER_IS_BETTER = {"seconds", "bytes", "relative error"}
HIGHER_IS_BETTER = {"GFLOP/s", "images/s", "images per second"}  # and any other rate: a unit ending in "/s"
TOO_FEW = "too few samples"  # the change of a ratio beyond the factor when a side rests on one sample
FLAGS = ("worse", "better", "higher", "lower")
TIMINGS = ["train_step", "forward", "backward", "routing", "routing_backward"]
SUMMARY_METRICS = TIMINGS + ["host_memory_peak", "host_memory", "gpu_memory_nvml", "gpu_memory_allocator_live",
                             "gpu_memory_allocator_reserved", "gpu_memory_allocator_mixed"]
SPEEDUP_PHASES = ["train_step", "forward", "backward", "inference", "routing", "routing_backward"]
MNIST_TRAIN_IMAGES, MNIST_TEST_IMAGES = 60_000, 10_000  # what a training record's limit None means


def run_rows(table: pd.DataFrame, run: Run, routing_gradient: str | None = DEFAULT_ROUTING_GRADIENT,
             routing_algorithm: str | None = DEFAULT_ROUTING_ALGORITHM) -> pd.DataFrame:
    """The tidy rows of one run, at one routing gradient (default ``full``, what every table but the
    routing-gradient one shows; None: all) and one routing algorithm (default ``dynamic``, what every table
    but the routing-algorithm one shows; None: all); never the cells the suite does not measure under their
    routing algorithm (status :data:`~harness.suite.asv_results.NOT_APPLICABLE`)."""
    rows = table[(table["machine"] == run.machine) & (table["commit"] == run.commit) & (table["env"] == run.env)]
    rows = rows[rows["status"] != NOT_APPLICABLE]
    if routing_gradient is not None and ROUTING_GRADIENT_COLUMN in rows:
        rows = rows[rows[ROUTING_GRADIENT_COLUMN] == routing_gradient]
    if routing_algorithm is not None and ROUTING_ALGORITHM_COLUMN in rows:
        rows = rows[rows[ROUTING_ALGORITHM_COLUMN] == routing_algorithm]
    return rows


GRADIENT_PHASES = ["backward", "train_step", "routing_backward"]  # the timed work the routing gradient changes


def routing_gradient_table(rows: pd.DataFrame, iterations: int) -> pd.DataFrame:
    """What the routing gradient ``final`` saves over ``full``, per implementation x batch size measured at
    both: for each of :data:`GRADIENT_PHASES` the two times (s) with their q25, q75 and samples
    (``backward_full``, ``backward_full_q25``, ..., ``backward_final_samples``) and the saving
    ``backward_saving`` = 1 - final / full (0.25: final takes a quarter less time); and the routing share
    of the train step (routing forward + backward over the train step) under each, ``routing_share_full``
    and ``routing_share_final``.  ``rows`` are one run's, at every routing gradient; ``iterations`` the
    routing iterations of the whole-network phases (routing alone is taken at the same count)."""
    keys = ["implementation", "batch_size"]
    timed = rows[rows["implementation"].notna() & rows["batch_size"].notna() & rows["metric"].isin(GRADIENT_PHASES)
                 & (rows["routing_iterations"] == iterations)]
    columns = [f"{phase}_{gradient}{suffix}" for phase in GRADIENT_PHASES for gradient in ("full", "final")
               for suffix in ("", "_q25", "_q75", "_samples")]
    columns += [f"{phase}_saving" for phase in GRADIENT_PHASES] + ["routing_share_full", "routing_share_final"]
    if timed.empty:
        return pd.DataFrame(columns=keys + columns)
    frame = None
    for gradient in ("full", "final"):
        chosen = timed[timed[ROUTING_GRADIENT_COLUMN] == gradient]
        for value, suffix in (("value", ""), ("q25", "_q25"), ("q75", "_q75"), ("samples", "_samples")):
            wide = chosen.pivot_table(index=keys, columns="metric", values=value, aggfunc="first", dropna=False)
            wide = wide.reindex(columns=GRADIENT_PHASES).rename(columns=lambda phase: f"{phase}_{gradient}{suffix}")
            frame = wide if frame is None else frame.join(wide, how="outer")
    measured = frame[[f"{phase}_final" for phase in GRADIENT_PHASES]].notna().any(axis=1)
    frame = frame[measured & frame[[f"{phase}_full" for phase in GRADIENT_PHASES]].notna().any(axis=1)]
    for phase in GRADIENT_PHASES:
        frame[f"{phase}_saving"] = 1.0 - frame[f"{phase}_final"] / frame[f"{phase}_full"]
    for gradient in ("full", "final"):
        frame[f"routing_share_{gradient}"] = frame[f"routing_backward_{gradient}"] / frame[f"train_step_{gradient}"]
    return frame.reset_index().sort_values(keys, kind="stable").reset_index(drop=True)


ALGORITHM_TIMINGS = ["train_step", "routing_backward"]  # the times the routing-algorithm table sets side by side
ALGORITHM_MEMORY = ["host_model_and_step", "gpu_memory_allocator_live"]  # and the memory (bytes)
ALGORITHM_FIGURES = ALGORITHM_TIMINGS + ["routing_share"] + ALGORITHM_MEMORY  # each with a ratio to dynamic


def routing_algorithms_of(rows: pd.DataFrame) -> list[str]:
    """The routing algorithms of ``rows`` with a result: dynamic first (the baseline of every ratio), then
    the others by name."""
    measured = set(rows.loc[rows["value"].notna(), ROUTING_ALGORITHM_COLUMN].dropna()) \
        if ROUTING_ALGORITHM_COLUMN in rows else set()
    return [DEFAULT_ROUTING_ALGORITHM] + sorted(measured - {DEFAULT_ROUTING_ALGORITHM})


def routing_algorithm_table(rows: pd.DataFrame, iterations: int, iterative: dict[str, bool] | None = None
                            ) -> pd.DataFrame:
    """Each routing algorithm beside dynamic routing, per implementation x batch size measured under one
    other than dynamic: for each algorithm A (:func:`routing_algorithms_of`) the train step and routing
    forward + backward alone (s) with their q25, q75 and samples (``train_step_dynamic``,
    ``train_step_dynamic_q25``, ..., ``routing_backward_self-attention_samples``), the routing share
    (``routing_share_A`` = routing forward + backward / train step), the host memory the model and a step take
    (``host_model_and_step_A``: resident memory at the step's peak minus before the model was built, bytes)
    and the GPU allocator's live peak (``gpu_memory_allocator_live_A``); and for each A but dynamic the ratio
    A / dynamic of each of those (``train_step_ratio_A``, ...), with, for the times, the ratio's range over
    the two interquartile ranges (``train_step_ratio_A_low`` = q25(A) / q75(dynamic), ``..._high`` =
    q75(A) / q25(dynamic); NaN where a side has no spread).  ``rows`` are one run's at one routing gradient
    and every algorithm; dynamic (and any iterative algorithm) is taken at ``iterations``, an algorithm that
    ``iterative`` says is not iterative at the one count the suite measured it."""
    keys = ["implementation", "batch_size"]
    algorithms = routing_algorithms_of(rows)
    columns = [f"{metric}_{algorithm}{suffix}" for metric in ALGORITHM_TIMINGS for algorithm in algorithms
               for suffix in ("", "_q25", "_q75", "_samples")]
    columns += [f"{metric}_{algorithm}" for metric in ["routing_share"] + ALGORITHM_MEMORY for algorithm in algorithms]
    columns += [f"{metric}_ratio_{algorithm}{suffix}" for algorithm in algorithms[1:] for metric in ALGORITHM_FIGURES
                for suffix in (("", "_low", "_high") if metric in ALGORITHM_TIMINGS else ("",))]
    if len(algorithms) == 1:
        return pd.DataFrame(columns=keys + columns)
    named = rows[rows["implementation"].notna() & rows["batch_size"].notna()]
    metrics = ALGORITHM_TIMINGS + ["host_memory", "host_memory_before_model", "gpu_memory_allocator_live"]
    frame = named[["implementation", "batch_size"]].drop_duplicates().set_index(keys)
    for algorithm in algorithms:
        chosen = named[(named[ROUTING_ALGORITHM_COLUMN] == algorithm) & named["metric"].isin(metrics)]
        if (iterative or {}).get(algorithm, True):
            chosen = chosen[chosen["routing_iterations"] == iterations]
        chosen = chosen.sort_values("value", na_position="last", kind="stable")  # the measured cell first
        for value, suffix in (("value", ""), ("q25", "_q25"), ("q75", "_q75"), ("samples", "_samples")):
            wide = chosen.pivot_table(index=keys, columns="metric", values=value, aggfunc="first", dropna=False)
            wide = wide.reindex(index=frame.index, columns=metrics)
            if not suffix:
                frame[f"host_model_and_step_{algorithm}"] = wide["host_memory"] - wide["host_memory_before_model"]
                frame[f"gpu_memory_allocator_live_{algorithm}"] = wide["gpu_memory_allocator_live"]
            for metric in ALGORITHM_TIMINGS:
                frame[f"{metric}_{algorithm}{suffix}"] = wide[metric]
        frame[f"routing_share_{algorithm}"] = frame[f"routing_backward_{algorithm}"] / frame[f"train_step_{algorithm}"]
    others = [f"{metric}_{algorithm}" for algorithm in algorithms[1:] for metric in ALGORITHM_FIGURES]
    frame = frame[frame[others].notna().any(axis=1)].copy()
    base = DEFAULT_ROUTING_ALGORITHM
    for algorithm in algorithms[1:]:
        for metric in ALGORITHM_FIGURES:
            frame[f"{metric}_ratio_{algorithm}"] = frame[f"{metric}_{algorithm}"] / frame[f"{metric}_{base}"]
        for metric in ALGORITHM_TIMINGS:
            own, baseline = f"{metric}_{algorithm}", f"{metric}_{base}"
            frame[f"{metric}_ratio_{algorithm}_low"] = frame[f"{own}_q25"] / frame[f"{baseline}_q75"]
            frame[f"{metric}_ratio_{algorithm}_high"] = frame[f"{own}_q75"] / frame[f"{baseline}_q25"]
    frame = frame.reindex(columns=columns)
    return frame.reset_index().sort_values(keys, kind="stable").reset_index(drop=True)


def table_algorithms(frame: pd.DataFrame) -> list[str]:
    """The routing algorithms of a :func:`routing_algorithm_table`: dynamic first, then those with a ratio."""
    return [DEFAULT_ROUTING_ALGORITHM] + [column[len("train_step_ratio_"):] for column in frame.columns
                                         if column.startswith("train_step_ratio_")
                                         and not column.endswith(("_low", "_high"))]


def timed_under_dynamic_alone(rows: pd.DataFrame, frame: pd.DataFrame) -> dict[str, list[str]]:
    """Per routing algorithm of ``frame`` (:func:`routing_algorithm_table`) but dynamic, the implementations of
    ``rows`` timed under dynamic routing (train step or routing forward + backward) and under that algorithm
    nowhere (skipped: the implementation does not compute it, or the run left it out)."""
    timed = rows[rows["value"].notna() & rows["metric"].isin(ALGORITHM_TIMINGS) & rows["implementation"].notna()]
    dynamic = set(timed.loc[timed[ROUTING_ALGORITHM_COLUMN] == DEFAULT_ROUTING_ALGORITHM, "implementation"])
    return {algorithm: sorted(dynamic - set(timed.loc[timed[ROUTING_ALGORITHM_COLUMN] == algorithm, "implementation"]))
            for algorithm in table_algorithms(frame)[1:]}


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
    """Per implementation x batch size: the phase times (s) with their q25, q75 and samples
    (``train_step_q25``, ...), images/s, train-step GFLOP/s and % of peak, routing share, host and GPU
    memory (bytes), max relative error.  Every implementation and batch size of the run is a row, measured
    or not."""
    step = rows[rows["implementation"].notna() & rows["batch_size"].notna()]
    step = step[step["routing_iterations"] == iterations]
    index = step[["implementation", "batch_size"]].drop_duplicates().sort_values(["implementation", "batch_size"])
    keys = ["implementation", "batch_size"]
    chosen = step[step["metric"].isin(SUMMARY_METRICS)]
    frame = index.set_index(keys)
    for column, suffix, metrics in (("value", "", SUMMARY_METRICS), ("q25", "_q25", TIMINGS),
                                    ("q75", "_q75", TIMINGS), ("samples", "_samples", TIMINGS)):
        wide = chosen.pivot_table(index=keys, columns="metric", values=column, aggfunc="first", dropna=False)
        wide = wide.reindex(columns=metrics)
        frame = frame.join(wide.rename(columns=lambda metric: f"{metric}{suffix}"))
    train = step[step["metric"] == "train_step"].drop_duplicates(keys).set_index(keys)
    frame["images_per_second"] = frame.index.get_level_values("batch_size").astype(float) / frame["train_step"]
    frame["train_gflops_per_s"] = train["gflops_per_s"].reindex(frame.index)
    frame["train_pct_of_peak"] = train["pct_of_peak"].reindex(frame.index)
    frame["routing_share"] = frame["routing_backward"] / frame["train_step"]
    errors = rows[rows["metric"] == "max_rel_error"].drop_duplicates("implementation")
    errors = errors.set_index("implementation")["value"]
    frame["max_rel_error"] = errors.reindex(frame.index.get_level_values("implementation")).to_numpy()
    return frame.reset_index()


def not_run(rows: pd.DataFrame, facts: dict | None = None) -> dict[str, str]:
    """The implementations of a run with no result at all (every metric n/a), each with the reason in words:
    a CUDA implementation on a machine whose facts say it has no GPU is unavailable; one the facts say the
    suite's settings left out (``left_out``), with why; otherwise it was skipped (unavailable, out of
    memory, or left out) or failed in every benchmark."""
    gpu = (facts or {}).get("gpu") or {}
    left_out = (facts or {}).get("left_out") or {}
    named = rows[rows["implementation"].notna()]
    out = {}
    for name, group in named.groupby("implementation", sort=True):
        if group["value"].notna().any():
            continue
        if (group["device"] == "cuda").all() and gpu and not gpu.get("available"):
            out[name] = "unavailable: no CUDA GPU on this machine"
        elif name in left_out and not (group["status"] == "failed").any():
            out[name] = f"skipped in every benchmark: it {left_out[name]}"
        elif (group["status"] == "failed").all():
            out[name] = "failed in every benchmark"
        elif (group["status"] == "failed").any():
            out[name] = "skipped or failed in every benchmark"
        else:
            out[name] = "skipped in every benchmark: unavailable here or left out"
    return out


def not_run_line(reasons: dict[str, str], what: str = "Not run here") -> str:
    """One line for everything that did not run: "Not run here: a, b (reason); c (other reason)."."""
    if not reasons:
        return ""
    groups: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        groups.setdefault(reason, []).append(name)
    return f"{what}: " + "; ".join(f"{', '.join(sorted(names))} ({reason})"
                                   for reason, names in sorted(groups.items())) + "."


def looped_partners(fast: str, vectorised: list[str], looped: list[str]) -> list[str]:
    """The looped implementations a vectorised one is compared with: its twin by name (torch-vectorised-compiled
    with torch-looped-compiled, not with the eager torch-looped), else the looped ones that are no other's
    twin, else every looped one (torch-fused, which has no looped variant of its own)."""
    twin = fast.replace("vectorised", "looped")
    if twin != fast and twin in looped:
        return [twin]
    unclaimed = [slow for slow in looped if slow.replace("looped", "vectorised") not in vectorised]
    return unclaimed or looped


def speedup_table(rows: pd.DataFrame, iterations: int) -> pd.DataFrame:
    """Vectorised over looped routing: for every framework and device with both variants, per batch size
    and phase, the looped time divided by the vectorised time (NaN where either is missing); each vectorised
    implementation against its looped partners (:func:`looped_partners`)."""
    timed = rows[rows["metric"].isin(SPEEDUP_PHASES) & (rows["routing_iterations"] == iterations)]
    timed = timed[timed["routing_variant"].isin(["vectorised", "looped"])]
    out = []
    for (framework, device), group in timed.groupby(["framework", "device"], sort=True):
        vectorised = sorted(group.loc[group["routing_variant"] == "vectorised", "implementation"].unique())
        looped = sorted(group.loc[group["routing_variant"] == "looped", "implementation"].unique())
        times = group.set_index(["implementation", "metric", "batch_size"])["value"]
        for fast in vectorised:
            for slow in looped_partners(fast, vectorised, looped):
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
    if row.get(ROUTING_GRADIENT_COLUMN, DEFAULT_ROUTING_GRADIENT) not in (DEFAULT_ROUTING_GRADIENT, None):
        parts.append(f"{row[ROUTING_GRADIENT_COLUMN]} gradient")  # full, the default, goes unsaid
    if row.get(ROUTING_ALGORITHM_COLUMN, DEFAULT_ROUTING_ALGORITHM) not in (DEFAULT_ROUTING_ALGORITHM, None):
        parts.append(f"{row[ROUTING_ALGORITHM_COLUMN]} routing")  # dynamic, the default (and older runs'), unsaid
    parts += [f"{column}={row[column]}" for column in extra_columns
              if column not in (ROUTING_GRADIENT_COLUMN, ROUTING_ALGORITHM_COLUMN) and pd.notna(row.get(column))]
    return ", ".join(parts)


def keyed(rows: pd.DataFrame, extra_columns: list[str]) -> pd.DataFrame:
    """Rows indexed by (benchmark, parameters) for the comparison."""
    rows = rows.assign(params=[parameter_label(row, extra_columns) for _, row in rows.iterrows()])
    return rows.drop_duplicates(["benchmark", "params"]).set_index(["benchmark", "params"])


def better_direction(unit) -> int:
    """-1 where lower is better (seconds, bytes, relative error), +1 where higher is (GFLOP/s, images/s and
    any other rate), 0 where neither is."""
    if unit in LOWER_IS_BETTER:
        return -1
    if unit in HIGHER_IS_BETTER or (isinstance(unit, str) and unit.endswith("/s")):
        return 1
    return 0


def single_sample(samples) -> bool:
    return isinstance(samples, (int, float)) and samples == 1


def change_of(row: pd.Series) -> str:
    """Whether new differs from old beyond the factor and beyond the measured spread, and which way.

    A ratio inside [1/1.1, 1.1] is no change.  Beyond it: where either side rests on one sample nothing can
    be judged (:data:`TOO_FEW`); where both sides record their interquartile range and the ranges overlap
    it is within the noise; otherwise "worse" / "better" by the unit's direction (or "higher" / "lower"
    where neither is better).  A figure with no statistics at all (a ``track_`` benchmark) is judged by the
    ratio alone."""
    old, new = row["old"], row["new"]
    if row["old_status"] == "missing" or row["new_status"] == "missing":
        return "missing in " + ("old" if row["old_status"] == "missing" else "new")
    if not (math.isfinite(old) and math.isfinite(new)):
        side = "both" if not (math.isfinite(old) or math.isfinite(new)) else "old" if not math.isfinite(old) else "new"
        return f"{NA} in {side}"
    ratio = row["ratio"]
    if not (ratio > CHANGE_FACTOR or ratio < 1 / CHANGE_FACTOR):
        return ""
    old_n, new_n = row.get("old_samples", math.nan), row.get("new_samples", math.nan)
    if single_sample(old_n) or single_sample(new_n):
        counts = [f"{side} {int(n)}" for side, n in (("old", old_n), ("new", new_n)) if pd.notna(n)]
        return f"{TOO_FEW} ({', '.join(counts)})"
    ranges = [row[c] for c in ("old_q25", "old_q75", "new_q25", "new_q75")]
    if all(math.isfinite(value) for value in ranges):
        if ranges[0] <= ranges[3] and ranges[2] <= ranges[1]:
            return ""  # the [q25, q75] ranges overlap: within the noise
    up = ratio > 1
    direction = better_direction(row["unit"])
    if direction < 0:
        return "worse" if up else "better"
    if direction > 0:
        return "better" if up else "worse"
    return "higher" if up else "lower"


def comparison_table(table: pd.DataFrame, old: Run, new: Run) -> pd.DataFrame:
    """Every benchmark x parameters of two runs side by side with ratio new / old and the change flag;
    a combination absent from one run is 'missing' on that side, one with no result is 'n/a'."""
    extra = [column for column in table.columns if column not in TIDY_COLUMNS]
    left, right = keyed(run_rows(table, old, None, None), extra), keyed(run_rows(table, new, None, None), extra)
    index = left.index.union(right.index, sort=False)
    frame = pd.DataFrame(index=index)
    for side, rows in (("old", left), ("new", right)):
        frame[side] = rows["value"].reindex(index)
        frame[f"{side}_q25"] = rows["q25"].reindex(index)
        frame[f"{side}_q75"] = rows["q75"].reindex(index)
        frame[f"{side}_samples"] = rows["samples"].reindex(index) if "samples" in rows else math.nan
        frame[f"{side}_status"] = rows["status"].reindex(index).fillna("missing")
    for column in ("unit", "implementation", "batch_size", "routing_iterations"):
        frame[column] = right[column].reindex(index).fillna(left[column].reindex(index))
    frame["ratio"] = frame["new"] / frame["old"]
    frame["change"] = [change_of(row) for _, row in frame.iterrows()] if len(frame) else []
    return frame.reset_index()


def training_images(record: dict) -> tuple[int, int]:
    """(training images, test images) of a run: recorded by newer runs; for older ones the limits, where
    no limit (None) means all of MNIST (60,000 and 10,000)."""
    train = record.get("train_images")
    test = record.get("test_images")
    if not isinstance(train, int):
        limit = record.get("limit")
        train = min(limit, MNIST_TRAIN_IMAGES) if isinstance(limit, int) else MNIST_TRAIN_IMAGES
    if not isinstance(test, int):
        limit = record.get("test_limit")
        test = min(limit, MNIST_TEST_IMAGES) if isinstance(limit, int) else MNIST_TEST_IMAGES
    return train, test


def training_ranks(record: dict) -> int:
    """Processes that trained together: ``ranks`` in newer records, the data-parallel world size or 1 in
    older ones."""
    ranks = record.get("ranks")
    if isinstance(ranks, int) and ranks > 0:
        return ranks
    distributed = record.get("distributed")
    world = distributed.get("world_size") if isinstance(distributed, dict) else None
    return world if isinstance(world, int) and world > 0 else 1


def epoch_total(epochs: list[dict], key: str) -> float:
    """The sum of an epoch time over the epochs; NaN if an epoch does not record it (older records)."""
    values = [epoch.get(key) for epoch in epochs]
    if not values or any(not isinstance(value, (int, float)) for value in values):
        return math.nan
    return float(sum(values))


def record_routing_algorithm(record: dict) -> str:
    """The routing algorithm a training record trained: its own field, else its config's, else ``dynamic``
    (records from before the setting, the only algorithm then)."""
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    return str(record.get("routing_algorithm") or config.get("routing_algorithm") or "dynamic")


def training_table(records: list[tuple[Path, dict]]) -> pd.DataFrame:
    """One row per training results file: what was trained (with its routing algorithm and routing gradient:
    ``dynamic`` and ``full`` for a record from before the settings, the only behaviour then), on how many
    images and ranks, how far, how well (best and final test accuracy), how fast (training, evaluation and
    wall time over all epochs)."""
    out = []
    for path, record in records:
        epochs = record.get("epochs") or []
        last = epochs[-1] if epochs else {}
        accuracies = [epoch["test_accuracy"] for epoch in epochs if isinstance(epoch.get("test_accuracy"), float)]
        best = record.get("best_test_accuracy")
        final = record.get("final_test_accuracy")
        seconds = sum(epoch.get("train_seconds", 0.0) for epoch in epochs)
        images = sum(epoch.get("images", 0) for epoch in epochs)
        schedule = record.get("schedule")
        train_images, test_images = training_images(record)
        out.append({"file": path.name, "implementation": record["implementation"],
                    "routing_algorithm": record_routing_algorithm(record),
                    "routing_gradient": record.get("routing_gradient", DEFAULT_ROUTING_GRADIENT),
                    "device": record.get("device", "?"), "config": record.get("config_name", "?"),
                    "batch_size": record.get("batch_size"), "ranks": training_ranks(record),
                    "train_images": train_images, "test_images": test_images,
                    "schedule": schedule.get("name", "?") if isinstance(schedule, dict) else schedule or NA,
                    "epochs": len(epochs), "epochs_requested": record.get("epochs_requested", len(epochs)),
                    "status": training_status(record),
                    "best_test_accuracy": best if isinstance(best, (int, float)) else
                    max(accuracies) if accuracies else math.nan,
                    "final_test_accuracy": final if isinstance(final, (int, float)) else
                    last.get("test_accuracy", math.nan),
                    "final_mean_loss": last.get("mean_loss", math.nan), "train_seconds": seconds,
                    "eval_seconds": epoch_total(epochs, "eval_seconds"),
                    "wall_seconds": epoch_total(epochs, "wall_seconds"),
                    "images_per_second": images / seconds if seconds else math.nan})
    return pd.DataFrame(out)


def training_status(record: dict) -> str:
    """A training record's status as the report shows it: 'running' only while the process that writes it
    (pid and host recorded, :func:`harness.training.run_status.process_facts`) still exists; one left 'running' by a
    process that is gone (SIGKILL, out of memory, a crashed machine) ended without a status."""
    status = record.get("status", "?")
    if status != "running":
        return status
    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int) or host is None:
        return "running? (no process recorded)"
    if host != socket.gethostname():
        return f"running? (on {host})"
    return "running" if process_exists(pid) else "ended without a status (killed?)"


def process_exists(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
                        "efficiency": efficiency, "efficiency_caveat": efficiency_caveat(run, base, device),
                        "machine": record.get("machine") or {}})
    frame = pd.DataFrame(out)
    for column in ("allreduce_seconds", "allreduce_share"):  # None (one rank: nothing to all-reduce) -> NaN
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def memory_table(rows: pd.DataFrame, iterations: int, config_name: str) -> pd.DataFrame:
    """Per CPU implementation x batch size: host memory measured around a training step beside the
    analytic figure of :mod:`harness.measure.expected_memory` (bytes)."""
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


# ------------------------------------------------------------------------------------------------ profile
# (the profile files are read and checked by harness.results; these are the frames of the report)
def profile_rows(profile: Profile, implementation: str) -> pd.DataFrame:
    """One implementation's rows in the order of a training step: forward, backward, update, each by the
    layer's place in the forward pass."""
    rows = profile.frame[profile.frame["implementation"] == implementation]
    phase = rows["phase"].map({name: index for index, name in enumerate(PROFILE_PHASES)})
    return rows.assign(phase_index=phase).sort_values(["phase_index", "order", "layer"], kind="stable") \
        .drop(columns="phase_index").reset_index(drop=True)


def profile_phase_totals(rows: pd.DataFrame) -> pd.DataFrame:
    """Per phase of one implementation's rows: the summed time per step and share of the step."""
    totals = rows.groupby("phase", sort=False)[["time_s", "share"]].sum(min_count=1)
    return totals.reindex([phase for phase in PROFILE_PHASES if phase in totals.index]).reset_index()


PROFILE_MEMORY_COLUMNS = ("memory_allocated_bytes", "memory_peak_bytes")


def profile_layer_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One implementation's layers x phases (:func:`profile_rows`), the figures the report shows of each:
    time per step with its quartiles, share of the step, GFLOP/s, % of peak, and the memory columns the
    profiler filled for some row (the others left out)."""
    columns = ["phase", "layer", "time_s", "time_q25_s", "time_q75_s", "share", "gflops_per_s", "pct_of_peak"]
    columns += [column for column in PROFILE_MEMORY_COLUMNS if rows[column].notna().any()]
    return rows[columns].reset_index(drop=True)


def profile_steps(rows: pd.DataFrame) -> int | None:
    """The profiled steps one implementation's rows rest on (None where the rows do not say)."""
    steps = rows["steps"].dropna()
    return int(steps.iloc[0]) if len(steps) else None


def profile_summary(rows: pd.DataFrame, about: dict) -> dict:
    """What the report says of one implementation's profile besides its table: batch, network, dtype,
    profiled steps, the profiled and unprofiled step and the overhead (from profile.json, ``about``), the
    layers' summed time and its share of the profiled step, and the time and share of each phase (with the
    phase measured whole, where profile.json has it)."""
    number = lambda value: value if isinstance(value, (int, float)) else None  # noqa: E731
    step = number(about.get("step_s"))
    summed = rows["time_s"].sum()
    measured = about.get("phases_s") if isinstance(about.get("phases_s"), dict) else {}
    totals = profile_phase_totals(rows)
    return {
        "batch_size": int(rows["batch_size"].iloc[0]) if rows["batch_size"].notna().any() else None,
        "config_name": rows["config_name"].iloc[0] or None, "dtype": rows["dtype"].iloc[0] or None,
        "steps": profile_steps(rows), "step_s": step, "unprofiled_step_s": number(about.get("unprofiled_step_s")),
        "overhead": number(about.get("overhead")), "layers_s": summed,
        "layers_share_of_step": summed / step if step else None,
        "phases": [(phase, time, share, number(measured.get(phase)))
                   for phase, time, share in zip(totals["phase"], totals["time_s"], totals["share"])],
    }


def per_class_table(confusion) -> pd.DataFrame:
    """Per true class of a confusion matrix (rows: true class, columns: predicted): the test images, those
    classified correctly, the accuracy, and the most frequent wrong prediction with its count (the lowest
    class among ties; None and 0 where the class has no error)."""
    rows = []
    for true_class, counts in enumerate(confusion):
        counts = [int(count) for count in counts]
        images, correct = sum(counts), counts[true_class]
        errors = [(count, -predicted) for predicted, count in enumerate(counts) if predicted != true_class and count]
        count, predicted = max(errors) if errors else (0, None)
        rows.append({"class": true_class, "images": images, "correct": correct,
                     "accuracy": correct / images if images else math.nan,
                     "confused_with": None if predicted is None else -predicted, "confusions": count})
    frame = pd.DataFrame(rows, columns=["class", "images", "correct", "accuracy", "confused_with", "confusions"])
    return frame.astype({"confused_with": "Int64"})


def plan_lines(plans: dict) -> list[str]:
    """One Markdown bullet per implementation and batch size: the strategy of each product of each
    convolution, where the choice came from (measured or cached) and how long measuring took; then, once,
    each note the plans carry (what a strategy does to the meaning of the rates)."""
    lines = []
    for name, by_batch in sorted(plans.items()):
        for batch, facts in sorted(by_batch.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0):
            layers = "; ".join(f"{layer}: {'/'.join(str(facts[layer].get(k)) for k in ('forward', 'weight', 'input'))}"
                               for layer in ("conv1", "primary_caps") if isinstance(facts.get(layer), dict))
            seconds = facts.get("measure_seconds")
            took = f", measuring took {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
            lines.append(f"- {name}, batch {batch}: {layers} ({facts.get('source', '?')}{took})")
    notes = {facts["note"] for by_batch in plans.values() for facts in by_batch.values() if facts.get("note")}
    return lines + (["", *sorted(notes)] if notes else [])
