"""The report's figures, built with matplotlib's Agg backend from the tidy table (:mod:`harness.suite.asv_results`)
and the training, distributed-scaling and profile records.

Every function returns a Figure with a title, axes labelled with units and a legend, or raises
:class:`NoData` with the reason it has nothing to draw (the report says so instead of writing an empty
plot).  Saving is the caller's job (:mod:`harness.report` writes atomically).

Colours are fixed per name, never by position: each built-in implementation has its own in
:data:`IMPLEMENTATION_COLOURS` (``-compiled`` and ``-cuda-graph`` variants a shade of their base), any other
name a colour from a stable hash of it, phases and profiled layers a table of their own, so that adding an
implementation or a run recolours nothing.  Looped routing is drawn dashed with hollow markers, vectorised
solid.  Every tick of a log axis is labelled (:class:`LabelledLogLocator`).  A timing drawn from several
samples carries its interquartile range (error bars or a band); one drawn from a single sample says so.
The legend and the footnote sit under the panels and are measured (:func:`finish`): a long one makes the
figure taller, never the panels shorter, and a y label longer than its panel is broken into lines.
"""

from __future__ import annotations

import colorsys
import itertools
import math
import textwrap
import zlib

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FixedLocator,
    FuncFormatter,
    Locator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
)

from harness.reporting.formatting import samples_phrase  # noqa: E402
from harness.reporting.tables import (  # noqa: E402
    profile_rows,
    record_routing_algorithm,
    table_algorithms,
    training_images,
    training_ranks,
)
from harness.results import PROFILE_PHASES, Profile  # noqa: E402

DPI = 150
PHASES = ("forward", "backward", "train_step", "inference", "routing")
PHASE_LABELS = {"forward": "forward", "backward": "backward", "train_step": "train step", "inference": "inference",
                "routing": "routing", "routing_backward": "routing fwd+bwd"}
