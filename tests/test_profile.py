"""python -m harness.profile on the small network: every layer of every phase for every built-in CPU
implementation, FLOPs that add up to harness.measure.flops' totals, layer times that add up to the step, torch's
trace with the same names, backward attribution by autograd sequence number on known events, and one-line
errors."""

from __future__ import annotations

import gzip
import json
import types

import numpy as np
import pandas as pd
import pytest

from harness import profile, ranges, registry
from harness.measure import flops
from harness.spec import SMALL
from implementations.numpy.capsnet import NumpyCapsNet

from conftest import run_module

BUILT_IN_CPU = ["numpy-looped", "numpy-vectorised", "torch-looped", "torch-vectorised"]
BATCH = 4


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    code = profile.main(["--impl", *BUILT_IN_CPU, "--config", "small", "--batch-size", str(BATCH), "--steps", "2",
                         "--warmup", "1", "--gemm-size", "256", "--out", str(out)])
    assert code == 0
    return out, pd.read_csv(out / profile.CSV_NAME), json.loads((out / profile.JSON_NAME).read_text())


def test_every_layer_of_every_phase_is_profiled_for_every_implementation(profiled_run):
    _, frame, meta = profiled_run
    expected = list(flops.step_layer_flops(SMALL, BATCH))
    assert set(frame["implementation"]) == set(BUILT_IN_CPU) == set(meta["implementations"])
    for name, rows in frame.groupby("implementation"):
        assert list(zip(rows["phase"], rows["layer"])) == expected, name
        assert rows["time_s"].notna().all() and (rows["time_s"] > 0).all(), name
        assert (rows["steps"] == 2).all()
    assert list(frame.columns) == profile.CSV_COLUMNS


def test_per_layer_flops_add_up_to_the_phase_totals(profiled_run):
    _, frame, _ = profiled_run
    totals = flops.phase_flops(SMALL, BATCH)
    for _, rows in frame.groupby("implementation"):
        assert rows["flops"].sum() == totals["train_step"]
        assert rows.loc[rows["phase"] == "forward", "flops"].sum() == totals["forward"]
        assert rows.loc[rows["phase"] == "backward", "flops"].sum() == totals["backward"]
        routing = rows[rows["layer"].str.startswith("routing_iteration_")]
        assert routing.loc[routing["phase"] == "forward", "flops"].sum() == totals["routing"]
        row = rows.iloc[0]
        assert row["gflops_per_s"] == pytest.approx(row["flops"] / row["time_s"] / 1e9)
        assert row["pct_of_peak"] == pytest.approx(100 * row["gflops_per_s"] / row["peak_gflops"])


def test_the_markdown_and_the_summary_say_the_overhead(profiled_run):
    out, _, meta = profiled_run
    text = (out / profile.MD_NAME).read_text()
    for name, summary in meta["implementations"].items():
        assert f"## {name} (" in text
        assert summary["overhead"] == pytest.approx(summary["step_s"] / summary["unprofiled_step_s"] - 1)
        assert summary["framework"] == registry.get(name).framework
    assert meta["kind"] == "capsbench-profile" and meta["machine"]["cpu_count"]
    # torch's autograd backward has no Python ranges: one per forward layer and the optimizer's
    assert meta["implementations"]["torch-vectorised"]["ranges_per_step"] == len(flops.layers(SMALL)) + 1
    assert "ranges cost" in text


def test_torch_writes_a_trace_with_the_layer_names(profiled_run):
    out, _, meta = profiled_run
    assert meta["implementations"]["torch-vectorised"]["trace"] == "torch-vectorised.trace.json.gz"
    assert meta["implementations"]["numpy-vectorised"]["trace"] is None  # NumPy has no trace of its own
    with gzip.open(out / profile.TRACES / "torch-vectorised.trace.json.gz", "rt") as stream:
        names = {event.get("name") for event in json.load(stream)["traceEvents"]}
    assert {"capsbench/forward/conv1", "capsbench/forward/routing_iteration_3", "capsbench/update/optimizer"} <= names


@pytest.mark.parametrize("name", BUILT_IN_CPU)
def test_layer_times_add_up_to_the_step(name):
    """The layers cover the phases they are in, to within 15 %: never more than the phases in any step, and
    at least 85 % in the best-covered one (the gaps between ranges are Python's glue, which a busy machine
    stretches in one step or another; a layer left out of its range is missing from every step)."""
    profiled = profile.profile_implementation(registry.get(name), SMALL, BATCH, "float32", steps=3, warmup=1,
                                              trace_dir=None, memory=False)
    coverage = []
    for step in profiled.steps:
        layers = sum(step.layers.values())
        phases = sum(step.phases.values())
        assert layers <= 1.001 * phases, (layers, phases)
        coverage.append(layers / phases)
    assert max(coverage) >= 0.85, coverage


