"""The report's figures (harness.reporting.plots) as a reader sees them: every tick of a log axis labelled, colours
fixed per implementation whatever else is drawn, training curves readable when one run is far longer, the
samples behind a time said on the figure, and the profile's stacked bars adding up to the hand-written
fixture's numbers."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from harness.reporting import plots
from harness.reporting.tables import speedup_table
from harness.results import load_profile_result
from harness.suite.asv_results import tidy_frame

PROFILE = Path(__file__).parent / "fixtures" / "report" / "profile"


def tidy(rows: list[dict]) -> pd.DataFrame:
    return tidy_frame([{"framework": "torch", "device": "cpu", "backend": "torch", "unit": "seconds",
                        "status": "ok", "machine": "box", "commit": "a", "env": "py", "config_name": "paper",
                        **r, "benchmark": f"time_{r['metric']}"} for r in rows])


def timings(names=("torch-vectorised", "torch-looped"), samples=1, spread=0.0) -> pd.DataFrame:
    """Times over a wide range (so that axes go logarithmic), every phase, two batch sizes, three iteration
    counts; ``spread`` makes q25/q75 that far either side of the value."""
    rows = []
    for index, name in enumerate(names):
        variant = "looped" if "looped" in name else "vectorised"
        for batch in (32, 128):
            for iterations in (1, 3, 5):
                for phase, base in (("forward", 0.02), ("backward", 0.05), ("train_step", 0.08),
                                    ("inference", 0.015), ("routing", 0.0004), ("routing_backward", 0.001)):
                    value = base * batch / 32 * (1 + index) * iterations
                    rows.append({"implementation": name, "routing_variant": variant, "batch_size": batch,
                                 "routing_iterations": iterations, "metric": phase, "value": value,
                                 "q25": value * (1 - spread), "q75": value * (1 + spread), "samples": samples,
                                 "pct_of_peak": 40.0 / (1 + index) if phase != "routing" else 0.2})
    return tidy(rows)


def labelled_everywhere(fig) -> list[str]:
    """Each log axis of ``fig`` whose ticks in view are not all labelled, described; [] when all are."""
    fig.canvas.draw()
    problems = []
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            if axis.get_scale() != "log":
                continue
            low, high = sorted(axis.get_view_interval())
            for minor in (False, True):
                for tick, label in zip(axis.get_ticklocs(minor=minor), axis.get_ticklabels(minor=minor)):
                    if low * (1 - 1e-9) <= tick <= high * (1 + 1e-9) and not label.get_text().strip():
                        problems.append(f"{ax.get_title()!r} {name} {'minor' if minor else 'major'} tick {tick:g}")
            shown = [t for t in axis.get_ticklocs() if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]
            if len(shown) < 2:
                problems.append(f"{ax.get_title()!r} {name}: {len(shown)} labelled tick(s)")
    plots.plt.close(fig)
    return problems


def training_record(name: str, seconds: float, steps: int = 50, images: int = 512) -> dict:
    times = np.linspace(seconds / steps, seconds, steps)
    return {"implementation": name, "config_name": "small", "batch_size": 64, "limit": images, "test_limit": 100,
            "steps": [{"epoch": 1, "step": i + 1, "loss": 0.9 - 0.5 * i / steps, "elapsed_seconds": float(t)}
                      for i, t in enumerate(times)],
            "epochs": [{"epoch": 1, "mean_loss": 0.5, "test_accuracy": 0.5, "train_seconds": seconds,
                        "images": images, "elapsed_seconds": seconds}]}


def test_every_tick_of_every_log_axis_is_labelled():
    table = timings()
    figures = {
        "phase_times": plots.phase_times(table, 3, "box"),
        "batch_scaling": plots.batch_scaling(table, 3, "box"),
        "routing_iterations": plots.routing_iterations(table, "box"),
        "peak_share": plots.peak_share(table, 3, "box"),
        "vectorised_speedup": plots.vectorised_speedup(speedup_table(table, 3).assign(
            speedup=lambda f: f["speedup"] * np.where(f["phase"] == "routing", 100, 1)), "box"),
        "training_curves": plots.training_curves([("short", training_record("torch-looped", 5.0)),
                                                  ("long", training_record("torch-vectorised", 500.0))]),
    }
    for name, figure in figures.items():
        logs = [axis for ax in figure.axes for axis in (ax.xaxis, ax.yaxis) if axis.get_scale() == "log"]
        assert logs, f"{name} has no log axis to check"
        assert labelled_everywhere(figure) == [], name


@pytest.mark.parametrize("low, high", [(0.3, 1500.0), (1.0, 1e6), (80.0, 95.0), (0.004, 0.02), (122.3, 124.0)])
def test_the_log_locator_labels_a_readable_number_of_ticks(low, high):
    ticks = plots.LabelledLogLocator().tick_values(low, high)
    assert 3 <= len(ticks) <= 9 and all(low <= t <= high for t in ticks)
    assert all("e" not in plots.tick_text(t) for t in ticks)


def line_colours(fig) -> dict[str, tuple]:
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                colours[line.get_label()] = to_rgb(line.get_color())
    plots.plt.close(fig)
    return colours


def test_adding_an_implementation_recolours_nothing():
    alone = line_colours(plots.batch_scaling(timings(("torch-vectorised", "torch-looped")), 3, "box"))
    # a plugin whose name sorts first, and a built-in one: neither changes the colours already drawn
    more = line_colours(plots.batch_scaling(timings(("aaa-plugin", "cupy-vectorised", "torch-vectorised",
                                                     "torch-looped")), 3, "box"))
    for name in ("torch-vectorised", "torch-looped"):
        assert alone[name] == more[name] == to_rgb(plots.IMPLEMENTATION_COLOURS[name])
    assert len({more[name] for name in more}) == 4  # four names, four colours


def test_builtin_names_have_distinct_fixed_colours_and_variants_a_shade_of_them():
    builtin = ["torch-vectorised", "torch-looped", "numpy-vectorised", "numpy-looped", "cupy-vectorised",
               "cupy-looped", "torch-vectorised-cuda", "torch-looped-cuda", "torch-fused", "torch-fused-cuda",
               "cupy-fused", "jax-vectorised", "jax-looped", "jax-vectorised-cuda", "jax-looped-cuda"]
    colours = [plots.colour_of(name) for name in builtin]
    assert len(set(colours)) == len(builtin)
    compiled = plots.colour_of("torch-vectorised-compiled")
    graph = plots.colour_of("torch-vectorised-cuda-graph")
    assert compiled not in colours and graph not in colours and compiled != graph


def test_a_hashed_colour_is_the_same_in_every_process():
    """An unknown name's colour comes from its name alone (not Python's salted hash, not its rank)."""
    code = "from harness.reporting import plots; print(plots.colour_of('my-plugin-impl'))"
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1],  # this checkout's harness
                              env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert outputs == {f"{plots.colour_of('my-plugin-impl')}\n"}


def test_training_runs_keep_their_colour_when_a_run_is_added():
    short = training_record("torch-looped", 5.0)
    alone = line_colours(plots.training_curves([("b", short)]))
    more = line_colours(plots.training_curves([("a", training_record("numpy-vectorised", 6.0)), ("b", short)]))
    label = next(iter(alone))
    assert alone[label] == more[label]


def test_five_training_runs_of_one_implementation_have_five_line_styles():
    """The shipped results hold five torch-fused runs (two routing gradients, two routing algorithms, a
    schedule): with four styles the fifth run's loss curve looked like the first's."""
    figure = plots.training_curves([(f"run{k}", training_record("torch-fused", 5.0 + k)) for k in range(5)])
    dashes = [tuple(line._dash_pattern[1] or ()) for line in figure.axes[0].get_lines()]  # solid: ()
    assert len(dashes) == 5 and len(set(dashes)) == 5, dashes


def test_training_curves_are_readable_when_one_run_is_a_hundred_times_longer():
    fig = plots.training_curves([("short", training_record("torch-looped", 5.0)),
                                 ("long", training_record("torch-vectorised", 500.0))])
    loss = fig.axes[0]
    short = next(line for line in loss.get_lines() if line.get_label().startswith("torch-looped"))
    x_end = short.get_xdata()[-1]
    # where the short run ends, as a fraction of the axis' width
    fraction = loss.transAxes.inverted().transform(loss.transData.transform((x_end, 0.5)))[0]
    plots.plt.close(fig)
    assert fraction > 0.3, f"the 5 s run ends at {fraction:.0%} of the time axis"


def test_the_accuracy_axis_shows_the_tenths_of_a_run_that_learned_beside_a_short_one():
    """99.3 % and 99.5 % must be told apart even when a 53 % run of a few hundred images is in the same plot."""
    learned = training_record("torch-fused", 500.0)
    learned["epochs"] = [{"epoch": e, "test_accuracy": a, "elapsed_seconds": 100.0 * e}
                         for e, a in ((1, 0.9881), (2, 0.9934), (3, 0.9949))]
    fig = plots.training_curves([("short", training_record("torch-looped", 5.0)), ("long", learned)])
    accuracy = fig.axes[1]
    low, high = accuracy.get_ylim()
    title = accuracy.get_title()
    plots.plt.close(fig)
    assert 98.0 < low < 98.81 and 99.49 < high <= 100.1
    assert "below 80%" in title
    alone = plots.training_curves([("short", training_record("torch-looped", 5.0))])
    assert alone.axes[1].get_ylim() == (0.0, 101.0)  # short runs alone: the whole scale
    plots.plt.close(alone)


def test_a_figure_of_single_samples_says_so_and_one_of_several_draws_the_spread():
    single = plots.phase_times(timings(samples=1), 3, "box")
    assert "1 sample" in single.axes[0].get_ylabel() and "median" not in single.axes[0].get_ylabel()
    assert not any(len(c.get_segments()) for c in single.axes[0].collections)  # no error bars
    plots.plt.close(single)
    several = plots.phase_times(timings(samples=10, spread=0.1), 3, "box")
    assert "median" in several.axes[0].get_ylabel()
    bars = [c for c in several.axes[0].collections if len(c.get_segments())]
    assert bars, "no interquartile error bars"
    segments = np.concatenate([np.asarray(c.get_segments()) for c in bars])
    # torch-vectorised's train step at batch 128, 3 iterations: 0.08 s x 4 x 3 = 960 ms, q25-q75 +-10 %
    spans = {(round(seg[0][1], 1), round(seg[1][1], 1)) for seg in segments}
    plots.plt.close(several)
    assert (864.0, 1056.0) in spans


def test_the_old_mixed_allocator_figure_is_a_panel_of_its_own_only_for_old_runs():
    def gpu(metric):
        return [{"implementation": "torch-vectorised-cuda", "device": "cuda", "routing_variant": "vectorised",
                 "batch_size": b, "routing_iterations": 3, "metric": metric, "value": 1e9 * b / 32,
                 "unit": "bytes"} for b in (32, 128)]
    old = plots.memory(tidy(gpu("gpu_memory_nvml") + gpu("gpu_memory_allocator_mixed")), 3, "box")
    titles = [ax.get_title() for ax in old.axes]
    plots.plt.close(old)
    assert any("old mixed" in title for title in titles) and not any("live arrays" in title for title in titles)
    new = plots.memory(tidy(gpu("gpu_memory_nvml") + gpu("gpu_memory_allocator_live")
                            + gpu("gpu_memory_allocator_reserved")), 3, "box")
    titles = [ax.get_title() for ax in new.axes]
    plots.plt.close(new)
    assert not any("old mixed" in title for title in titles)
    assert any("live arrays" in title for title in titles) and any("held from the device" in t for t in titles)


def test_the_host_memory_plot_draws_only_the_figures_the_run_measured():
    """README's main job measures the sampled host memory and not asv's peakmem: one panel, not an empty one
    beside it; a run with both draws both."""
    def host(metric):
        return [{"implementation": "numpy-vectorised", "device": "cpu", "routing_variant": "vectorised",
                 "batch_size": b, "routing_iterations": 3, "metric": metric, "value": 1e9 * b / 32,
                 "unit": "bytes"} for b in (32, 128)]
    sampled = plots.memory(tidy(host("host_memory")), 3, "box")
    titles = [ax.get_title() for ax in sampled.axes if ax.get_visible()]
    plots.plt.close(sampled)
    assert titles == ["RSS sampled every 1 ms during the step"]
    both = plots.memory(tidy(host("host_memory") + host("host_memory_peak")), 3, "box")
    assert len([ax for ax in both.axes if ax.get_visible()]) == 2
    plots.plt.close(both)


def test_the_profile_plot_stacks_each_phase_to_the_fixture_numbers():
    profile = load_profile_result(PROFILE, [])
    fig = plots.profile_breakdown(profile)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split(",")[0] for ax in panels] == ["torch-vectorised", "numpy-looped"]
    expected = {"torch-vectorised": {"forward": 16.0, "backward": 18.0, "update": 4.0},  # ms, by hand
                "numpy-looped": {"forward": 40.0, "backward": 20.0, "update": 10.0}}
    for ax in panels:
        name = ax.get_title().split(",")[0]
        phases = [label.get_text() for label in ax.get_xticklabels()]
        assert phases == ["forward", "backward", "update"]
        tops = {}
        for patch in ax.patches:
            position = phases[round(patch.get_x() + patch.get_width() / 2)]
            tops[position] = max(tops.get(position, 0.0), patch.get_y() + patch.get_height())
        assert tops == pytest.approx(expected[name])
        colours = {patch.get_label(): to_rgb(patch.get_facecolor()) for patch in ax.patches
                   if not patch.get_label().startswith("_")}
        for layer, colour in colours.items():
            assert colour == pytest.approx(plots.layer_colour(layer))
    texts = [text.get_text() for ax in panels for text in ax.texts]
    assert "primary caps 30%" in texts and "routing 1 38%" in texts  # each segment's share of the step
    assert any("step 40 ms profiled; layers add to 38 ms" in ax.get_title() for ax in panels)
    plots.plt.close(fig)
    assert math.isclose(sum(expected["torch-vectorised"].values()) / 40.0, 0.95)


def test_titles_name_the_environment_and_say_what_the_axes_measure():
    record = {**training_record("torch-looped", 5.0), "machine": {"hostname": "box", "cpu": "EPYC"}}
    fig = plots.training_curves([("short", record)])
    title = fig._suptitle.get_text().replace("\n", " ")
    assert "training time, train steps only (box, EPYC)" in title and "wall-clock" not in title
    assert all("train steps only" in ax.get_xlabel() for ax in fig.axes[:2])
    plots.plt.close(fig)


def test_batch_scaling_puts_throughput_on_a_linear_axis_from_zero():
    fig = plots.batch_scaling(timings(), 3, "box")
    time_axis, throughput = fig.axes[:2]
    assert time_axis.get_yscale() == "log" and throughput.get_yscale() == "linear"
    assert throughput.get_ylim()[0] == 0 and "linear" in throughput.get_ylabel()
    plots.plt.close(fig)


def test_a_flat_ideal_line_of_distributed_scaling_is_explained_in_the_plot():
    from harness.reporting.tables import distributed_table

    def run(world_size, threads, images_per_second):
        return {"world_size": world_size, "threads_per_rank": threads, "per_rank_batch_size": 64 // world_size,
                "global_batch_size": 64, "steps": 10, "step_seconds": 64 / images_per_second,
                "images_per_second": images_per_second, "allreduce_seconds": None, "allreduce_share": None}

    record = {"implementation": "torch-vectorised", "backend": "gloo", "device": "cpu", "scaling": "strong",
              "machine": {"hostname": "box", "cpu": "EPYC"}, "runs": [run(1, 2, 95.0), run(2, 1, 98.0)]}
    fig = plots.distributed_scaling(distributed_table([(Path("s.json"), record)]))
    texts = " ".join(text.get_text() for text in fig.texts).replace("\n", " ")
    assert "A flat ideal line: the ranks split a fixed set of cores" in texts
    assert "(box, EPYC)" in fig._suptitle.get_text().replace("\n", " ")
    plots.plt.close(fig)


def test_the_profile_panels_share_one_time_scale_and_the_legend_says_adam():
    fig = plots.profile_breakdown(load_profile_result(PROFILE, []))
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_xticklabels()]
    assert len(panels) > 1 and len({ax.get_ylim() for ax in panels}) == 1
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert "Adam" in legend and "optimizer" not in legend
    plots.plt.close(fig)


def bar_labels(ax) -> dict[str, float]:
    """Each bar label of ``ax``: its text and the height it is anchored at."""
    return {text.get_text(): text.xy[1] for text in ax.texts}


def test_a_share_past_the_peak_is_labelled_as_a_whole_percentage():
    """An effective rate can pass 100 % of the peak; its bar says 111%, not 1.1e+02%."""
    table = timings()
    table = table.assign(pct_of_peak=np.where(table["implementation"] == "torch-vectorised", 111.2,
                                              np.where(table["metric"] == "routing", 3.44, 38.2)))
    fig = plots.peak_share(table, 3, "box")
    texts = set(bar_labels(fig.axes[0]))
    plots.plt.close(fig)
    assert {"111%", "38%", "3.4%"} <= texts and not any("e+" in text for text in texts)


def saving_frame(train_step: list[float], other=float("nan")) -> pd.DataFrame:
    """routing_gradient_table's shape for torch-fused and torch-vectorised at batch 128: train-step savings
    as given, the backward and routing-alone savings ``other``."""
    names = ["torch-fused", "torch-vectorised"]
    return pd.DataFrame({"implementation": names, "batch_size": [128, 128], "train_step_saving": train_step,
                         "backward_saving": [other, other], "routing_backward_saving": [other, other],
                         "train_step_full_samples": [5, 5], "train_step_final_samples": [5, 5]})


def test_the_routing_gradient_plot_draws_only_the_phases_measured_at_both_and_labels_a_loss_under_its_bar():
    fig = plots.routing_gradient_saving(saving_frame([0.18, -0.02]), "box", 3)
    (ax,) = fig.axes
    assert ax.get_title() == "train step"
    labels = bar_labels(ax)
    assert labels == {"18%": pytest.approx(18.0), "-2%": pytest.approx(-2.0)}
    small = plots.routing_gradient_saving(saving_frame([0.18, -0.003]), "box", 3)
    assert set(bar_labels(small.axes[0])) == {"18%", "-0.3%"}  # not -0%
    plots.plt.close(small)
    assert ax.get_ylim()[0] < -2.0  # room under the negative bar for its label
    note = " ".join(text.get_text() for text in fig.texts).replace("\n", " ")
    plots.plt.close(fig)
    assert "not measured at both routing gradients in this run: backward, routing forward + backward alone" in note
    everything = plots.routing_gradient_saving(saving_frame([0.18, -0.02], other=0.1), "box", 3)
    assert [ax.get_title() for ax in everything.axes] == ["backward", "train step", "routing forward + backward alone"]
    assert "not measured" not in " ".join(text.get_text() for text in everything.texts)
    plots.plt.close(everything)
    with pytest.raises(plots.NoData, match="no phase measured at both"):
        plots.routing_gradient_saving(saving_frame([float("nan")] * 2), "box", 3)


def with_absent(table: pd.DataFrame, count: int = 14) -> pd.DataFrame:
    """``table`` with ``count`` more implementations that have no result (a long "no result" note)."""
    absent = tidy([{"implementation": f"cupy-vectorised-cuda-graph-{index}", "routing_variant": "vectorised",
                    "batch_size": 32, "routing_iterations": 3, "metric": "train_step", "value": float("nan"),
                    "samples": 1} for index in range(count)])
    return pd.concat([table, absent], ignore_index=True)


def test_no_y_label_is_taller_than_its_axes_so_none_reaches_a_title():
    """batch_scaling of single samples under a long note: "images per second (linear, from 0), 1 sample each"
    ran past the top of its panel up to the figure's title; a label too long for its axes is broken into lines."""
    fig = plots.batch_scaling(with_absent(timings(samples=1)), 3, "vm-xeon @ 27963257, py3.11-torch2.13.0")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    titles = [fig._suptitle.get_window_extent(renderer)] + [ax.title.get_window_extent(renderer) for ax in fig.axes]
    for ax in fig.axes:
        label, box = ax.yaxis.label.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.y0 - 1 <= label.y0 and label.y1 <= box.y1 + 1, f"{ax.yaxis.label.get_text()!r} outruns its axes"
        assert not any(label.overlaps(title) for title in titles)
    assert fig.axes[0].get_ylabel() == "train-step time\n(ms, 1 sample each, log scale)"  # broken, not cut short
    plots.plt.close(fig)


