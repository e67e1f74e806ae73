"""The report's figures, built with matplotlib's Agg backend from the tidy table (:mod:`harness.asv_results`)
and the training and distributed-scaling records.

Every function returns a Figure with a title, axes labelled with units and a legend, or raises
:class:`NoData` with the reason it has nothing to draw (the report says so instead of writing an empty
plot).  Saving is the caller's job (:mod:`harness.report` writes atomically).  One implementation keeps
one colour in every figure; looped routing is drawn dashed, vectorised solid.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, Formatter, FuncFormatter, NullLocator  # noqa: E402

DPI = 150
PHASES = ("forward", "backward", "train_step", "inference", "routing")
PHASE_LABELS = {"forward": "forward", "backward": "backward", "train_step": "train step", "inference": "inference",
                "routing": "routing", "routing_backward": "routing fwd+bwd"}
LOG_RANGE = 30  # a bar chart whose values span more than this factor gets a log axis
MIB = 2**20
LINESTYLES = {"looped": "--"}  # routing variant -> line style (vectorised: solid)
MARKERS = {"looped": dict(marker="s", markersize=6, markerfacecolor="white")}  # hollow, visible over a twin
GRID = dict(alpha=0.3)
MINOR_GRID = dict(alpha=0.12)
ACCURACY_ZOOM = 0.8  # test accuracy axis: 0-100 % unless every epoch reached this


class NoData(LookupError):
    """A figure has nothing to draw; the message says why."""


def colours(names) -> dict[str, tuple]:
    """A fixed colour per implementation (sorted names), the same in every figure of a report."""
    palette = plt.get_cmap("tab10").colors
    return {name: palette[index % len(palette)] for index, name in enumerate(sorted(set(names)))}


def measured(table: pd.DataFrame, metrics) -> pd.DataFrame:
    """Implementation rows of ``metrics`` with a value."""
    rows = table[table["metric"].isin(list(metrics)) & table["implementation"].notna()]
    return rows[rows["value"].notna()]


def absent_note(table: pd.DataFrame, shown, device: str | None = None) -> str:
    """A footnote naming the implementations in the run (on ``device``, if given) that the figure cannot
    show for want of a result."""
    candidates = table if device is None else table[table["device"] == device]
    missing = sorted(set(candidates["implementation"].dropna()) - set(shown))
    return f"no result in this run (skipped or unavailable): {', '.join(missing)}" if missing else ""


def new_figure(ncols: int = 1, width: float = 9.0, height: float = 5.2):
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def finish(fig: Figure, title: str, note: str = "", legend_handles=None, legend_cols: int = 4) -> Figure:
    """Title on top, one legend below the axes, an optional footnote under it; a layout that keeps all
    three clear of the axes."""
    fig.suptitle(title, fontsize=12)
    bottom = 0.0
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, color="0.35", wrap=True)
        bottom = 0.05
    if legend_handles:
        handles, labels = legend_handles
        fig.legend(handles, labels, loc="lower center", ncols=min(legend_cols, len(labels)), fontsize=8.5,
                   frameon=False, bbox_to_anchor=(0.5, bottom))
        rows = math.ceil(len(labels) / min(legend_cols, len(labels)))
        bottom += 0.045 * rows + 0.02
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    return fig


def unique_handles(axes) -> tuple[list, list]:
    """The legend entries of several axes, each label once."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen.keys())


def integer_log_axis(ax, values, axis: str = "x") -> None:
    """A log axis ticked at exactly the measured values (batch sizes, world sizes), written plainly."""
    ticks = sorted({int(v) for v in values})
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_locator(NullLocator())