LOG_RANGE = 30  # a bar chart whose values span more than this factor gets a log axis
LOG_TIME_RANGE = 10  # training curves get a log time axis when the longest run is this many times the shortest
MIB = 2**20
LINESTYLES = {"looped": "--"}  # routing variant -> line style (vectorised: solid)
MARKERS = {"looped": dict(marker="s", markersize=6, markerfacecolor="white")}  # hollow, visible over a twin
VARIANT_MARKERS = {"-compiled": "^", "-cuda-graph": "D"}
# several training runs of one implementation, in file-name order: six styles a reader tells apart
RUN_LINESTYLES = ("-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 4)))
GRID = dict(alpha=0.3)
MINOR_GRID = dict(alpha=0.12)
ACCURACY_ZOOM = 0.8  # test accuracy axis: 0-100 % unless every epoch reached this
ACCURACY_MARGIN = 0.1  # a zoomed accuracy axis reaches this share of its span below the lowest point
BOTTOM_ALLOWANCE = 1.1  # inches under the axes a figure's height was chosen for (legend and footnote)
COMMA_BREAK_COST = 6  # a y label broken after a comma rather than before a parenthesis: as if 6 characters longer
BOTTOM_PAD = 0.06  # inches between the footnote, the legend and the edge

IMPLEMENTATION_COLOURS = {  # a fixed colour per built-in implementation: vectorised dark, looped light
    "torch-vectorised": "#1f77b4", "torch-looped": "#6baed6",
    "torch-vectorised-cuda": "#d62728", "torch-looped-cuda": "#fb6a4a",
    "numpy-vectorised": "#2ca02c", "numpy-looped": "#74c476",
    "numpy-vectorised-cuda": "#17becf", "numpy-looped-cuda": "#9edae5",
    "cupy-vectorised": "#ff7f0e", "cupy-looped": "#fdae6b",
    "cupy-vectorised-cuda": "#bcbd22", "cupy-looped-cuda": "#dbdb8d",
    "torch-fused": "#9467bd", "torch-fused-cuda": "#8c564b", "cupy-fused": "#e377c2",
    "jax-vectorised": "#7f7f7f", "jax-looped": "#c7c7c7",
    "jax-vectorised-cuda": "#393b79", "jax-looped-cuda": "#9c9ede",
}
HASHED_PALETTE = plt.get_cmap("tab20b").colors  # any other name: a stable hash of it into these
PHASE_COLOURS = {phase: plt.get_cmap("Set2").colors[index] for index, phase in enumerate(
    ("forward", "backward", "train_step", "inference", "routing", "routing_backward"))}
LAYER_COLOURS = {"conv1": "#4e79a7", "primary_caps": "#f28e2b", "primary_squash": "#edc948", "u_hat": "#59a14f",
                 "lengths_mask": "#76b7b2", "decoder": "#e15759", "losses": "#ff9da7", "optimizer": "#9c755f"}
ROUTING_SHADES = (0.85, 0.65, 0.48, 0.35, 0.75, 0.55, 0.42)  # routing_iteration_r: shades of purple by r
SHORT_LAYERS = {"primary_caps": "primary caps", "primary_squash": "squash", "lengths_mask": "lengths",
                "optimizer": "Adam"}  # a layer's name inside its bar segment; routing_iteration_r: "routing r"


class NoData(LookupError):
    """A figure has nothing to draw; the message says why."""


def hashed_colour(name: str, palette=HASHED_PALETTE) -> tuple:
    """A colour that depends on the name alone (crc32, the same in every process and Python version)."""
    return tuple(palette[zlib.crc32(str(name).encode("utf-8")) % len(palette)])


def shade(colour, darken: float, hue_shift: float = 0.0) -> tuple:
    hue, lightness, saturation = colorsys.rgb_to_hls(*to_rgb(colour))
    return colorsys.hls_to_rgb((hue + hue_shift) % 1.0, lightness * darken, saturation)


def colour_of(name: str) -> tuple:
    """The colour of an implementation in every figure: the fixed table; a ``-compiled`` or ``-cuda-graph``
    variant of a name in it, a darker shade of that name's colour; any other name, a stable hash."""
    if name in IMPLEMENTATION_COLOURS:
        return to_rgb(IMPLEMENTATION_COLOURS[name])
    if "-cuda-graph" in name and name.replace("-graph", "") in IMPLEMENTATION_COLOURS:
        return shade(IMPLEMENTATION_COLOURS[name.replace("-graph", "")], 0.7, hue_shift=0.06)
    if "-compiled" in name and name.replace("-compiled", "") in IMPLEMENTATION_COLOURS:
        return shade(IMPLEMENTATION_COLOURS[name.replace("-compiled", "")], 0.6)
    return hashed_colour(name)


def colours(names) -> dict[str, tuple]:
    """The colour of each implementation (:func:`colour_of`): the same in every figure and every report."""
    return {name: colour_of(name) for name in sorted(set(names))}


def layer_colour(layer: str) -> tuple:
    """The colour of a profiled layer: a fixed table, routing iterations in shades of purple."""
    if layer in LAYER_COLOURS:
        return to_rgb(LAYER_COLOURS[layer])
    if layer.startswith("routing_iteration_") and layer.rsplit("_", 1)[-1].isdigit():
        r = int(layer.rsplit("_", 1)[-1])
        return tuple(plt.get_cmap("Purples")(ROUTING_SHADES[(r - 1) % len(ROUTING_SHADES)])[:3])
    return hashed_colour(layer)


def marker_of(name: str, routing) -> dict:
    """Marker of an implementation's line: hollow squares for looped routing, triangles for compiled and
    diamonds for CUDA-graph variants, dots otherwise."""
    style = dict(MARKERS.get(routing, dict(marker="o", markersize=4)))
    for suffix, marker in VARIANT_MARKERS.items():
        if suffix in str(name):
            style.update(marker=marker, markersize=5)
    return style


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


def notes(*parts: str) -> str:
    return "\n".join(part for part in parts if part)


def new_figure(ncols: int = 1, width: float = 9.0, height: float = 5.2):
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def wrapped(text: str, width_inches: float, points: float) -> str:
    """``text`` broken into lines that fit a figure ``width_inches`` wide at ``points`` (each given line kept)."""
    characters = max(30, int(width_inches * 72 / (points * 0.62)))
    return "\n".join(textwrap.fill(line, characters) for line in text.split("\n"))


def machines_text(machines: list) -> str:
    """The environment of a figure, for its title: the machine(s) its results were measured on (host and
    CPU from the results' machine facts), "?" where no file says."""
    named = []
    for machine in machines:
        machine = machine if isinstance(machine, dict) else {}
        text = ", ".join(str(machine[key]) for key in ("hostname", "cpu") if machine.get(key)) or "?"
        if text not in named:
            named.append(text)
    return "; ".join(named) if len(named) <= 2 else f"{len(named)} machines"


def fitted_legend(fig: Figure, handles, labels, columns: int, renderer):
    """A legend below the axes in at most ``columns`` columns, fewer where that many would be wider than the
    figure (long labels: one entry a row rather than entries cut off at the figure's edges)."""
    def legend(ncols: int):
        return fig.legend(handles, labels, loc="lower center", ncols=ncols, fontsize=8.5, frameon=False)

    for ncols in range(min(columns, len(labels)), 1, -1):
        wide = legend(ncols)
        if wide.get_window_extent(renderer).width <= fig.bbox.width:
            return wide
        wide.remove()
    return legend(1)


def broken(text: str, lines: int) -> str:
    """``text`` in ``lines`` lines, broken where a reader pauses (before a parenthesis, or after a comma, which
    counts as :data:`COMMA_BREAK_COST` characters more) so that the longest line is shortest; at spaces where
    it has too few such places."""
    pauses = {index + 1: 0 for index in range(len(text)) if text.startswith(" (", index)}
    pauses.update({index + 2: COMMA_BREAK_COST for index in range(len(text)) if text.startswith(", ", index)})
    if len(pauses) < lines - 1:
        return textwrap.fill(text, math.ceil(len(text) / lines) + 2, break_on_hyphens=False)
    best = min(itertools.combinations(sorted(pauses), lines - 1),
               key=lambda cuts: max(b - a for a, b in zip((0, *cuts), (*cuts, len(text))))
               + sum(pauses[cut] for cut in cuts))
    return "\n".join(text[a:b].strip() for a, b in zip((0, *best), (*best, len(text))))


def fit_y_labels(fig: Figure, renderer) -> bool:
    """Break each y label taller than its axes into as few lines as make it fit, so that no label runs past
    its panel into a title; True if any label changed (the layout is then due again)."""
    changed = False
    for ax in fig.axes:
        label = ax.yaxis.label
        text = label.get_text()
        if not ax.get_visible() or not text or "\n" in text:
            continue
        for lines in (2, 3):
            if label.get_window_extent(renderer).height <= ax.get_window_extent(renderer).height:
                break
            label.set_text(broken(text, lines))
            changed = True
    return changed


def finish(fig: Figure, title: str, note: str = "", legend_handles=None, legend_cols: int = 4) -> Figure:
    """Title on top, one legend below the axes, an optional footnote under it, all three clear of the axes
    (title and footnote wrapped to the figure's width, the legend in as many columns as fit).  The legend and
    the footnote are measured: what they need beyond :data:`BOTTOM_ALLOWANCE` inches makes the figure taller
    rather than the panels shorter; a y label taller than its panel is broken into lines."""
    width, height = fig.get_figwidth(), fig.get_figheight()
    fig.suptitle(wrapped(title, width, 12), fontsize=12)
    renderer = fig.canvas.get_renderer()
    footnote = legend = None
    bottom = 0.0  # inches under the axes taken by the footnote and the legend
    if note:
        footnote = fig.text(0.5, 0, wrapped(note, width, 8), ha="center", va="bottom", fontsize=8, color="0.35")
        bottom = BOTTOM_PAD + footnote.get_window_extent(renderer).height / fig.dpi
    if legend_handles and legend_handles[1]:
        legend = fitted_legend(fig, *legend_handles, legend_cols, renderer)
        legend_at = bottom
        bottom += legend.get_window_extent(renderer).height / fig.dpi + BOTTOM_PAD
    height += max(0.0, bottom - BOTTOM_ALLOWANCE)
    fig.set_figheight(height)
    if footnote is not None:
        footnote.set_y(BOTTOM_PAD / height)
    if legend is not None:
        legend.set_bbox_to_anchor((0.5, legend_at / height), transform=fig.transFigure)
    rect = (0, bottom / height, 1, 0.97)  # tight_layout leaves room for the (wrapped) title
    fig.tight_layout(rect=rect)
    if fit_y_labels(fig, renderer):
        fig.tight_layout(rect=rect)
    return fig


def unique_handles(axes) -> tuple[list, list]:
    """The legend entries of several axes, each label once."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen.keys())


# ------------------------------------------------------------------------------------------------ log axes
MANTISSAS = ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8))


def tick_text(value: float) -> str:
    """A tick label as a plain number: 0.3, 20, 1500 (never 3e-01 or 10^3)."""
    text = f"{value:.4g}"
    if "e" in text:
        text = np.format_float_positional(float(text), trim="-")
    return text


class LabelledLogLocator(Locator):
    """Ticks of a log axis, every one of them labelled: the coarsest of 1, 1-3, 1-2-5, ... per decade that
    puts at least ``minimum`` ticks in view (every other decade when even single decades are too many);
    within a range too narrow for any of them, evenly spaced plain ticks."""

    def __init__(self, minimum: int = 4, maximum: int = 9) -> None:
        self.minimum, self.maximum = minimum, maximum

    def __call__(self):
        low, high = self.axis.get_view_interval()
        return self.tick_values(low, high)

    def tick_values(self, vmin, vmax):
        vmin, vmax = sorted((float(vmin), float(vmax)))
        if not vmax > 0:
            return []
        if not vmin > 0:
            vmin = vmax / 1e3
        low, high = math.floor(math.log10(vmin)), math.ceil(math.log10(vmax))
        inside = lambda tick: vmin * (1 - 1e-9) <= tick <= vmax * (1 + 1e-9)
        for mantissas in MANTISSAS:
            ticks = [float(f"{m * 10.0**e:.6g}") for e in range(low, high + 1) for m in mantissas]
            ticks = [tick for tick in ticks if inside(tick)]
            if len(ticks) >= self.minimum:
                if len(ticks) > self.maximum:
                    ticks = ticks[:: math.ceil(len(ticks) / self.maximum)]
                return ticks
        return [tick for tick in MaxNLocator(4).tick_values(vmin, vmax) if inside(tick) and tick > 0]


def log_axis(ax, axis: str = "y", base: float = 10) -> None:
    """A log axis whose every tick is labelled with a plain number, and no unlabelled minor ticks."""
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log", base=base)
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(LabelledLogLocator())
    target.set_major_formatter(FuncFormatter(lambda value, _: tick_text(value)))
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())


def integer_log_axis(ax, values, axis: str = "x") -> None:
    """A log axis ticked at exactly the measured values (batch sizes, world sizes), written plainly."""
    ticks = sorted({int(v) for v in values})
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())


def bar_value(value: float) -> str:
    """A bar's label: whole numbers from 100 up, three significant digits below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def grouped_bars(ax, frame: pd.DataFrame, groups: list, series: list, colour_of_series, label_of, value_format,
                 spread: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> None:
    """Bars of ``frame`` (index: groups, columns: series) side by side within each group, each labelled
    with its value (upright when there are few bars, else turned); ``spread`` (q25, q75 frames of the same
    shape, NaN where a bar rests on one sample) draws the interquartile range as an error bar."""
    width = 0.8 / max(len(series), 1)
    upright = len(groups) * len(series) <= 14
    for index, name in enumerate(series):
        values = frame[name].reindex(groups).to_numpy(dtype=float)
        positions = np.arange(len(groups)) + (index - (len(series) - 1) / 2) * width
        bars = ax.bar(positions, np.nan_to_num(values, nan=0.0), width, color=colour_of_series(name),
                      label=label_of(name), edgecolor="white", linewidth=0.5)
        tops = values.copy()
        if spread is not None and name in spread[0]:
            low = spread[0][name].reindex(groups).to_numpy(dtype=float)
            high = spread[1][name].reindex(groups).to_numpy(dtype=float)
            ok = np.isfinite(low) & np.isfinite(high) & np.isfinite(values)
            if ok.any():
                ax.errorbar(positions[ok], values[ok], yerr=[values[ok] - low[ok], high[ok] - values[ok]],
                            fmt="none", ecolor="0.15", elinewidth=0.9, capsize=2.5)
                tops[ok] = np.maximum(values[ok], high[ok])
        for bar, value, top in zip(bars, values, tops):
            if np.isfinite(value) and value != 0:
                below = value < 0  # a negative bar (a saving that is a loss) is labelled under its end
                ax.annotate(value_format(value), (bar.get_x() + bar.get_width() / 2, value if below else top),
                            ha="center", va="top" if below else "bottom", fontsize=7.5 if upright else 6.5,
                            rotation=0 if upright else 90, xytext=(0, -2 if below else 2),
                            textcoords="offset points",
                            bbox=dict(boxstyle="square,pad=0.05", facecolor="white", edgecolor="none",
                                      alpha=0.85))  # legible over a reference line
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)