def accuracy_points(fig) -> list[float]:
    """Where each test-accuracy point of ``fig`` lies on its axis' height (0: bottom edge, 1: top edge)."""
    accuracy = fig.axes[1]
    points = np.concatenate([np.column_stack([line.get_xdata(), line.get_ydata()]) for line in accuracy.get_lines()])
    fractions = accuracy.transAxes.inverted().transform(accuracy.transData.transform(points))[:, 1]
    plots.plt.close(fig)
    return list(fractions)


@pytest.mark.parametrize("accuracy", [0.85, 0.803, 0.9999])
def test_a_single_accuracy_point_lies_inside_its_axis_not_on_an_edge(accuracy):
    """One epoch of one run at 85 % drew 84.75-100.05: the point 1.6 % above the bottom edge of the axis."""
    record = training_record("torch-fused", 500.0)
    record["epochs"] = [{"epoch": 1, "test_accuracy": accuracy, "elapsed_seconds": 500.0}]
    fractions = accuracy_points(plots.training_curves([("one", record)]))
    assert fractions and all(0.05 <= fraction <= 0.95 for fraction in fractions), fractions


def long_labelled_runs() -> list[tuple[str, dict]]:
    """Nine runs with labels as long as the shipped ones (three files of one implementation and setting)."""
    runs = []
    for index, name in enumerate(["jax-vectorised", "numpy-looped", "numpy-vectorised", "torch-fused", "torch-fused",
                                  "torch-fused", "torch-looped", "torch-vectorised", "torch-vectorised"]):
        record = training_record(name, 10.0 * (index + 1), images=60_000)
        record.update(config_name="paper", batch_size=128, routing_gradient="final" if index == 3 else "full")
        runs.append((f"{name}_paper_schedule_run{index}", record))
    return runs