def plain_log_formatter(ax, axis: str = "y") -> None:
    """Log-axis tick labels as plain numbers (0.1, 20, 300) rather than powers of ten, on the ticks that
    matplotlib's own log formatters choose to label (major and, over a short range, minor)."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(PlainLogFormatter(target.get_major_formatter()))
    target.set_minor_formatter(PlainLogFormatter(target.get_minor_formatter()))


class PlainLogFormatter(Formatter):
    """Writes ``f"{v:g}"`` wherever the wrapped log formatter writes a label at all."""

    def __init__(self, original: Formatter) -> None:
        self.original = original

    def set_locs(self, locs) -> None:
        self.original.set_locs(locs)  # the log formatter picks the minor ticks to label here

    def __call__(self, value, pos=None) -> str:
        return f"{value:g}" if self.original(value, pos) else ""


def bar_value(value: float) -> str:
    """A bar's label: whole numbers from 100 up, three significant digits below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def grouped_bars(ax, frame: pd.DataFrame, groups: list, series: list, colour_of, label_of, value_format) -> None:
    """Bars of ``frame`` (index: groups, columns: series) side by side within each group, each labelled
    with its value (upright when there are few bars, else turned)."""
    width = 0.8 / max(len(series), 1)
    upright = len(groups) * len(series) <= 14
    for index, name in enumerate(series):
        values = frame[name].reindex(groups).to_numpy(dtype=float)
        positions = np.arange(len(groups)) + (index - (len(series) - 1) / 2) * width
        bars = ax.bar(positions, np.nan_to_num(values, nan=0.0), width, color=colour_of(name, index),
                      label=label_of(name), edgecolor="white", linewidth=0.5)
        for bar, value in zip(bars, values):
            if np.isfinite(value) and value > 0:
                ax.annotate(value_format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7.5 if upright else 6.5,
                            rotation=0 if upright else 90, xytext=(0, 2),
                            textcoords="offset points")
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)


def auto_log(ax, values) -> bool:
    """A log y axis when the positive values span more than :data:`LOG_RANGE`; True if it was set."""
    values = np.asarray([v for v in values if np.isfinite(v) and v > 0])
    if len(values) and values.max() / values.min() > LOG_RANGE:
        ax.set_yscale("log")
        plain_log_formatter(ax)
        return True
    return False


def headroom(ax, log: bool) -> None:
    """Room above the tallest bar for its rotated value label."""
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * (2.5 if log else 1.12))


def largest_batch(rows: pd.DataFrame) -> int:
    return int(rows["batch_size"].dropna().max())


def phase_times(table: pd.DataFrame, iterations: int, where: str) -> Figure:
    """Median time of each phase per implementation (grouped bars) at the largest measured batch size."""
    rows = measured(table, PHASES)
    rows = rows[rows["routing_iterations"] == iterations]
    if rows.empty:
        raise NoData("no phase timings (time_forward, time_backward, ...) with a result")
    batch = largest_batch(rows)
    rows = rows[rows["batch_size"] == batch]
    frame = rows.pivot_table(index="implementation", columns="metric", values="value", aggfunc="first") * 1e3
    phases = [phase for phase in PHASES if phase in frame.columns]
    implementations = list(frame.index)
    fig, (ax,) = new_figure(width=max(8.0, 1.3 * len(implementations) + 3))
    palette = plt.get_cmap("Set2").colors
    grouped_bars(ax, frame, implementations, phases, lambda _, i: palette[i % len(palette)],
                 lambda phase: PHASE_LABELS[phase], bar_value)
    log = auto_log(ax, frame.to_numpy().ravel())
    headroom(ax, log)
    ax.set_xlabel("implementation")
    ax.set_ylabel("median time per call (ms" + (", log scale)" if log else ")"))
    ax.tick_params(axis="x", labelrotation=15 if len(implementations) > 5 else 0)
    ax.grid(axis="y", **GRID)
    title = f"Time per phase at batch size {batch}, {iterations} routing iterations ({where})"
    return finish(fig, title, absent_note(table, implementations), unique_handles([ax]), legend_cols=5)


def line_per_implementation(ax, rows: pd.DataFrame, x: str, y, palette: dict, linestyle=None, suffix="") -> None:
    """One line (marker at every point) per implementation; ``y`` is a column name or a function of rows."""
    for name, group in rows.sort_values(x).groupby("implementation", sort=True):
        values = group[y] if isinstance(y, str) else y(group)
        routing = group["routing_variant"].iloc[0]
        marker = MARKERS.get(routing, dict(marker="o", markersize=4))
        ax.plot(group[x].astype(float), values, linestyle=linestyle or LINESTYLES.get(routing, "-"),
                color=palette[name], label=f"{name}{suffix}", **marker)