def auto_log(ax, values) -> bool:
    """A log y axis when the positive values span more than :data:`LOG_RANGE`; True if it was set."""
    values = np.asarray([v for v in values if np.isfinite(v) and v > 0])
    if len(values) and values.max() / values.min() > LOG_RANGE:
        log_axis(ax, "y")
        return True
    return False


def headroom(ax, log: bool) -> None:
    """Room above the tallest bar for its rotated value label, and below the lowest where a bar is negative
    (its label hangs under it)."""
    low, high = ax.get_ylim()
    below = 0.08 * (high - low) if low < 0 and not log else 0.0
    ax.set_ylim(low - below, high * (2.5 if log else 1.12))


def largest_batch(rows: pd.DataFrame) -> int:
    return int(rows["batch_size"].dropna().max())


def single_samples(rows: pd.DataFrame) -> bool:
    """Every figure of ``rows`` rests on one sample (``asv run --quick``)."""
    counts = rows["samples"].dropna() if "samples" in rows else pd.Series(dtype=float)
    return len(counts) > 0 and bool((counts == 1).all())


def time_label(rows: pd.DataFrame, what: str, log: bool) -> str:
    """An axis label for times that says whether they are medians or single samples."""
    scale = ", log scale" if log else ""
    if single_samples(rows):
        return f"{what} (ms, 1 sample each{scale})"
    return f"median {what} (ms{scale})"


def spread_only(rows: pd.DataFrame, column: str) -> pd.Series:
    """q25 or q75 where the figure rests on several samples, NaN where on one (no spread to draw)."""
    several = rows["samples"] > 1 if "samples" in rows else pd.Series(False, index=rows.index)
    return rows[column].where(several)