def test_ranges_do_nothing_when_no_profile_records():
    assert ranges.layer_range("conv1") is ranges.layer_range("decoder", "backward")  # one shared null context
    with ranges.layer_range("conv1"):
        pass
    with ranges.recording(object()):
        with pytest.raises(RuntimeError, match="already recording"):
            with ranges.recording(object()):
                pass


def event(name, start, duration, sequence_nr=-1, children=(), memory=0):
    """A stand-in for torch.profiler's FunctionEvent: what the attribution reads (times in seconds)."""
    node = types.SimpleNamespace(name=name, sequence_nr=sequence_nr, cpu_time_total=duration * 1e6,
                                 cpu_memory_usage=memory, cpu_parent=None, cpu_children=list(children),
                                 time_range=types.SimpleNamespace(start=start * 1e6, end=(start + duration) * 1e6))
    for child in node.cpu_children:
        child.cpu_parent = node
    return node


def test_backward_nodes_are_charged_to_the_layer_of_their_forward_operation():
    """Known events: the forward ops of two layers with sequence numbers 5 and 9; a backward phase from 2.0
    s holding the loss's seed (2.0-2.25, no sequence number, before any node), the node of op 9 (2.3-2.8), a
    gradient accumulation (2.9-3.025, no sequence number) and the node of op 5 (3.1-5.1).  Each node is
    charged from the end of the one before: decoder 0.25 + 0.55 + 0.225 = 1.025 s, conv1 2.075 s, together
    the phase's 3.1 s."""
    conv = event("capsbench/forward/conv1", 0, 1.0, children=[event("aten::convolution", 0.1, 0.8, sequence_nr=5)])
    decoder = event("capsbench/forward/decoder", 1, 0.5, children=[event("aten::addmm", 1.1, 0.3, sequence_nr=9)])
    forward = event("capsbench/phase/forward", 0, 1.5, children=[conv, decoder])
    backward = event("capsbench/phase/backward", 2, 3.1, children=[
        event("aten::ones_like", 2.0, 0.25),
        event("autograd::engine::evaluate_function: AddmmBackward0", 2.3, 0.5, sequence_nr=9),
        event("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", 2.9, 0.125),
        event("autograd::engine::evaluate_function: ConvolutionBackward0", 3.1, 2.0, sequence_nr=5),
    ])
    events = [forward, conv, *conv.cpu_children, decoder, *decoder.cpu_children, backward, *backward.cpu_children]
    record = profile.torch_step_record(events, "cpu", {"forward": 1.5, "backward": 3.1})
    assert record.layers.keys() == {("forward", "conv1"), ("forward", "decoder"), ("backward", "decoder"),
                                    ("backward", "conv1")}
    assert record.layers[("forward", "conv1")] == pytest.approx(1.0)
    assert record.layers[("forward", "decoder")] == pytest.approx(0.5)
    assert record.layers[("backward", "decoder")] == pytest.approx(1.025)
    assert record.layers[("backward", "conv1")] == pytest.approx(2.075)