def test_training_curves_keep_their_panels_tall_and_the_legend_clear_of_them():
    """Nine long legend entries under the panels squeezed the loss panel to an inch (a fifth of the figure)."""
    fig = plots.training_curves(long_labelled_runs())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    legend_box = legend.get_window_extent(renderer)
    assert len(legend.get_texts()) == 9 and legend_box.x0 >= 0 and legend_box.x1 <= fig.bbox.width
    for ax in fig.axes[:2]:
        assert ax.get_window_extent(renderer).height / fig.dpi >= 2.6, ax.get_title()
        assert not ax.get_tightbbox(renderer).overlaps(legend_box), ax.get_title()
    plots.plt.close(fig)


def test_a_legend_of_long_names_takes_fewer_columns_instead_of_running_off_the_figure():
    """Four columns of long pair names ran past both edges of vectorised_speedup (entries cut in half)."""
    names = [f"plugin-{index}-{'x' * 30}-vectorised" for index in range(4)]
    fig = plots.batch_scaling(timings(names), 3, "box")
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent(fig.canvas.get_renderer())
    assert len(legend.get_texts()) == 4 and 0 <= box.x0 and box.x1 <= fig.bbox.width
    plots.plt.close(fig)


def algorithm_frame(samples: int = 5, train_step_under_both: bool = False) -> pd.DataFrame:
    """routing_algorithm_table of torch-fused (routing forward + backward 80 ms dynamic, 32 ms self-attention)
    and numpy-vectorised (100 ms, 60 ms) at batch 128, quartiles 10 % either side; torch-looped under dynamic
    routing alone; the train step under dynamic routing alone unless ``train_step_under_both``."""
    from harness.reporting.tables import routing_algorithm_table

    rows = []
    for name, dynamic, attention in (("torch-fused", 0.080, 0.032), ("numpy-vectorised", 0.100, 0.060),
                                     ("torch-looped", 0.3, math.nan)):
        for algorithm, value in (("dynamic", dynamic), ("self-attention", attention)):
            for metric, scale in (("routing_backward", 1.0), ("train_step", 5.0)):
                if metric == "train_step" and algorithm != "dynamic" and not train_step_under_both:
                    continue
                rows.append({"implementation": name, "routing_variant": "vectorised", "batch_size": 128,
                             "routing_iterations": 3, "metric": metric, "value": value * scale,
                             "q25": 0.9 * value * scale, "q75": 1.1 * value * scale, "samples": samples,
                             "routing_algorithm": algorithm})
    return routing_algorithm_table(tidy(rows), 3, {"self-attention": False})