def phase_times(table: pd.DataFrame, iterations: int, where: str) -> Figure:
    """Time of each phase per implementation (grouped bars) at the largest measured batch size, with the
    interquartile range where there are several samples."""
    rows = measured(table, PHASES)
    rows = rows[rows["routing_iterations"] == iterations]
    if rows.empty:
        raise NoData("no phase timings (time_forward, time_backward, ...) with a result")
    batch = largest_batch(rows)
    rows = rows[rows["batch_size"] == batch]
    rows = rows.assign(low=spread_only(rows, "q25"), high=spread_only(rows, "q75"))
    wide = {column: rows.pivot_table(index="implementation", columns="metric", values=column, aggfunc="first",
                                     dropna=False) * 1e3 for column in ("value", "low", "high")}
    frame = wide["value"]
    phases = [phase for phase in PHASES if phase in frame.columns]
    implementations = list(frame.index)
    fig, (ax,) = new_figure(width=max(8.0, 1.3 * len(implementations) + 3))
    grouped_bars(ax, frame, implementations, phases, lambda phase: PHASE_COLOURS[phase],
                 lambda phase: PHASE_LABELS[phase], bar_value,
                 spread=(wide["low"].reindex(columns=phases), wide["high"].reindex(columns=phases)))
    log = auto_log(ax, frame.to_numpy().ravel())
    headroom(ax, log)
    ax.set_xlabel("implementation")
    ax.set_ylabel(time_label(rows, "time per call", log))
    ax.tick_params(axis="x", labelrotation=15 if len(implementations) > 5 else 0)
    ax.grid(axis="y", **GRID)
    title = f"Time per phase at batch size {batch}, {iterations} routing iterations ({where})"
    return finish(fig, title, notes(samples_phrase(rows["samples"]), absent_note(table, implementations)),
                  unique_handles([ax]), legend_cols=5)


def line_per_implementation(ax, rows: pd.DataFrame, x: str, y, palette: dict | None = None, linestyle=None,
                            suffix="", band: tuple | None = None) -> None:
    """One line (marker at every point) per implementation; ``y`` is a column name or a function of rows;
    ``band`` (two such) shades the interquartile range where a point rests on several samples."""
    for name, group in rows.sort_values(x).groupby("implementation", sort=True):
        values = group[y] if isinstance(y, str) else y(group)
        routing = group["routing_variant"].iloc[0]
        colour = (palette or {}).get(name) or colour_of(name)
        ax.plot(group[x].astype(float), values, linestyle=linestyle or LINESTYLES.get(routing, "-"),
                color=colour, label=f"{name}{suffix}", **marker_of(name, routing))
        if band is not None:
            low, high = (group[b] if isinstance(b, str) else b(group) for b in band)
            if np.isfinite(np.asarray(low, dtype=float)).any():
                ax.fill_between(group[x].astype(float), np.asarray(low, dtype=float), np.asarray(high, dtype=float),
                                color=colour, alpha=0.18, linewidth=0)


def log_grid(ax) -> None:
    ax.grid(which="major", **GRID)


def batch_scaling(table: pd.DataFrame, iterations: int, where: str, palette: dict | None = None) -> Figure:
    """Train-step time and images/s against batch size, log-log, one line per implementation (shaded
    q25-q75 where there are several samples)."""
    rows = measured(table, ["train_step"])
    rows = rows[rows["routing_iterations"] == iterations]
    if rows.empty:
        raise NoData("no time_train_step result")
    rows = rows.assign(low=spread_only(rows, "q25"), high=spread_only(rows, "q75"))
    fig, (left, right) = new_figure(ncols=2, width=11)
    line_per_implementation(left, rows.assign(ms=rows["value"] * 1e3), "batch_size", "ms", palette,
                            band=(lambda g: g["low"] * 1e3, lambda g: g["high"] * 1e3))
    batch = rows["batch_size"].astype(float)
    line_per_implementation(right, rows.assign(ips=batch / rows["value"]), "batch_size", "ips", palette,
                            band=(lambda g: g["batch_size"].astype(float) / g["high"],
                                  lambda g: g["batch_size"].astype(float) / g["low"]))
    one = single_samples(rows)
    for ax, label, title in ((left, time_label(rows, "train-step time", True), "Time per training step"),
                             (right, "images per second (linear, from 0)" + (", 1 sample each" if one else ""),
                              "Training throughput")):
        integer_log_axis(ax, rows["batch_size"])
        if ax is left:  # times span decades; throughput a narrow band a log axis would blow up
            log_axis(ax, "y")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size (images, log scale)")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        log_grid(ax)
    return finish(fig, f"Batch-size scaling, {iterations} routing iterations ({where})",
                  notes(samples_phrase(rows["samples"]).replace("bars", "band"),
                        absent_note(table, rows["implementation"].unique())), unique_handles([left]))


def routing_iterations(table: pd.DataFrame, where: str, palette: dict | None = None) -> Figure:
    """Routing alone (forward; forward and backward) against the number of routing iterations."""
    rows = measured(table, ["routing", "routing_backward"])
    if rows.empty:
        raise NoData("no time_routing / time_routing_backward result")
    batch = largest_batch(rows)
    rows = rows[rows["batch_size"] == batch].assign(ms=lambda r: r["value"] * 1e3)
    rows = rows.assign(low=spread_only(rows, "q25") * 1e3, high=spread_only(rows, "q75") * 1e3)
    fig, axes = new_figure(ncols=2, width=11)
    panels = (("routing", "Routing forward"), ("routing_backward", "Routing forward + backward"))
    for ax, (metric, title) in zip(axes, panels):
        line_per_implementation(ax, rows[rows["metric"] == metric], "routing_iterations", "ms", palette,
                                band=("low", "high"))
        iterations = sorted(rows["routing_iterations"].dropna().astype(int).unique())
        ax.set_xticks(iterations)
        log_axis(ax, "y")
        ax.set_xlabel("routing iterations")
        ax.set_ylabel(time_label(rows, "time per call", True))
        ax.set_title(title, fontsize=10)
        log_grid(ax)
    return finish(fig, f"Routing time against routing iterations at batch size {batch} ({where})",
                  notes(samples_phrase(rows["samples"]).replace("bars", "band"),
                        absent_note(table, rows["implementation"].unique())), unique_handles(axes))