def log_grid(ax) -> None:
    ax.grid(which="major", **GRID)
    ax.grid(which="minor", **MINOR_GRID)


def batch_scaling(table: pd.DataFrame, iterations: int, where: str, palette: dict) -> Figure:
    """Train-step time and images/s against batch size, log-log, one line per implementation."""
    rows = measured(table, ["train_step"])
    rows = rows[rows["routing_iterations"] == iterations]
    if rows.empty:
        raise NoData("no time_train_step result")
    fig, (left, right) = new_figure(ncols=2, width=11)
    line_per_implementation(left, rows.assign(ms=rows["value"] * 1e3), "batch_size", "ms", palette)
    line_per_implementation(right, rows.assign(ips=rows["batch_size"].astype(float) / rows["value"]),
                            "batch_size", "ips", palette)
    for ax, label, title in ((left, "median train-step time (ms, log scale)", "Time per training step"),
                             (right, "images per second (log scale)", "Training throughput")):
        integer_log_axis(ax, rows["batch_size"])
        ax.set_yscale("log")
        plain_log_formatter(ax)
        ax.set_xlabel("batch size (images, log scale)")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        log_grid(ax)
    return finish(fig, f"Batch-size scaling, {iterations} routing iterations ({where})",
                  absent_note(table, rows["implementation"].unique()), unique_handles([left]))


def routing_iterations(table: pd.DataFrame, where: str, palette: dict) -> Figure:
    """Routing alone (forward; forward and backward) against the number of routing iterations."""
    rows = measured(table, ["routing", "routing_backward"])
    if rows.empty:
        raise NoData("no time_routing / time_routing_backward result")
    batch = largest_batch(rows)
    rows = rows[rows["batch_size"] == batch].assign(ms=lambda r: r["value"] * 1e3)
    fig, axes = new_figure(ncols=2, width=11)
    panels = (("routing", "Routing forward"), ("routing_backward", "Routing forward + backward"))
    for ax, (metric, title) in zip(axes, panels):
        line_per_implementation(ax, rows[rows["metric"] == metric], "routing_iterations", "ms", palette)
        iterations = sorted(rows["routing_iterations"].dropna().astype(int).unique())
        ax.set_xticks(iterations)
        ax.set_yscale("log")
        plain_log_formatter(ax)
        ax.set_xlabel("routing iterations")
        ax.set_ylabel("median time per call (ms, log scale)")
        ax.set_title(title, fontsize=10)
        log_grid(ax)
    return finish(fig, f"Routing time against routing iterations at batch size {batch} ({where})",
                  absent_note(table, rows["implementation"].unique()), unique_handles(axes))


def vectorised_speedup(speedups: pd.DataFrame, where: str) -> Figure:
    """Speed-up of vectorised over looped routing (looped time / vectorised time) per phase and framework,
    from :func:`harness.report.speedup_table` rows at one batch size."""
    rows = speedups.dropna(subset=["speedup"])
    if rows.empty:
        raise NoData("no framework has both a vectorised and a looped implementation with results")
    batch = int(rows["batch_size"].max())
    rows = rows[rows["batch_size"] == batch]
    frame = rows.pivot_table(index="phase", columns="pair", values="speedup", aggfunc="first")
    phases = [phase for phase in (*PHASES, "routing_backward") if phase in frame.index]
    pairs = list(frame.columns)
    fig, (ax,) = new_figure(width=max(8.0, 1.2 * len(phases) + 3))
    palette = plt.get_cmap("Dark2").colors
    grouped_bars(ax, frame, phases, pairs, lambda _, i: palette[i % len(palette)], str, lambda v: f"{v:.2g}×")
    ax.set_xticklabels([PHASE_LABELS[phase] for phase in phases])
    log = auto_log(ax, list(frame.to_numpy().ravel()) + [1.0])
    headroom(ax, log)
    ax.axhline(1.0, color="0.2", linewidth=1, linestyle=":", label="1× (no speed-up)")
    ax.set_xlabel("phase")
    ax.set_ylabel("speed-up (looped time / vectorised time, ×" + (", log scale)" if log else ")"))
    ax.grid(axis="y", **GRID)
    missing = sorted(set(speedups["pair"]) - set(pairs))
    note = f"no pair with results in this run: {', '.join(missing)}" if missing else ""
    return finish(fig, f"Vectorised over looped routing at batch size {batch} ({where})", note,
                  unique_handles([ax]))