def test_the_routing_algorithm_plot_draws_what_another_algorithm_measured_with_each_ratio_under_its_name():
    from harness.reporting.tables import timed_under_dynamic_alone

    frame = algorithm_frame()
    fig = plots.routing_algorithms(frame, "box", 3, {"self-attention": ["torch-looped"]})
    (ax,) = fig.axes  # the train step was measured under dynamic routing alone: no panel of it
    assert ax.get_title() == "routing forward + backward alone, batch 128"
    assert [label.get_text() for label in ax.get_xticklabels()] == ["numpy-vectorised\n0.60×", "torch-fused\n0.40×"]
    assert bar_labels(ax) == {"100": pytest.approx(110.0), "60": pytest.approx(66.0), "80": pytest.approx(88.0),
                              "32": pytest.approx(35.2)}  # each label over its bar's q75
    assert len(ax.collections) == 2  # the q25-q75 bars
    assert ax.get_ylabel().replace("\n", " ") == "median time per call (ms)"
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["dynamic", "self-attention"]
    note = " ".join(text.get_text() for text in fig.texts).replace("\n", " ")
    assert "timed under dynamic routing alone, not under self-attention (skipped): torch-looped" in note
    assert "median of 5 samples" in note
    plots.plt.close(fig)
    single = plots.routing_algorithms(algorithm_frame(samples=1, train_step_under_both=True), "box", 3)
    assert [ax.get_title() for ax in single.axes] == ["train step, batch 128",
                                                      "routing forward + backward alone, batch 128"]
    assert all(not ax.collections and "1 sample each" in ax.get_ylabel().replace("\n", " ") for ax in single.axes)
    plots.plt.close(single)
    with pytest.raises(plots.NoData, match="no implementation measured under a routing algorithm other than"):
        plots.routing_algorithms(frame.iloc[0:0], "box", 3)
    assert timed_under_dynamic_alone(tidy([]).assign(routing_algorithm=[]), frame.iloc[0:0]) == {
        "self-attention": []}


def test_an_algorithm_keeps_its_colour_and_another_gets_one_of_its_own():
    assert plots.algorithm_colour("dynamic") == to_rgb(plots.ALGORITHM_COLOURS["dynamic"])
    assert plots.algorithm_colour("self-attention") != plots.algorithm_colour("dynamic")
    assert plots.algorithm_colour("plugin-routing") == plots.algorithm_colour("plugin-routing")