def vectorised_speedup(speedups: pd.DataFrame, where: str, basis: str = "") -> Figure:
    """Speed-up of vectorised over looped routing (looped time / vectorised time) per phase and framework,
    from :func:`harness.reporting.tables.speedup_table` rows at one batch size; each pair in the colour of its
    vectorised implementation; ``basis`` says what the times rest on (their samples)."""
    rows = speedups.dropna(subset=["speedup"])
    if rows.empty:
        raise NoData("no framework has both a vectorised and a looped implementation with results")
    batch = int(rows["batch_size"].max())
    rows = rows[rows["batch_size"] == batch]
    frame = rows.pivot_table(index="phase", columns="pair", values="speedup", aggfunc="first")
    phases = [phase for phase in (*PHASES, "routing_backward") if phase in frame.index]
    pairs = list(frame.columns)
    vectorised = rows.drop_duplicates("pair").set_index("pair")["vectorised"]
    fig, (ax,) = new_figure(width=max(8.0, 1.2 * len(phases) + 3))
    grouped_bars(ax, frame, phases, pairs, lambda pair: colour_of(vectorised[pair]), str,
                 lambda v: f"{v:.2f}×" if v < 10 else f"{v:.3g}×")
    ax.set_xticklabels([PHASE_LABELS[phase] for phase in phases])
    log = auto_log(ax, list(frame.to_numpy().ravel()) + [1.0])
    headroom(ax, log)
    ax.axhline(1.0, color="0.2", linewidth=1, linestyle=":", label="1× (no speed-up)")
    ax.set_xlabel("phase")
    ax.set_ylabel("speed-up (looped time / vectorised time, ×" + (", log scale)" if log else ")"))
    ax.grid(axis="y", **GRID)
    missing = sorted(set(speedups["pair"]) - set(pairs))
    note = f"no pair with results in this run: {', '.join(missing)}" if missing else ""
    return finish(fig, f"Vectorised over looped routing at batch size {batch} ({where})", notes(basis, note),
                  unique_handles([ax]))


ROUTING_GRADIENT_PANELS = (("backward", "backward"), ("train_step", "train step"),
                           ("routing_backward", "routing forward + backward alone"))


def saving_text(percent: float) -> str:
    """A bar's saving: whole percentages, one decimal under 1 % either way (-0.3%, never -0%)."""
    return f"{percent:.0f}%" if abs(percent) >= 1 else f"{percent:.1f}%"