GPU_MEMORY_PANELS = (
    ("gpu_memory_nvml", "NVML: device memory in use (all processes, CUDA context included)"),
    ("gpu_memory_allocator_live", "allocator: peak of bytes in live arrays"),
    ("gpu_memory_allocator_reserved", "allocator: peak of bytes held from the device (cache included)"),
)
HOST_MEMORY_PANELS = (
    ("host_memory_peak", "asv peakmem: benchmark process peak RSS"),
    ("host_memory", "RSS sampled every 1 ms during the step"),
)


def memory(table: pd.DataFrame, iterations: int, where: str, palette: dict) -> Figure:
    """Peak memory of a training step against batch size, each figure in a panel of its own and named
    apart: on GPU results NVML's device figure and the allocator's live and reserved peaks; with no GPU
    result on this run, the host memory instead (asv's peakmem and the resident memory sampled during the
    step), saying so."""
    gpu = measured(table, [metric for metric, _ in GPU_MEMORY_PANELS])
    device = None
    if not gpu.empty:
        rows, title, device, panels = gpu, f"GPU memory of one training step ({where})", "cuda", GPU_MEMORY_PANELS
    else:
        rows, title = measured(table, [metric for metric, _ in HOST_MEMORY_PANELS]), \
            f"Host memory of one training step (no GPU memory results on {where})"
        panels = HOST_MEMORY_PANELS
    rows = rows[rows["routing_iterations"] == iterations]
    if rows.empty:
        raise NoData("no GPU or host memory result")
    fig, axes = new_figure(ncols=len(panels), width=5.5 * len(panels))
    top = rows["value"].max() / MIB * 1.08
    for ax, (metric, subtitle) in zip(axes, panels):
        subset = rows[rows["metric"] == metric]
        line_per_implementation(ax, subset.assign(mib=subset["value"] / MIB), "batch_size", "mib", palette)
        integer_log_axis(ax, rows["batch_size"])
        ax.set_xlabel("batch size (images, log scale)")
        ax.set_ylabel("peak memory (MiB)")
        ax.set_ylim(0, top)
        ax.set_title(subtitle, fontsize=9.5)
        ax.grid(**GRID)
    return finish(fig, title, absent_note(table, rows["implementation"].unique(), device), unique_handles(axes))


def roofline(table: pd.DataFrame, iterations: int, where: str) -> Figure:
    """Achieved share of the measured GEMM peak of each implementation's backend, per phase (bars)."""
    rows = table[table["pct_of_peak"].notna() & (table["routing_iterations"] == iterations)]
    if rows.empty:
        raise NoData("no GemmPeak (track_gemm_peak_gflops) result in this run to divide by: "
                     "run the suite again with benchmarks/bench_peak.py")
    batch = largest_batch(rows)
    rows = rows[rows["batch_size"] == batch]
    frame = rows.pivot_table(index="implementation", columns="metric", values="pct_of_peak", aggfunc="first")
    phases = [phase for phase in (*PHASES, "routing_backward") if phase in frame.columns]
    implementations = list(frame.index)
    fig, (ax,) = new_figure(width=max(8.0, 1.3 * len(implementations) + 3))
    palette = plt.get_cmap("Set2").colors
    grouped_bars(ax, frame, implementations, phases, lambda _, i: palette[i % len(palette)],
                 lambda phase: PHASE_LABELS[phase], lambda v: f"{v:.2g}%")
    log = auto_log(ax, frame.to_numpy().ravel())
    headroom(ax, log)
    ax.axhline(100, color="0.2", linewidth=1, linestyle=":", label="100% = measured GEMM peak")
    ax.set_xlabel("implementation")
    ax.set_ylabel("achieved GFLOP/s as % of GEMM peak" + (" (log scale)" if log else ""))
    ax.tick_params(axis="x", labelrotation=15 if len(implementations) > 5 else 0)
    ax.grid(axis="y", **GRID)
    return finish(fig, f"Share of the measured float32 GEMM peak at batch size {batch} ({where})",
                  absent_note(table, implementations), unique_handles([ax]), legend_cols=4)