@pytest.mark.parametrize("args, message", [
    (["--impl", "tensorflow-capsnet"], "unknown implementation 'tensorflow-capsnet'"),
    (["--device", "cuda"] if not registry.available("cuda") else ["--impl", "no-such"], "can run here"),
])
def test_bad_requests_end_with_one_line(args, message, tmp_path, capsys):
    if message == "can run here" and registry.available("cuda"):
        pytest.skip("this machine has a CUDA implementation available")
    assert profile.main([*args, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error


def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert profile.main(["--impl", "numpy-vectorised", "--out", str(blocker / "profile")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"error: cannot write the profile into {blocker / 'profile'}: {blocker} is a file, not a folder; " \
        "choose another --out"


class FullGradientOnly(NumpyCapsNet):
    routing_gradients = ("full",)


def test_an_implementation_without_the_routing_gradient_is_refused_by_name_and_left_out_otherwise(tmp_path, capsys):
    with registry.registered("full-gradient-only", FullGradientOnly):
        assert profile.main(["--impl", "full-gradient-only", "--routing-gradient", "final",
                             "--out", str(tmp_path)]) == 2
        error = capsys.readouterr().err.strip()
        assert "'full-gradient-only' cannot run here" in error and "not 'final'" in error and "\n" not in error
        chosen = [info.name for info in profile.choose(None, "cpu", SMALL.replace(routing_gradient="final"))]
    assert "numpy-vectorised" in chosen and "full-gradient-only" not in chosen


def test_profiled_and_unprofiled_steps_are_interleaved_in_alternating_order(monkeypatch):
    """Warm-up and the range-counting step first, then pairs (unprofiled, profiled), (profiled, unprofiled),
    ...: neither kind always runs first; each pair gives one overhead and the summary their spread."""
    kinds, original = [], profile.phase_step

    def logged(impl, batch, phase_range=None):
        recorder = ranges._recorder
        kinds.append("plain" if recorder is None else type(recorder).__name__)
        return original(impl, batch, phase_range)

    monkeypatch.setattr(profile, "phase_step", logged)
    profiled = profile.profile_implementation(registry.get("numpy-vectorised"), SMALL, 2, "float32", steps=4,
                                              warmup=1, trace_dir=None, memory=False)
    wall = "WallClockRecorder"
    assert kinds == ["plain", "CountingRecorder", "plain", wall, wall, "plain", "plain", wall, wall, "plain"]
    assert len(profiled.steps) == len(profiled.unprofiled) == 4
    overheads = profile.pair_overheads(profiled)
    expected = [sum(step.phases.values()) / plain - 1 for step, plain in zip(profiled.steps, profiled.unprofiled)]
    assert overheads == pytest.approx(expected)
    summary = profile.implementation_summary(profiled, 2, "small", "float32", 1e-9)
    assert summary["overhead_pairs"] == 4
    assert summary["overhead_q25"] == pytest.approx(float(np.percentile(expected, 25)))
    assert summary["overhead_q75"] == pytest.approx(float(np.percentile(expected, 75)))
    assert "interquartile range" in profile.overhead_text(summary) and "over 4 interleaved pairs" in \
        profile.overhead_text(summary)


def test_the_first_line_names_network_images_and_output_and_torch_logs_stay_quiet(tmp_path):
    out = tmp_path / "profile"
    completed = run_module("harness.profile", "--impl", "torch-vectorised", "--config", "small", "--batch-size",
                           "2", "--steps", "1", "--warmup", "0", "--gemm-size", "64", "--out", str(out))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.splitlines()[0] == (
        f"profile of torch-vectorised (float32, small network, batch 2 of seeded synthetic images); results -> "
        f"{out / 'profile.md'}, profile.csv and profile.json beside it")
    assert "USDT" not in completed.stderr and "CPUAllocator" not in completed.stderr


def test_an_implementation_s_convolution_plan_and_its_note_are_in_the_markdown(profiled_run):
    _, frame, meta = profiled_run
    summaries = {name: dict(summary) for name, summary in meta["implementations"].items()}
    summaries["torch-looped"]["plan"] = {"4": {
        "conv1": {"forward": "im2col-gemm", "weight": "library", "input": "offsets"},
        "primary_caps": {"forward": "spectral", "weight": "spectral", "input": "spectral"},
        "source": "cache", "note": "spectral: effective rates"}}
    text = profile.markdown(frame, summaries)
    section = text.split("## torch-looped (")[1].split("## ")[0]
    assert ("- torch-looped, batch 4: conv1: im2col-gemm/library/offsets; primary_caps: spectral/spectral/spectral "
            "(cache)") in section
    assert section.count("spectral: effective rates") == 1
    assert "Convolution plan" not in text.split("## torch-looped (")[0]  # the others have none


# Self-attention routing ------------------------------------------------------------------------------------

ATTENTION = SMALL.replace(routing_algorithm="self-attention")


class DynamicOnly(NumpyCapsNet):
    routing_algorithms = ("dynamic",)


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attention")
    code = profile.main(["--impl", "torch-vectorised", "--routing-algorithm", "self-attention", "--config", "small",
                         "--batch-size", str(BATCH), "--steps", "2", "--warmup", "1", "--gemm-size", "256",
                         "--out", str(out)])
    assert code == 0
    return out, pd.read_csv(out / profile.CSV_NAME), json.loads((out / profile.JSON_NAME).read_text())


def test_self_attention_s_layers_are_profiled_in_both_phases_with_their_flops(attention_run):
    """The rows are the self-attention network's (attention and attention_sum in place of the iterations),
    each timed, the backward ones too (autograd's nodes charged to the layer of their forward operation),
    with FLOPs that add up to harness.measure.flops' totals for that network."""
    out, frame, meta = attention_run
    assert list(zip(frame["phase"], frame["layer"])) == list(flops.step_layer_flops(ATTENTION, BATCH))
    assert {("forward", "attention"), ("backward", "attention"), ("forward", "attention_sum"),
            ("backward", "attention_sum")} <= set(zip(frame["phase"], frame["layer"]))
    assert not frame["layer"].str.startswith("routing_iteration_").any()
    assert frame["time_s"].notna().all() and (frame["time_s"] > 0).all()
    assert (frame["routing_algorithm"] == "self-attention").all()
    totals = flops.phase_flops(ATTENTION, BATCH)
    assert frame["flops"].sum() == totals["train_step"]
    routing = frame[frame["layer"].isin(flops.ATTENTION_LAYERS)]
    assert routing.loc[routing["phase"] == "forward", "flops"].sum() == totals["routing"]
    assert routing["flops"].sum() == totals["routing_backward"]
    summary = meta["implementations"]["torch-vectorised"]
    assert (summary["routing_algorithm"], summary["routing_gradient"]) == ("self-attention", "full")
    assert summary["ranges_per_step"] == len(flops.layers(ATTENTION)) + 1
    assert "## torch-vectorised (torch, cpu, batch 4, small network, self-attention routing, float32)" in \
        (out / profile.MD_NAME).read_text()


def test_an_implementation_without_the_routing_algorithm_is_refused_by_name_and_left_out_otherwise(tmp_path,
                                                                                                  capsys):
    with registry.registered("dynamic-only", DynamicOnly) as info:
        assert profile.main(["--impl", "dynamic-only", "--routing-algorithm", "self-attention",
                             "--out", str(tmp_path)]) == 2
        reason = info.computes(ATTENTION).reason
        assert capsys.readouterr().err == f"error: implementation 'dynamic-only' cannot run here: {reason}\n"
        chosen = [entry.name for entry in profile.choose(None, "cpu", ATTENTION)]
        assert "dynamic-only" in [entry.name for entry in profile.choose(None, "cpu", SMALL)]
    assert "torch-vectorised" in chosen and "dynamic-only" not in chosen
    assert not list(tmp_path.iterdir())


def test_a_routing_gradient_without_meaning_under_the_algorithm_is_one_line(tmp_path, capsys):
    assert profile.main(["--impl", "torch-vectorised", "--routing-algorithm", "self-attention", "--routing-gradient",
                         "final", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: --routing-gradient final has no meaning under --routing-algorithm "
                                       "self-attention (it has no iterations before its last): use --routing-gradient "
                                       "full\n")


def test_a_profile_of_another_algorithm_goes_into_a_folder_of_its_own_by_default():
    from harness.settings import PROFILE_SUBDIR, RUNS_DIR

    assert profile.default_output("dynamic") == RUNS_DIR / PROFILE_SUBDIR
    assert profile.default_output("self-attention") == RUNS_DIR / PROFILE_SUBDIR / "self-attention"
    assert profile.parser().parse_args([]).out is None  # the default is the algorithm's


def test_a_plugin_s_algorithm_is_timed_as_one_routing_layer_of_unknown_flops(monkeypatch):
    """torch-vectorised computes a plugin's algorithm by its reference function inside the whole-routing range
    (harness.ranges.ROUTING_LAYER): one routing row per phase, timed, its FLOPs unknown (NaN)."""
    from harness import routing_algorithms
    from implementations.torch.routing import squash

    def mean_routing(u_hat, params, config):
        return squash(u_hat.mean(dim=1), config.squash_eps)

    algorithm = routing_algorithms.RoutingAlgorithm("mean-of-predictions", "a test's", iterative=False,
                                                    reference=mean_routing, source="tests")
    monkeypatch.setitem(routing_algorithms._ALGORITHMS, algorithm.name, algorithm)
    config = SMALL.replace(routing_algorithm=algorithm.name)
    profiled = profile.profile_implementation(registry.get("torch-vectorised"), config, 2, "float32", steps=1,
                                              warmup=0, trace_dir=None, memory=False)
    rows = pd.DataFrame(profile.profile_rows(profiled, config, 2, "float32", "small", None)).set_index(
        ["phase", "layer"])
    for phase in ("forward", "backward"):
        assert rows.loc[(phase, ranges.ROUTING_LAYER), "time_s"] > 0
        assert np.isnan(rows.loc[(phase, ranges.ROUTING_LAYER), "flops"])
    assert rows.loc[("forward", "conv1"), "flops"] == flops.step_layer_flops(SMALL, 2)[("forward", "conv1")]


def test_the_built_in_routing_s_ranges_inside_a_plugin_s_routing_range_count_once():
    for inner in ("routing_iteration_2", "attention"):
        record = profile.StepRecord()
        record.add(("forward", ranges.ROUTING_LAYER), 3.0)
        record.add(("forward", inner), 2.0)
        record.add(("backward", ranges.ROUTING_LAYER), 1.0)
        assert profile.without_enclosing_routing(record).layers == {("forward", inner): 2.0,
                                                                   ("backward", ranges.ROUTING_LAYER): 1.0}