def routing_gradient_saving(frame: pd.DataFrame, where: str, iterations: int) -> Figure:
    """The time the routing gradient ``final`` saves over ``full`` (1 - final / full, %), one panel per phase
    measured at both (the others named in the note, not drawn empty), bars per implementation grouped by
    batch size, each in its implementation's colour; from :func:`harness.reporting.tables.routing_gradient_table`."""
    if frame.empty:
        raise NoData("no implementation measured at both routing gradients in this run")
    panels = [(phase, title) for phase, title in ROUTING_GRADIENT_PANELS if frame[f"{phase}_saving"].notna().any()]
    if not panels:
        raise NoData("no phase measured at both routing gradients in this run")
    unmeasured = [title for phase, title in ROUTING_GRADIENT_PANELS if (phase, title) not in panels]
    implementations = sorted(frame["implementation"].unique())
    batches = sorted(int(batch) for batch in frame["batch_size"].unique())
    per_panel = max(11.0 / len(ROUTING_GRADIENT_PANELS), 1.1 * len(batches) + 4 / 3)
    fig, axes = new_figure(ncols=len(panels), width=max(8.0, per_panel * len(panels)))
    for ax, (phase, title) in zip(axes, panels):
        saving = 100 * frame.pivot_table(index="batch_size", columns="implementation", values=f"{phase}_saving",
                                         aggfunc="first", dropna=False).reindex(index=batches,
                                                                                columns=implementations)
        grouped_bars(ax, saving, batches, implementations, colour_of, str, saving_text)
        headroom(ax, False)
        ax.axhline(0.0, color="0.2", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("batch size")
        ax.grid(axis="y", **GRID)
    axes[0].set_ylabel("time saved by final over full (%)")
    single = frame[[column for column in frame.columns if column.endswith("_samples")]].le(1).any().any()
    note = notes("saving = 1 - time(final) / time(full) of the same implementation, batch and run; below 0: "
                 "final took longer", f"{iterations} routing iterations",
                 "times from 1 sample each: no spread to judge the difference by" if single else "",
                 f"not measured at both routing gradients in this run: {', '.join(unmeasured)}" if unmeasured else "")
    return finish(fig, f"What stopping the routing gradient before the last iteration saves ({where})", note,
                  unique_handles(axes))


ALGORITHM_COLOURS = {"dynamic": "#4c72b0", "self-attention": "#dd8452"}  # any other algorithm: a hash of its name
ALGORITHM_PANELS = (("train_step", "train step", "ms"), ("routing_backward", "routing forward + backward alone", "ms"),
                    ("host_model_and_step", "host memory of the model and a step", "MiB"),
                    ("gpu_memory_allocator_live", "GPU allocator: peak of live bytes", "MiB"))


def algorithm_colour(name: str) -> tuple:
    """The colour of a routing algorithm in every figure: a fixed table, any other name a stable hash."""
    if name in ALGORITHM_COLOURS:
        return to_rgb(ALGORITHM_COLOURS[name])
    return hashed_colour(name, plt.get_cmap("Dark2").colors)


def ratio_text(ratio: float) -> str:
    return "n/a" if not np.isfinite(ratio) else f"{ratio:.2f}×"


def routing_algorithms(frame: pd.DataFrame, where: str, iterations: int,
                       dynamic_alone: dict[str, list[str]] | None = None) -> Figure:
    """Each routing algorithm beside dynamic routing, from :func:`harness.reporting.tables.routing_algorithm_table`:
    one row of panels per figure measured (train step, routing forward + backward alone, and the memory the run
    has), one column per batch size; in each panel the implementations, a bar per algorithm in the algorithm's
    colour (times with their interquartile range where several samples stand behind them), and under each
    implementation's name its ratio of every other algorithm to dynamic; ``dynamic_alone`` (per algorithm, the
    implementations timed under dynamic routing alone) is named in the note."""
    if frame.empty:
        raise NoData("no implementation measured under a routing algorithm other than dynamic in this run")
    algorithms = table_algorithms(frame)
    panels = [(metric, title, unit) for metric, title, unit in ALGORITHM_PANELS  # measured under another algorithm
              if frame[[f"{metric}_{algorithm}" for algorithm in algorithms[1:]]].notna().any().any()]
    batches = sorted(int(batch) for batch in frame["batch_size"].unique())
    implementations = sorted(frame["implementation"].unique())
    width = max(9.0, len(batches) * (1.05 * len(implementations) + 1.6))
    fig, grid = plt.subplots(len(panels), len(batches), figsize=(width, max(5.2, 0.4 + 3.0 * len(panels))),
                             squeeze=False)
    scale = {"ms": 1e3, "MiB": 1 / MIB}
    timed = [f"{metric}_{algorithm}_samples" for metric in ("train_step", "routing_backward")
             for algorithm in algorithms]
    samples = [value for column in timed if column in frame for value in frame[column].dropna()]
    one = bool(samples) and all(value == 1 for value in samples)
    for row, (metric, title, unit) in enumerate(panels):
        for column, batch in enumerate(batches):
            ax = grid[row][column]
            rows = frame[frame["batch_size"] == batch].set_index("implementation").reindex(implementations)
            values = pd.DataFrame({algorithm: rows[f"{metric}_{algorithm}"] * scale[unit] for algorithm in algorithms})
            spread = None
            if unit == "ms":
                several = {algorithm: rows[f"{metric}_{algorithm}_samples"] > 1 for algorithm in algorithms}
                spread = tuple(pd.DataFrame({algorithm: (rows[f"{metric}_{algorithm}{q}"] * 1e3).where(
                    several[algorithm]) for algorithm in algorithms}) for q in ("_q25", "_q75"))
            grouped_bars(ax, values, implementations, algorithms, algorithm_colour, str, bar_value, spread=spread)
            log = auto_log(ax, values.to_numpy().ravel())
            headroom(ax, log)
            ax.set_xticklabels([name + "\n" + " · ".join(ratio_text(rows.loc[name, f"{metric}_ratio_{algorithm}"])
                                                          for algorithm in algorithms[1:])
                                for name in implementations], fontsize=7.5)
            ax.set_title(f"{title}, batch {batch}", fontsize=9.5)
            what = ("time per call (ms, 1 sample each" if one else "median time per call (ms") if unit == "ms" \
                else "memory (MiB"
            ax.set_ylabel(what + (", log scale)" if log else ")"), fontsize=8.5)
            ax.grid(axis="y", **GRID)
    ratios = " · ".join(f"{algorithm} / dynamic" for algorithm in algorithms[1:])
    note = notes(f"under each implementation: {ratios} of the same batch and run (below 1: it takes less); dynamic "
                 f"routing at {iterations} routing iterations, an algorithm that is not iterative in its one pass",
                 "times: " + samples_phrase(samples) if samples else "",
                 "host memory of the model and a step = resident memory at the step's peak minus before the model "
                 "was built" if any(metric == "host_model_and_step" for metric, _, _ in panels) else "",
                 *(f"timed under dynamic routing alone, not under {algorithm} (skipped): {', '.join(names)}"
                   for algorithm, names in (dynamic_alone or {}).items() if names))
    return finish(fig, f"Routing algorithms: each beside dynamic routing ({where})", note,
                  unique_handles([grid[0][0]]), legend_cols=len(algorithms))


GPU_MEMORY_PANELS = (
    ("gpu_memory_nvml", "NVML: device memory in use (all processes, CUDA context included)"),
    ("gpu_memory_allocator_live", "allocator: peak of bytes in live arrays"),
    ("gpu_memory_allocator_reserved", "allocator: peak of bytes held from the device (cache included)"),
)
OLD_GPU_MEMORY_PANEL = ("gpu_memory_allocator_mixed",
                        "allocator, old mixed figure: torch's live peak,\nCuPy's pool after the step")
HOST_MEMORY_PANELS = (
    ("host_memory_peak", "asv peakmem: benchmark process peak RSS"),
    ("host_memory", "RSS sampled every 1 ms during the step"),
)


def memory(table: pd.DataFrame, iterations: int, where: str, palette: dict | None = None) -> Figure:
    """Peak memory of a training step against batch size, each figure in a panel of its own and named
    apart: on GPU results NVML's device figure and the allocator's live and reserved peaks (an older run's
    one mixed allocator figure in a panel of its own, labelled as such); with no GPU result on this run,
    the host memory instead (asv's peakmem and the resident memory sampled during the step, each where the
    run measured it), saying so."""
    old_metric = OLD_GPU_MEMORY_PANEL[0]
    gpu = measured(table, [metric for metric, _ in GPU_MEMORY_PANELS] + [old_metric])
    gpu = gpu[gpu["routing_iterations"] == iterations]
    device = None
    if not gpu.empty:
        present = set(gpu["metric"])
        panels = [GPU_MEMORY_PANELS[0]]
        if present & {metric for metric, _ in GPU_MEMORY_PANELS[1:]} or old_metric not in present:
            panels += list(GPU_MEMORY_PANELS[1:])
        if old_metric in present:
            panels.append(OLD_GPU_MEMORY_PANEL)
        rows, title, device = gpu, f"GPU memory of one training step ({where})", "cuda"
    else:
        rows, title = measured(table, [metric for metric, _ in HOST_MEMORY_PANELS]), \
            f"Host memory of one training step (no GPU memory results on {where})"
        rows = rows[rows["routing_iterations"] == iterations]
        panels = [panel for panel in HOST_MEMORY_PANELS if panel[0] in set(rows["metric"])]
    if rows.empty:
        raise NoData("no GPU or host memory result")
    fig, axes = new_figure(ncols=len(panels), width=max(9.0, 5.5 * len(panels)))  # one panel: room for the legend
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


def share_text(percent: float) -> str:
    """A bar's share of the peak: two significant digits, whole numbers from 100 % up (an effective rate
    can pass the peak): 3.4%, 38%, 111%."""
    return f"{percent:.0f}%" if percent >= 100 else f"{percent:.2g}%"


def peak_share(table: pd.DataFrame, iterations: int, where: str) -> Figure:
    """Achieved GFLOP/s of each implementation and phase as a share of the run's one peak, the same for every
    implementation (``peak_source``: the hardware float32 peak, else the best GEMM measured), as bars: a share
    of the peak, not a roofline (no arithmetic intensity is drawn)."""
    rows = table[table["pct_of_peak"].notna() & (table["routing_iterations"] == iterations)]
    if rows.empty:
        raise NoData("no peak to divide by in this run (neither the hardware peak in its facts nor a GemmPeak "
                     "result): run the suite again with benchmarks/bench_peak.py")
    batch = largest_batch(rows)
    rows = rows[rows["batch_size"] == batch]
    sources = sorted({f"{source} {value:.0f} GFLOP/s"
                      for source, value in zip(rows.get("peak_source", []), rows["peak_gflops"])
                      if isinstance(source, str)})
    frame = rows.pivot_table(index="implementation", columns="metric", values="pct_of_peak", aggfunc="first")
    phases = [phase for phase in (*PHASES, "routing_backward") if phase in frame.columns]
    implementations = list(frame.index)
    fig, (ax,) = new_figure(width=max(8.0, 1.3 * len(implementations) + 3))
    grouped_bars(ax, frame, implementations, phases, lambda phase: PHASE_COLOURS[phase],
                 lambda phase: PHASE_LABELS[phase], share_text)
    log = auto_log(ax, frame.to_numpy().ravel())
    headroom(ax, log)
    if ax.get_ylim()[1] >= 100:
        ax.axhline(100, color="0.2", linewidth=1, linestyle=":", label="100% = the peak")
    ax.set_xlabel("implementation")
    ax.set_ylabel("% of peak" + (" (log scale)" if log else ""))
    ax.tick_params(axis="x", labelrotation=15 if len(implementations) > 5 else 0)
    ax.grid(axis="y", **GRID)
    note = notes("achieved GFLOP/s = the phase's analytic FLOPs / its time; 100% = one figure for every "
                 "implementation: " + ("; ".join(sources) or "the peak"),
                 ("times from 1 sample each" if single_samples(rows) else ""),
                 absent_note(table, implementations))
    return finish(fig, f"Share of the float32 peak at batch size {batch} ({where})",
                  note, unique_handles([ax]), legend_cols=4)


def training_label(record: dict, stem: str, duplicates: bool) -> str:
    train, _ = training_images(record)
    ranks = training_ranks(record)
    gradient = record.get("routing_gradient", "full")  # records from before the setting: full, the only one
    algorithm = record_routing_algorithm(record)
    label = (f"{record['implementation']} ({record.get('config_name', '?')} net, batch {record.get('batch_size', '?')}"
             f", {train:,} images" + (f", {ranks} ranks" if ranks > 1 else "")
             + (f", {algorithm} routing" if algorithm != "dynamic" else "")
             + (f", {gradient} routing gradient" if gradient != "full" else "") + ")")
    return f"{label} [{stem}]" if duplicates else label


def accuracy_view(accuracies: list[float]) -> tuple[float, float]:
    """The test-accuracy axis (%) of runs that learned: from a margin under the lowest point (a tenth of the
    span to 100 %, at least 0.25 points) to 100 %, or past the highest point where it is nearer than the
    margin, so that no point (one epoch of one run, say) sits on an edge of the axis."""
    lowest, highest = 100 * min(accuracies), 100 * max(accuracies)
    margin = max(0.25, ACCURACY_MARGIN * (100 - lowest))
    return lowest - margin, max(100.05, highest + margin)


def training_curves(records: list[tuple[str, dict]]) -> Figure:
    """Training loss per step and test accuracy per epoch against training time, one line per results
    file (``records``: (file stem, record) pairs), in the colour of its implementation (several runs of one
    implementation told apart by line style).  When the longest run is more than :data:`LOG_TIME_RANGE`
    times the shortest, the time axis is logarithmic, so that the short runs are not squeezed into a corner."""
    records = sorted(((stem, record) for stem, record in records if record.get("steps")), key=lambda item: item[0])
    if not records:
        raise NoData("no training results file with recorded steps")
    fig, (left, right) = new_figure(ncols=2, width=11)
    labels = [training_label(record, stem, False) for stem, record in records]
    seen: dict[str, int] = {}
    ends, starts = [], []
    for index, (stem, record) in enumerate(records):
        label = training_label(record, stem, labels.count(labels[index]) > 1)
        name = record["implementation"]
        style = RUN_LINESTYLES[seen.get(name, 0) % len(RUN_LINESTYLES)]
        seen[name] = seen.get(name, 0) + 1
        colour = colour_of(name)
        steps = pd.DataFrame(record["steps"])
        left.plot(steps["elapsed_seconds"], steps["loss"], color=colour, linewidth=1, linestyle=style, label=label)
        ends.append(float(steps["elapsed_seconds"].max()))
        starts.append(float(steps["elapsed_seconds"].min()))
        epochs = pd.DataFrame(record.get("epochs") or [])
        if not epochs.empty:
            right.plot(epochs["elapsed_seconds"], 100 * epochs["test_accuracy"], color=colour, marker="o",
                       linestyle=style, label=label)
    left.set_ylabel("training loss (margin + reconstruction)")
    left.set_title("Loss per training step", fontsize=10)
    right.set_ylabel("test accuracy (%)")
    right.set_title("Test accuracy after each epoch", fontsize=10)
    accuracy = [epoch.get("test_accuracy", 0) for _, record in records for epoch in record.get("epochs") or []]
    high = [value for value in accuracy if value >= ACCURACY_ZOOM]
    if not high:
        right.set_ylim(0, 101)  # short runs only: the whole scale, so a few points of noise look like noise
    else:  # the scale of the runs that learned; short runs beside them are named off the axis, not squashed
        right.set_ylim(*accuracy_view(high))
        if len(high) < len(accuracy):
            right.set_title(f"Test accuracy after each epoch\n(epochs below {ACCURACY_ZOOM:.0%} are below the "
                            "axis: see the table)", fontsize=10)
    positive = [start for start in starts if start > 0]
    log = bool(positive) and max(ends) / max(min(ends), 1e-12) > LOG_TIME_RANGE
    for ax in (left, right):
        if log:
            log_axis(ax, "x")
            ax.set_xlim(min(positive) / 1.5, max(ends) * 1.3)
            ax.set_xlabel("training time (s, train steps only, log scale)")
        else:
            ax.set_xlim(left=0)
            ax.set_xlabel("training time (s, train steps only)")
        ax.grid(**GRID)
    where = machines_text([record.get("machine") for _, record in records])
    return finish(fig, f"Training loss and test accuracy against training time, train steps only ({where})",
                  "training time: the sum of the training steps' own times (evaluation, data preparation and saving "
                  "left out)", unique_handles([left, right]), legend_cols=2)


def distributed_scaling(frame: pd.DataFrame) -> Figure:
    """Images/s against world size with the ideal linear line, and scaling efficiency, one line per
    distributed results file (``frame``: :func:`harness.reporting.tables.distributed_table` rows), in the colour of
    its implementation (several files of one implementation told apart by marker)."""
    if frame.empty:
        raise NoData("no distributed scaling results")
    fig, (left, right) = new_figure(ncols=2, width=11)
    seen: dict[str, int] = {}
    for label, group in frame.sort_values("world_size").groupby("label", sort=True):
        name = str(group["implementation"].iloc[0])
        marker = ("o", "s", "^", "D")[seen.get(name, 0) % 4]
        seen[name] = seen.get(name, 0) + 1
        colour = colour_of(name)
        left.plot(group["world_size"], group["images_per_second"], marker=marker, color=colour, label=label)
        left.plot(group["world_size"], group["ideal_images_per_second"], linestyle=":", color=colour,
                  label=f"{label}: ideal (linear in the compute used)")
        right.plot(group["world_size"], 100 * group["efficiency"], marker=marker, color=colour, label=label)
    right.axhline(100, color="0.2", linewidth=1, linestyle=":")
    integer_log_axis(left, frame["world_size"])
    integer_log_axis(right, frame["world_size"])
    log_axis(left, "y")
    left.set_ylabel("images per second (log scale)")
    left.set_title("Throughput", fontsize=10)
    right.set_ylabel("scaling efficiency (% of linear in the compute used)")
    right.set_ylim(0, max(110, 105 * np.nanmax(frame["efficiency"].to_numpy())))
    right.set_title("Scaling efficiency", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("world size (processes, log scale)")
        ax.grid(**GRID)
    where = machines_text(list(frame["machine"])) if "machine" in frame else "?"
    flat = any(group["compute_units"].nunique() == 1 for _, group in frame.groupby("label"))
    note = ("ideal (dotted): the smallest world size's images/s times the growth of the compute used (CPU: ranks × "
            "threads per rank; GPU: ranks)." + (
                " A flat ideal line: the ranks split a fixed set of cores, so the compute used does not grow and "
                "linear scaling means the same throughput as one rank." if flat else ""))
    return finish(fig, f"Data-parallel scaling: throughput and efficiency against world size ({where})", note,
                  unique_handles([left, right]), legend_cols=1)


def short_layer(layer: str) -> str:
    if layer.startswith("routing_iteration_"):
        return "routing " + layer.rsplit("_", 1)[-1]
    return SHORT_LAYERS.get(layer, layer)


def text_colour(colour) -> str:
    red, green, blue = to_rgb(colour)
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.55 else "white"


def profile_breakdown(profile: Profile) -> Figure:
    """Where a training step goes: a panel per implementation, a bar per phase (forward, backward, update)
    stacked by layer in the time per step (median over the profiled steps), each segment of at least 4 %
    of the step labelled with its share."""
    names = profile.implementations()
    if not names:
        raise NoData("no implementation in the profile")
    columns = min(len(names), 3)
    rows_of_panels = math.ceil(len(names) / columns)
    fig, grid = plt.subplots(rows_of_panels, columns, figsize=(4.3 * columns + 1.2, 4.4 * rows_of_panels + 1.6),
                             squeeze=False)
    axes = list(grid.ravel())
    legend: dict[str, object] = {}
    tallest = 0.0
    for ax, name in zip(axes, names):
        rows = profile_rows(profile, name)
        phases = [phase for phase in PROFILE_PHASES if phase in set(rows["phase"])]
        layers = list(dict.fromkeys(rows.sort_values(["order", "layer"], kind="stable")["layer"]))
        bottoms = np.zeros(len(phases))
        for layer in layers:
            cells = rows[rows["layer"] == layer].set_index("phase")
            heights = np.nan_to_num(np.array([cells["time_s"].get(phase, 0.0) * 1e3 for phase in phases],
                                             dtype=float))  # a layer a plugin does not time: no segment
            shares = [cells["share"].get(phase, math.nan) for phase in phases]
            colour = layer_colour(layer)
            bars = ax.bar(range(len(phases)), heights, 0.62, bottom=bottoms, color=colour, label=layer,
                          edgecolor="white", linewidth=0.6)
            legend.setdefault(short_layer(layer), bars)  # the names the segments' labels use ("Adam")
            for position, height, bottom, share in zip(range(len(phases)), heights, bottoms, shares):
                if np.isfinite(share) and share >= 0.04:
                    ax.text(position, bottom + height / 2, f"{short_layer(layer)} {share:.0%}", ha="center",
                            va="center", fontsize=6.5, color=text_colour(colour))
            bottoms = bottoms + heights
        about = profile.about(name)
        step = about.get("step_s")
        summed = float(np.nansum(rows["time_s"])) * 1e3
        for position, total in enumerate(bottoms):
            ax.annotate(f"{bar_value(total)} ms", (position, total), ha="center", va="bottom", fontsize=7.5,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(phases)))
        ax.set_xticklabels(phases)
        tallest = max(tallest, float(bottoms.max()))
        steps = rows["steps"].dropna()
        count = f"{int(steps.iloc[0])} steps" if len(steps) else "? steps"
        ax.set_ylabel(f"time per step (ms, median of {count})" if len(steps) and steps.iloc[0] > 1
                      else "time per step (ms, 1 step)")
        head = f"{name}, batch {int(rows['batch_size'].iloc[0])}" if rows["batch_size"].notna().any() else name
        step_text = (f"step {bar_value(step * 1e3)} ms profiled; layers add to {bar_value(summed)} ms"
                     if isinstance(step, (int, float)) else f"layers add to {bar_value(summed)} ms")
        ax.set_title(f"{head}\n{step_text}", fontsize=9)
        ax.grid(axis="y", **GRID)
    for ax in axes[: len(names)]:  # one y-range for every panel: bar heights compare across implementations
        ax.set_ylim(0, max(tallest, 1e-9) * 1.12)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    machine = (profile.meta.get("machine") or {}) if isinstance(profile.meta, dict) else {}
    where = machines_text([machine])
    return finish(fig, f"Where the time of a training step goes, by phase and layer ({where})",
                  "labels: the layer's share of the profiled step (segments of 4 % and more); every panel on the "
                  "same time scale",
                  (list(legend.values()), list(legend.keys())), legend_cols=6)