def training_label(record: dict, stem: str, duplicates: bool) -> str:
    label = f"{record['implementation']} ({record.get('config_name', '?')} net, batch {record.get('batch_size', '?')})"
    return f"{label} [{stem}]" if duplicates else label


def training_curves(records: list[tuple[str, dict]]) -> Figure:
    """Training loss per step and test accuracy per epoch against training time, one line per results
    file (``records``: (file stem, record) pairs)."""
    records = [(stem, record) for stem, record in records if record.get("steps")]
    if not records:
        raise NoData("no training results file with recorded steps")
    fig, (left, right) = new_figure(ncols=2, width=11)
    labels = [training_label(record, stem, False) for stem, record in records]
    palette = plt.get_cmap("tab10").colors
    for index, (stem, record) in enumerate(records):
        label = training_label(record, stem, labels.count(labels[index]) > 1)
        colour = palette[index % len(palette)]
        steps = pd.DataFrame(record["steps"])
        left.plot(steps["elapsed_seconds"], steps["loss"], color=colour, linewidth=1, label=label)
        epochs = pd.DataFrame(record.get("epochs") or [])
        if not epochs.empty:
            right.plot(epochs["elapsed_seconds"], 100 * epochs["test_accuracy"], color=colour, marker="o", label=label)
    left.set_ylabel("training loss (margin + reconstruction)")
    left.set_title("Loss per training step", fontsize=10)
    right.set_ylabel("test accuracy (%)")
    right.set_title("Test accuracy after each epoch", fontsize=10)
    accuracy = [epoch.get("test_accuracy", 0) for _, record in records for epoch in record.get("epochs") or []]
    if not accuracy or min(accuracy) < ACCURACY_ZOOM:
        right.set_ylim(0, 100)  # a short run: the whole scale, so a few points of noise look like noise
    for ax in (left, right):
        ax.set_xlabel("training time (s, train steps only)")
        ax.set_xlim(left=0)
        ax.grid(**GRID)
    return finish(fig, "Training loss and test accuracy against wall-clock training time", "",
                  unique_handles([left, right]), legend_cols=1)


def distributed_scaling(frame: pd.DataFrame) -> Figure:
    """Images/s against world size with the ideal linear line, and scaling efficiency, one line per
    distributed results file (``frame``: :func:`harness.report.distributed_table` rows)."""
    if frame.empty:
        raise NoData("no distributed scaling results")
    fig, (left, right) = new_figure(ncols=2, width=11)
    palette = plt.get_cmap("tab10").colors
    for index, (label, group) in enumerate(frame.sort_values("world_size").groupby("label", sort=True)):
        colour = palette[index % len(palette)]
        left.plot(group["world_size"], group["images_per_second"], marker="o", color=colour, label=label)
        left.plot(group["world_size"], group["ideal_images_per_second"], linestyle=":", color=colour,
                  label=f"{label}: ideal (linear in the compute used)")
        right.plot(group["world_size"], 100 * group["efficiency"], marker="o", color=colour, label=label)
    right.axhline(100, color="0.2", linewidth=1, linestyle=":")
    integer_log_axis(left, frame["world_size"])
    integer_log_axis(right, frame["world_size"])
    left.set_yscale("log")
    plain_log_formatter(left)
    left.set_ylabel("images per second (log scale)")
    left.set_title("Throughput", fontsize=10)
    right.set_ylabel("scaling efficiency (% of linear in the compute used)")
    right.set_ylim(0, max(110, 105 * np.nanmax(frame["efficiency"].to_numpy())))
    right.set_title("Scaling efficiency", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("world size (processes, log scale)")
        ax.grid(**GRID)
    return finish(fig, "Data-parallel scaling: throughput and efficiency against world size", "",
                  unique_handles([left, right]), legend_cols=1)
