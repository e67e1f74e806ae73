"""The report's table logic (harness.reporting.tables, harness.reporting.formatting) on small hand-built frames
whose answers are known by hand: the run-to-run comparison and its noise filter, the summary's derived columns,
the runs that did not run, the training table's images and ranks, and the profile reader."""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.measure.expected_memory import im2col_bytes, kept_activations, parameter_state_bytes
from harness.reporting.formatting import fmt_spread, fmt_unit_spread, samples_heading
from harness.reporting.tables import (
    comparison_table,
    distributed_table,
    memory_table,
    not_run,
    not_run_line,
    per_class_table,
    profile_phase_totals,
    profile_rows,
    routing_gradient_table,
    run_rows,
    speedup_table,
    step_iterations,
    summary_table,
    training_images,
    training_ranks,
    training_table,
)
from harness.results import ResultsFileError, load_profile_result, read_profile_csv
from harness.spec import CONFIGS
from harness.suite.asv_results import Run, short_env_name, tidy_frame

PROFILE = Path(__file__).parent / "fixtures" / "report" / "profile"
NAN = math.nan
SPEEDUP_COLUMNS = ["framework", "device", "pair", "vectorised", "looped", "batch_size", "phase",
                   "vectorised_s", "looped_s", "speedup"]  # every speedup table's, in order


@contextlib.contextmanager
def sleeping_child():
    """A live process that is not this one (a mutant that signals it must not end the test run), reaped after."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def run(commit: str, facts: dict | None = None) -> Run:
    return Run("box", commit, "py3.11", pd.Timestamp("2026-01-01", tz="UTC"), Path(f"{commit}.json"), "fast",
               "paper", False, facts or {})


def row(commit: str, metric: str, value: float, q25=NAN, q75=NAN, samples=NAN, unit="seconds",
        implementation="torch-vectorised", batch=32, iterations=3, **extra) -> dict:
    return {"implementation": implementation, "framework": "torch", "device": "cpu", "routing_variant": "vectorised",
            "backend": "torch", "batch_size": batch, "routing_iterations": iterations, "benchmark": f"time_{metric}",
            "metric": metric, "value": value, "unit": unit, "q25": q25, "q75": q75, "spread": q75 - q25,
            "samples": samples, "status": "ok" if not math.isnan(value) else "skipped", "machine": "box",
            "commit": commit, "env": "py3.11", "config_name": "paper", **extra}


def compare(old: dict, new: dict) -> str:
    """The change the comparison gives one benchmark measured as ``old`` in run a and ``new`` in run b."""
    table = tidy_frame([row("a", **old), row("b", **new)])
    comparison = comparison_table(table, run("a"), run("b"))
    assert len(comparison) == 1
    return comparison["change"].iloc[0]


# ---------------------------------------------------------------------------------------------- comparison
def seconds(value, low, high, n=10):
    return dict(metric="train_step", value=value, q25=low, q75=high, samples=n)


def test_a_faster_result_with_spreads_apart_reads_better():
    assert compare(seconds(1.00, 0.98, 1.03), seconds(0.50, 0.49, 0.52)) == "better"


def test_a_slower_result_with_spreads_apart_reads_worse():
    assert compare(seconds(1.00, 0.98, 1.03), seconds(1.50, 1.45, 1.55)) == "worse"


def test_a_change_under_ten_percent_is_not_flagged_even_with_narrow_spreads():
    # 1.08x, and the ranges [0.999, 1.001] and [1.079, 1.081] are far apart: still under the factor
    assert compare(seconds(1.00, 0.999, 1.001), seconds(1.08, 1.079, 1.081)) == ""
    assert compare(seconds(1.00, 0.999, 1.001), seconds(0.93, 0.929, 0.931)) == ""


def test_overlapping_spreads_are_not_flagged_even_beyond_the_factor():
    # 1.3x, but the old run spread over [0.8, 1.4] and the new one over [1.2, 1.5]: within the noise
    assert compare(seconds(1.00, 0.80, 1.40), seconds(1.30, 1.20, 1.50)) == ""
    assert compare(seconds(1.30, 1.20, 1.50), seconds(1.00, 0.80, 1.40)) == ""


def test_higher_is_better_for_rates():
    gflops = dict(metric="gemm_peak", unit="GFLOP/s", samples=5)
    assert compare({**gflops, "value": 100, "q25": 98, "q75": 101}, {**gflops, "value": 150, "q25": 148,
                                                                     "q75": 152}) == "better"
    assert compare({**gflops, "value": 150, "q25": 148, "q75": 152}, {**gflops, "value": 100, "q25": 98,
                                                                     "q75": 101}) == "worse"
    images = dict(metric="throughput", unit="images/s", samples=5)
    assert compare({**images, "value": 100, "q25": 99, "q75": 101}, {**images, "value": 50, "q25": 49,
                                                                    "q75": 51}) == "worse"


def test_lower_is_better_for_bytes_and_relative_error_and_neither_for_other_units():
    assert compare(dict(metric="host_memory", unit="bytes", value=1e9), dict(metric="host_memory", unit="bytes",
                                                                             value=2e9)) == "worse"
    assert compare(dict(metric="max_rel_error", unit="relative error", value=1e-4),
                   dict(metric="max_rel_error", unit="relative error", value=1e-5)) == "better"
    assert compare(dict(metric="threads", unit="unknown", value=2), dict(metric="threads", unit="unknown",
                                                                         value=4)) == "higher"


def test_single_samples_are_too_few_to_judge_not_worse_or_better():
    one = dict(metric="train_step", samples=1)
    change = compare({**one, "value": 1.0, "q25": 1.0, "q75": 1.0}, {**one, "value": 2.0, "q25": 2.0, "q75": 2.0})
    assert change.startswith("too few samples") and "worse" not in change
    # one side single is enough: the other's spread cannot make a single sample a median
    change = compare(seconds(1.00, 0.98, 1.03), {**one, "value": 0.5, "q25": 0.5, "q75": 0.5})
    assert change.startswith("too few samples") and "better" not in change
    # within the factor there is nothing to judge either way
    assert compare({**one, "value": 1.0}, {**one, "value": 1.05}) == ""


def test_the_comparison_keeps_the_ratio_and_samples_of_both_sides():
    table = tidy_frame([row("a", **seconds(1.0, 0.9, 1.1, 7)), row("b", **seconds(2.0, 1.9, 2.1, 1))])
    comparison = comparison_table(table, run("a"), run("b")).iloc[0]
    assert comparison["ratio"] == 2.0
    assert (comparison["old_samples"], comparison["new_samples"]) == (7, 1)
    assert (comparison["old_q25"], comparison["new_q75"]) == (0.9, 2.1)


# ---------------------------------------------------------------------------------------------- summary
def summary_rows(commit="a") -> list[dict]:
    rows = []
    for batch, step, routing in ((32, 0.400, 0.100), (128, 1.600, 0.200)):
        rows.append(row(commit, "train_step", step, step * 0.9, step * 1.2, 5, batch=batch, flops=4e10 * batch / 32,
                        gflops_per_s=4e10 * batch / 32 / step / 1e9, pct_of_peak=25.0 if batch == 32 else 30.0))
        rows.append(row(commit, "routing_backward", routing, batch=batch, samples=5, q25=routing, q75=routing))
    rows.append(row(commit, "train_step", NAN, implementation="torch-vectorised-cuda", batch=32,
                    device="cuda", samples=NAN))
    return rows


def test_summary_images_per_second_and_routing_share_by_hand():
    frame = summary_table(tidy_frame(summary_rows()), 3).set_index(["implementation", "batch_size"])
    small, large = frame.loc[("torch-vectorised", 32)], frame.loc[("torch-vectorised", 128)]
    assert small["images_per_second"] == pytest.approx(80.0)  # 32 images / 0.4 s
    assert large["images_per_second"] == pytest.approx(80.0)  # 128 / 1.6
    assert small["routing_share"] == pytest.approx(0.25)  # 0.1 / 0.4
    assert large["routing_share"] == pytest.approx(0.125)  # 0.2 / 1.6
    assert (small["train_step_q25"], small["train_step_q75"], small["train_step_samples"]) == \
        pytest.approx((0.36, 0.48, 5))
    assert small["train_gflops_per_s"] == pytest.approx(100.0)  # 4e10 FLOPs / 0.4 s
    assert (small["train_pct_of_peak"], large["train_pct_of_peak"]) == (25.0, 30.0)  # each row's own figure
    assert math.isnan(frame.loc[("torch-vectorised-cuda", 32), "train_step"])


def test_implementations_without_any_result_are_named_with_the_reason():
    table = tidy_frame(summary_rows())
    no_gpu = {"gpu": {"available": False, "reason": "no driver"}}
    assert not_run(table, no_gpu) == {"torch-vectorised-cuda": "unavailable: no CUDA GPU on this machine"}
    assert not_run(table, {}) == {"torch-vectorised-cuda": "skipped in every benchmark: unavailable here or left out"}
    line = not_run_line({"a": "why", "c": "why", "b": "other"})
    assert line == "Not run here: b (other); a, c (why)."


def test_speedup_is_looped_over_vectorised_time():
    rows = [row("a", "train_step", 0.5), {**row("a", "train_step", 1.5), "implementation": "torch-looped",
                                          "routing_variant": "looped"}]
    table = speedup_table(tidy_frame(rows), 3)
    step = table[table["phase"] == "train_step"].iloc[0]
    assert (step["pair"], step["speedup"]) == ("torch (cpu)", 3.0)


def test_variants_are_compared_with_their_own_looped_twin():
    """Compiled with compiled, eager with eager; an implementation with no looped twin (torch-fused) with
    every looped one."""
    names = {"torch-vectorised": ("vectorised", 1.0), "torch-looped": ("looped", 2.0),
             "torch-vectorised-compiled": ("vectorised", 1.5), "torch-looped-compiled": ("looped", 6.0),
             "torch-fused": ("vectorised", 0.5)}
    rows = [{**row("a", "train_step", seconds), "implementation": name, "routing_variant": variant}
            for name, (variant, seconds) in names.items()]
    table = speedup_table(tidy_frame(rows), 3)
    pairs = dict(zip(table["pair"], table["speedup"]))
    assert pairs == {"torch-vectorised / torch-looped": 2.0, "torch-vectorised-compiled / torch-looped-compiled": 4.0,
                     "torch-fused / torch-looped": 4.0, "torch-fused / torch-looped-compiled": 12.0}


# ---------------------------------------------------------------------------------------------- formatting
def test_a_single_sample_is_never_written_as_a_median():
    assert fmt_spread(0.2846, 0.2846, 0.2846, 1, "ms") == "284.6 (1 sample)"
    assert fmt_spread(0.2846, 0.2801, 0.2903, 10, "ms") == "284.6 (280.1–290.3, 10 samples)"
    assert fmt_spread(0.2846, 0.2801, 0.2903, 10, "ms", count=False) == "284.6 (280.1–290.3)"
    assert fmt_unit_spread(0.5, 0.4, 0.6, 3, "seconds") == "500.0 ms (400.0–600.0, 3 samples)"
    assert fmt_unit_spread(2e9, NAN, NAN, NAN, "bytes") == "1907.3 MiB"
    assert samples_heading([1, 1, 1]) == (" (1 sample)", False)
    assert samples_heading([7, 7]) == (", median (q25–q75) of 7 samples", False)
    assert samples_heading([1, 7])[1] is True


def test_short_environment_names():
    assert short_env_name("virtualenv-py3.11-setuptools-torch2.13.0") == "py3.11-torch2.13.0"
    assert short_env_name("conda-py3.12-numpy") == "conda-py3.12-numpy"


# ---------------------------------------------------------------------------------------------- training
def record(**fields) -> dict:
    epochs = fields.pop("epochs", [{"epoch": 1, "mean_loss": 0.5, "test_accuracy": 0.9, "train_seconds": 10.0,
                                    "images": 512, "elapsed_seconds": 10.0}])
    return {"kind": "capsbench-training", "implementation": "torch-vectorised", "device": "cpu",
            "config_name": "paper", "batch_size": 128, "status": "completed", "epochs": epochs, "steps": [], **fields}


def test_training_images_and_ranks_of_old_and_new_records():
    epochs = [{"epoch": 1, "mean_loss": 0.6, "test_accuracy": 0.95, "train_seconds": 100.0, "eval_seconds": 5.0,
               "wall_seconds": 106.0, "images": 60000, "elapsed_seconds": 100.0},
              {"epoch": 2, "mean_loss": 0.4, "test_accuracy": 0.93, "train_seconds": 200.0, "eval_seconds": 7.0,
               "wall_seconds": 208.0, "images": 60000, "elapsed_seconds": 300.0}]
    frame = training_table([
        (Path("old_all.json"), record(limit=None, test_limit=None)),
        (Path("old_limited.json"), record(limit=512, test_limit=100)),
        (Path("old_ddp.json"), record(limit=None, test_limit=None, distributed={"world_size": 4})),
        (Path("new.json"), record(train_images=60000, test_images=10000, ranks=2, best_test_accuracy=0.95,
                                  final_test_accuracy=0.93, schedule={"name": "paper"}, epochs=epochs)),
    ]).set_index("file")
    assert frame.loc["old_all.json", ["train_images", "test_images", "ranks"]].tolist() == [60000, 10000, 1]
    assert frame.loc["old_limited.json", ["train_images", "test_images", "ranks"]].tolist() == [512, 100, 1]
    assert frame.loc["old_ddp.json", "ranks"] == 4
    new = frame.loc["new.json"]
    assert [new["train_images"], new["test_images"], new["ranks"], new["schedule"]] == [60000, 10000, 2, "paper"]
    assert (new["best_test_accuracy"], new["final_test_accuracy"]) == (0.95, 0.93)
    assert (new["train_seconds"], new["eval_seconds"], new["wall_seconds"]) == (300.0, 12.0, 314.0)
    assert new["images_per_second"] == pytest.approx(120000 / 300.0)
    assert math.isnan(frame.loc["old_all.json", "eval_seconds"])  # not recorded by older runs
    assert frame.loc["old_all.json", "best_test_accuracy"] == 0.9  # from the epochs where the record lacks it


# ---------------------------------------------------------------------------------------------- profile
def test_profile_rows_in_step_order_with_phase_totals_by_hand():
    warnings: list[str] = []
    profile = load_profile_result(PROFILE, warnings)
    assert warnings == [] and profile.implementations() == ["torch-vectorised", "numpy-looped"]
    rows = profile_rows(profile, "torch-vectorised")
    assert list(zip(rows["phase"], rows["layer"])) == [
        ("forward", "conv1"), ("forward", "primary_caps"), ("forward", "routing_iteration_1"),
        ("forward", "routing_iteration_2"), ("backward", "conv1"), ("backward", "primary_caps"),
        ("update", "optimizer")]
    totals = profile_phase_totals(rows).set_index("phase")
    assert totals["time_s"].to_dict() == pytest.approx({"forward": 0.016, "backward": 0.018, "update": 0.004})
    assert totals["share"].to_dict() == pytest.approx({"forward": 0.40, "backward": 0.45, "update": 0.10})
    assert profile.about("torch-vectorised")["overhead"] == 0.25


@pytest.mark.parametrize("change, problem", [
    (lambda text: text.replace(",share,", ",portion,"), "missing column(s) share"),
    (lambda text: text.replace("0.012,0.011", "fast,0.011"), "row 2: time_s is 'fast', not a number"),
    (lambda text: text.replace(",update,", ",step,"), "phase 'step' is not one of forward, backward, update"),
    (lambda text: text.splitlines()[0] + "\n", "no rows"),
])
def test_a_malformed_profile_is_one_warning_naming_the_file(tmp_path, change, problem):
    folder = tmp_path / "profile"
    folder.mkdir()
    (folder / "profile.csv").write_text(change((PROFILE / "profile.csv").read_text()))
    warnings: list[str] = []
    assert load_profile_result(folder, warnings) is None
    assert len(warnings) == 1 and str(folder / "profile.csv") in warnings[0] and problem in warnings[0]
    with pytest.raises(ResultsFileError):
        read_profile_csv(folder / "profile.csv")


def test_a_layer_without_a_time_is_kept_as_not_timed(tmp_path):
    """harness.profile writes an empty time for a layer an implementation's ranges do not cover."""
    folder = tmp_path / "profile"
    folder.mkdir()
    text = (PROFILE / "profile.csv").read_text()
    (folder / "profile.csv").write_text(text.replace("0.002,0.0019,0.0022,0.05,", ",,,,"))
    profile = load_profile_result(folder, [])
    rows = profile_rows(profile, "torch-vectorised").set_index(["phase", "layer"])
    assert math.isnan(rows.loc[("forward", "routing_iteration_1"), "time_s"])
    totals = profile_phase_totals(profile_rows(profile, "torch-vectorised")).set_index("phase")
    assert totals.loc["forward", "time_s"] == pytest.approx(0.014)


def test_no_profile_folder_is_no_profile_and_no_warning(tmp_path):
    warnings: list[str] = []
    assert load_profile_result(tmp_path / "profile", warnings) is None and warnings == []


def test_per_class_table_by_hand():
    """Rows the true class: class 0 has 7 images, 5 right, its errors 1 x class 1 and 1 x class 2 (a tie:
    the lower class); class 1 has no error; class 2 none right, both taken for 0; an empty class is n/a."""
    table = per_class_table([[5, 1, 1, 0], [0, 3, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]])
    assert table["images"].tolist() == [7, 3, 2, 0]
    assert table["correct"].tolist() == [5, 3, 0, 0]
    assert table["accuracy"].tolist()[:3] == [5 / 7, 1.0, 0.0] and math.isnan(table["accuracy"][3])
    assert table["confused_with"].tolist() == [1, pd.NA, 0, pd.NA]
    assert table["confusions"].tolist() == [1, 0, 2, 0]
    assert list(table.columns) == ["class", "images", "correct", "accuracy", "confused_with", "confusions"]
    assert table["class"].tolist() == [0, 1, 2, 3]


def test_a_profile_divides_every_implementation_by_the_hardware_peak_where_it_has_one():
    import pandas as pd

    from harness.measure.peak import with_one_peak

    frame = pd.DataFrame({"device": ["cpu", "cpu", "cuda"], "gflops_per_s": [50.0, 30.0, 1000.0],
                          "peak_gflops": [200.0, 100.0, 4000.0], "pct_of_peak": [25.0, 30.0, 25.0]})
    hardware = with_one_peak(frame, {"hardware_peak": {"gflops": 300.0}, "gemm_peak_gflops": {"torch-cuda": 5000.0}})
    assert list(hardware["pct_of_peak"]) == [50 / 3, 10.0, 20.0]
    older = with_one_peak(frame, {})  # no facts: the best GEMM per device of the CSV
    assert list(older["pct_of_peak"]) == [25.0, 15.0, 25.0]


# ---------------------------------------------------------------------------------------------- routing gradient
def gradient_rows(commit="a") -> list[dict]:
    """torch-vectorised at batch 32: backward 0.30 s full, 0.24 s final; train step 0.50 / 0.44 s; routing
    forward + backward 0.10 / 0.04 s.  numpy-vectorised measured at full only (left out of the table)."""
    rows = []
    for gradient, backward, step, routing in (("full", 0.30, 0.50, 0.10), ("final", 0.24, 0.44, 0.04)):
        rows.append(row(commit, "backward", backward, backward * 0.9, backward * 1.1, 7, routing_gradient=gradient))
        rows.append(row(commit, "train_step", step, step, step, 7, routing_gradient=gradient))
        rows.append(row(commit, "routing_backward", routing, routing, routing, 9, routing_gradient=gradient))
    rows.append(row(commit, "routing_backward", 0.5, routing_gradient="final", iterations=5))  # another count
    rows.append(row(commit, "forward", 0.2))  # a benchmark without the parameter: full
    rows.append(row(commit, "backward", 0.9, implementation="numpy-vectorised", routing_gradient="full"))
    return rows


def test_routing_gradient_saving_and_routing_shares_by_hand():
    table = tidy_frame(gradient_rows())
    frame = routing_gradient_table(run_rows(table, run("a"), None), 3)
    assert list(frame["implementation"]) == ["torch-vectorised"]  # numpy was not measured at final
    line = frame.iloc[0]
    assert line["backward_saving"] == pytest.approx(0.2)  # 1 - 0.24 / 0.30
    assert line["train_step_saving"] == pytest.approx(0.12)  # 1 - 0.44 / 0.50
    assert line["routing_backward_saving"] == pytest.approx(0.6)  # 1 - 0.04 / 0.10, at 3 iterations
    assert line["routing_share_full"] == pytest.approx(0.2)  # 0.10 / 0.50
    assert line["routing_share_final"] == pytest.approx(0.04 / 0.44)
    assert (line["backward_final_q25"], line["backward_final_q75"], line["backward_final_samples"]) == \
        pytest.approx((0.216, 0.264, 7))


def test_every_other_table_sees_the_full_gradient_and_old_results_are_full():
    table = tidy_frame(gradient_rows())
    assert set(table["routing_gradient"]) == {"full", "final"}
    assert table.loc[table["metric"] == "forward", "routing_gradient"].tolist() == ["full"]
    summary = summary_table(run_rows(table, run("a")), 3).set_index(["implementation", "batch_size"])
    assert summary.loc[("torch-vectorised", 32), "train_step"] == pytest.approx(0.50)  # not final's 0.44
    old = tidy_frame([row("a", "train_step", 0.5)])  # no routing_gradient parameter at all
    assert old["routing_gradient"].tolist() == ["full"]
    assert routing_gradient_table(run_rows(old, run("a"), None), 3).empty


def test_a_training_record_names_its_routing_gradient_and_an_old_one_is_full():
    from harness.reporting.plots import training_label

    frame = training_table([(Path("old.json"), record()),
                            (Path("final.json"), record(routing_gradient="final"))]).set_index("file")
    assert frame.loc["old.json", "routing_gradient"] == "full"
    assert frame.loc["final.json", "routing_gradient"] == "final"
    assert "final routing gradient" in training_label(record(routing_gradient="final"), "final", False)
    assert "routing gradient" not in training_label(record(), "old", False)  # full, the default, goes unsaid


def test_a_training_record_names_its_routing_algorithm_and_an_old_one_is_dynamic():
    """The record's own field, else its config's (a record written before the top-level field), else dynamic
    (a record from before the setting); the curves' label says a non-default algorithm."""
    from harness.reporting.plots import training_label

    frame = training_table([
        (Path("old.json"), record()),
        (Path("field.json"), record(routing_algorithm="self-attention")),
        (Path("config.json"), record(config={"routing_algorithm": "self-attention"})),
    ]).set_index("file")
    assert list(frame["routing_algorithm"]) == ["dynamic", "self-attention", "self-attention"]
    assert "self-attention routing" in training_label(record(routing_algorithm="self-attention"), "s", False)
    assert "routing)" not in training_label(record(), "old", False)  # dynamic, the default, goes unsaid


def test_the_reason_an_implementation_did_not_run_follows_its_statuses():
    """Failed everywhere, failed somewhere and skipped elsewhere, skipped everywhere on a machine with a GPU:
    three reasons in words; an implementation with one value ran."""
    rows = pd.DataFrame([
        {"implementation": "a", "device": "cpu", "value": math.nan, "status": "failed"},
        {"implementation": "a", "device": "cpu", "value": math.nan, "status": "failed"},
        {"implementation": "b", "device": "cpu", "value": math.nan, "status": "failed"},
        {"implementation": "b", "device": "cpu", "value": math.nan, "status": "skipped"},
        {"implementation": "c", "device": "cuda", "value": math.nan, "status": "skipped"},
        {"implementation": "d", "device": "cpu", "value": math.nan, "status": "failed"},
        {"implementation": "d", "device": "cpu", "value": 1.0, "status": "ok"},
        {"implementation": None, "device": "cpu", "value": math.nan, "status": "failed"},
    ])
    assert not_run(rows, {"gpu": {"available": True}}) == {
        "a": "failed in every benchmark", "b": "skipped or failed in every benchmark",
        "c": "skipped in every benchmark: unavailable here or left out"}
    assert not_run(rows, {"gpu": {"available": False}})["c"] == "unavailable: no CUDA GPU on this machine"
    left_out = {"a": "is left out by CAPSBENCH_IMPLEMENTATIONS", "c": "compiles again in every benchmark process"}
    assert not_run(rows, {"gpu": {"available": True}, "left_out": left_out}) == {
        "a": "failed in every benchmark", "b": "skipped or failed in every benchmark",  # a failure is no skip
        "c": "skipped in every benchmark: it compiles again in every benchmark process"}  # the suite's reason
    assert not_run_line({}) == ""


def test_recorded_counts_win_over_limits_and_impossible_counts_fall_back():
    assert training_images({"train_images": 384, "test_images": 200, "limit": 512, "test_limit": 100}) == (384, 200)
    assert training_images({"limit": 70000, "test_limit": 20000}) == (60000, 10000)  # clamped to MNIST
    assert training_ranks({"ranks": 1, "distributed": {"world_size": 2}}) == 1
    assert training_ranks({"ranks": 0, "distributed": {"world_size": 0}}) == 1
    assert training_ranks({"ranks": 0, "distributed": {"world_size": 3}}) == 3


def test_every_column_of_a_training_row():
    """Each column from its own field, and what stands in for a field an old or partial record lacks."""
    epochs = [{"epoch": 1, "mean_loss": 0.7, "test_accuracy": 0.5, "train_seconds": 4.0, "images": 100},
              {"epoch": 2, "mean_loss": 0.3, "test_accuracy": 0.25, "train_seconds": 6.0}]  # no image count
    frame = training_table([
        (Path("full.json"), record(device="cuda", config_name="small", batch_size=64, epochs_requested=5,
                                   status="interrupted", schedule="constant", epochs=epochs)),
        (Path("bare.json"), {"implementation": "x"}),
    ]).set_index("file")
    full = frame.loc["full.json"]
    assert (full["implementation"], full["device"], full["config"], full["batch_size"], full["status"]) == (
        "torch-vectorised", "cuda", "small", 64, "interrupted")
    assert (full["epochs"], full["epochs_requested"], full["schedule"]) == (2, 5, "constant")
    assert (full["best_test_accuracy"], full["final_test_accuracy"], full["final_mean_loss"]) == (0.5, 0.25, 0.3)
    assert full["train_seconds"] == 10.0 and full["images_per_second"] == 10.0  # 100 images / 10 s
    bare = frame.loc["bare.json"]
    assert (bare["device"], bare["config"], bare["status"], bare["epochs"], bare["epochs_requested"]) == (
        "?", "?", "?", 0, 0)
    assert bare["train_seconds"] == 0 and math.isnan(bare["images_per_second"])
    assert math.isnan(bare["best_test_accuracy"]) and math.isnan(bare["final_test_accuracy"])
    assert math.isnan(bare["final_mean_loss"]) and pd.isna(bare["batch_size"])


def test_a_profile_without_its_json_describes_each_implementation_from_its_own_csv_rows(tmp_path):
    shutil.copy(PROFILE / "profile.csv", tmp_path)
    warnings: list[str] = []
    profile = load_profile_result(tmp_path, warnings)
    assert warnings == []
    assert profile.about("numpy-looped") == {"framework": "numpy", "device": "cpu", "config_name": "small",
                                             "batch_size": 16, "dtype": "float32", "steps": 1}
    assert profile.about("torch-vectorised")["framework"] == "torch"
    assert profile.about("torch-vectorised")["steps"] == 5


def test_a_run_left_running_by_a_process_that_is_gone_ended_without_a_status():
    import socket

    from harness.reporting.tables import training_status

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = socket.gethostname()
    assert training_status({"status": "running", "pid": gone.pid, "host": here}) == "ended without a status (killed?)"
    with sleeping_child() as alive:
        assert training_status({"status": "running", "pid": alive.pid, "host": here}) == "running"
    assert training_status({"status": "running", "host": here}) == "running? (no process recorded)"
    assert training_status({"status": "running", "pid": "12", "host": here}) == "running? (no process recorded)"
    assert training_status({"status": "running", "pid": 1, "host": "elsewhere"}) == "running? (on elsewhere)"
    assert training_status({"status": "running"}) == "running? (no process recorded)"
    assert training_status({"status": "interrupted", "pid": gone.pid, "host": here}) == "interrupted"


def test_profile_summary_and_layer_table_by_hand():
    from harness.reporting.tables import profile_layer_table, profile_steps, profile_summary

    nan = float("nan")
    rows = pd.DataFrame({"phase": ["forward", "backward"], "layer": ["conv1", "conv1"], "time_s": [0.1, 0.3],
                         "time_q25_s": [0.09, 0.28], "time_q75_s": [0.11, 0.33], "share": [0.2, 0.6],
                         "gflops_per_s": [10.0, 20.0], "pct_of_peak": [5.0, 10.0], "batch_size": [32.0, 32.0],
                         "config_name": ["small", "small"], "dtype": ["float32", "float32"], "steps": [5.0, 5.0],
                         "memory_allocated_bytes": [nan, nan], "memory_peak_bytes": [1024.0, nan]})
    summary = profile_summary(rows, {"step_s": 0.5, "overhead": 0.02, "phases_s": {"forward": 0.12}})
    assert summary["batch_size"] == 32 and summary["steps"] == 5 and summary["unprofiled_step_s"] is None
    assert summary["layers_s"] == pytest.approx(0.4) and summary["layers_share_of_step"] == pytest.approx(0.8)
    assert summary["phases"] == [("forward", 0.1, 0.2, 0.12), ("backward", 0.3, 0.6, None)]
    assert {key: value for key, value in summary.items() if key not in ("layers_s", "layers_share_of_step")} == {
        "batch_size": 32, "config_name": "small", "dtype": "float32", "steps": 5, "step_s": 0.5,
        "unprofiled_step_s": None, "overhead": 0.02, "phases": summary["phases"]}
    written = profile_summary(rows, {"step_s": "0.5", "unprofiled_step_s": 0.45, "overhead": "2 %"})
    assert (written["step_s"], written["unprofiled_step_s"], written["overhead"]) == (None, 0.45, None)
    assert profile_summary(rows, {})["layers_share_of_step"] is None  # no profile.json: no profiled step
    table = profile_layer_table(rows)
    assert list(table.columns) == ["phase", "layer", "time_s", "time_q25_s", "time_q75_s", "share", "gflops_per_s",
                                   "pct_of_peak", "memory_peak_bytes"]  # a memory column nobody filled: out
    assert table["time_s"].tolist() == [0.1, 0.3]
    one = rows.iloc[[1]].assign(steps=nan, batch_size=nan)  # one row, an old profile without steps or batch
    alone = profile_summary(one, {})
    assert (alone["steps"], alone["batch_size"], alone["config_name"], alone["dtype"]) == (None, None, "small",
                                                                                          "float32")
    assert profile_summary(rows.iloc[[1]], {})["batch_size"] == 32 and profile_steps(rows.iloc[[1]]) == 5


def test_the_direction_of_each_unit_by_hand():
    from harness.reporting.tables import better_direction

    assert [better_direction(unit) for unit in ("seconds", "bytes", "relative error")] == [-1, -1, -1]
    assert [better_direction(unit) for unit in ("GFLOP/s", "images/s", "tokens/s", "samples/S")] == [1, 1, 1, 0]
    assert [better_direction(unit) for unit in ("unknown", None, float("nan"))] == [0, 0, 0]


def change_flag(old, new, **fields):
    """change_of of one comparison row in seconds, both sides measured, without spreads unless given."""
    from harness.reporting.tables import change_of

    row = {"old": old, "new": new, "ratio": new / old, "unit": "seconds", "old_status": "ok", "new_status": "ok",
           "old_q25": NAN, "old_q75": NAN, "new_q25": NAN, "new_q75": NAN}
    return change_of(pd.Series({**row, **fields}))


def test_a_benchmark_of_one_run_only_is_missing_on_the_other_side():
    assert change_flag(1.0, 2.0, old_status="missing") == "missing in old"
    assert change_flag(1.0, 2.0, new_status="missing") == "missing in new"
    assert change_flag(1.0, 2.0) == "worse"


def test_the_summary_has_a_row_per_implementation_and_batch_and_no_row_for_a_figure_without_a_batch():
    rows = summary_rows() + [row("a", "max_rel_error", 5e-4, batch=NAN, unit="relative error"),
                             row("a", "compile_seconds", 2.0, batch=NAN)]
    frame = summary_table(tidy_frame(rows), 3)
    assert sorted(zip(frame["implementation"], frame["batch_size"])) == [
        ("torch-vectorised", 32), ("torch-vectorised", 128), ("torch-vectorised-cuda", 32)]
    assert frame.set_index(["implementation", "batch_size"]).loc[("torch-vectorised", 128), "max_rel_error"] == 5e-4


def test_the_change_flags_word_for_word():
    """n/a on either side or both; too few samples with the counts of both sides; "lower" for a unit that is
    neither better nor worse; the factor's edge (1.1 exactly) and touching spreads are no change."""
    assert change_flag(NAN, 1.0) == "n/a in old" and change_flag(1.0, NAN) == "n/a in new"
    assert change_flag(NAN, NAN) == "n/a in both"
    assert change_flag(1.0, 2.0, old_samples=1, new_samples=7) == "too few samples (old 1, new 7)"
    assert change_flag(1.0, 2.0, old_samples=7, new_samples=1) == "too few samples (old 7, new 1)"
    assert change_flag(4.0, 2.0, unit="unknown") == "lower" and change_flag(2.0, 4.0, unit="unknown") == "higher"
    assert change_flag(1.0, 1.1, ratio=1.1) == "" and change_flag(1.1, 1.0, ratio=1 / 1.1) == ""
    touching = dict(old_q25=0.9, old_q75=1.0, new_q25=1.0, new_q75=2.1, old_samples=5, new_samples=5)
    assert change_flag(0.95, 2.0, **touching) == ""
    assert change_flag(0.95, 2.0, **{**touching, "new_q25": 1.01}) == "worse"
    assert change_flag(2.0, 0.95, old_q25=1.0, old_q75=2.1, new_q25=0.9, new_q75=1.0, old_samples=5,
                       new_samples=5) == ""


def test_the_speedup_table_whole_with_a_phase_one_side_lacks():
    """Every column of every row, in order; a phase measured for the looped variant alone gives NaN, not a
    crash; another iteration count and a fixed-routing row stay out."""
    rows = [row("a", "train_step", 0.5), row("a", "forward", 0.2, batch=64),
            {**row("a", "train_step", 1.5), "implementation": "torch-looped", "routing_variant": "looped"},
            {**row("a", "forward", 0.6, batch=64), "implementation": "torch-looped", "routing_variant": "looped"},
            {**row("a", "routing", 0.3), "implementation": "torch-looped", "routing_variant": "looped"},
            {**row("a", "train_step", 9.0, iterations=5), "implementation": "torch-looped",
             "routing_variant": "looped"}]
    table = speedup_table(tidy_frame(rows), 3)
    assert list(table.columns) == SPEEDUP_COLUMNS
    pair = ("torch", "cpu", "torch (cpu)", "torch-vectorised", "torch-looped")
    records = [tuple(record.values()) for record in table.to_dict("records")]
    assert records[0] == pytest.approx((*pair, 64, "forward", 0.2, 0.6, 3.0))
    assert records[1][:7] == (*pair, 32, "routing") and math.isnan(records[1][7])
    assert records[1][8] == 0.3 and math.isnan(records[1][9])
    assert records[2] == (*pair, 32, "train_step", 0.5, 1.5, 3.0) and len(records) == 3


def test_looped_partners_by_name():
    from harness.reporting.tables import looped_partners

    vectorised, looped = ["torch-fused", "torch-vectorised"], ["torch-looped", "torch-looped-nightly"]
    assert looped_partners("torch-vectorised", vectorised, looped) == ["torch-looped"]
    assert looped_partners("torch-fused", vectorised, looped) == ["torch-looped-nightly"]  # no other's twin
    assert looped_partners("torch-fused", vectorised, ["torch-looped"]) == ["torch-looped"]  # all claimed: every one
    # a twin by name that was not measured is no partner
    assert looped_partners("torch-vectorised-compiled", ["torch-vectorised", "torch-vectorised-compiled"],
                           ["torch-looped"]) == ["torch-looped"]


def test_a_record_s_own_accuracies_win_and_what_it_lacks_is_not_invented():
    """Recorded best and final accuracy are shown as recorded (here the epochs were evaluated on fewer
    images, so they differ); an epoch without a training time adds none; a record without epochs has n/a
    accuracy and loss; a schedule without a name is "?"."""
    epochs = [{"epoch": 1, "mean_loss": 0.5, "test_accuracy": 0.9, "train_seconds": 10.0, "images": 100},
              {"epoch": 2, "mean_loss": 0.4, "test_accuracy": 0.8, "images": 100}]
    frame = training_table([
        (Path("recorded.json"), record(best_test_accuracy=0.95, final_test_accuracy=0.93, epochs=epochs,
                                       schedule={"decay_rate": 0.5})),
        (Path("empty.json"), record(epochs=[])),
    ]).set_index("file")
    recorded, empty = frame.loc["recorded.json"], frame.loc["empty.json"]
    assert (recorded["best_test_accuracy"], recorded["final_test_accuracy"]) == (0.95, 0.93)
    assert (recorded["train_seconds"], recorded["images_per_second"], recorded["schedule"]) == (10.0, 20.0, "?")
    assert all(math.isnan(empty[column]) for column in ("best_test_accuracy", "final_test_accuracy",
                                                        "final_mean_loss", "images_per_second"))


def test_parameter_labels_by_hand():
    from harness.reporting.tables import parameter_label

    step = pd.Series({"implementation": "torch-vectorised", "framework": "torch", "backend": "torch",
                      "batch_size": 32.0, "routing_iterations": 3.0, "routing_gradient": "full", "cache": "warm"})
    assert parameter_label(step, []) == "torch-vectorised, batch 32, 3 it."
    assert parameter_label({**step, "routing_gradient": "final"}, ["cache", "routing_gradient"]) == (
        "torch-vectorised, batch 32, 3 it., final gradient, cache=warm")
    machine = pd.Series({"implementation": None, "framework": "numpy", "backend": "openblas", "batch_size": NAN,
                         "routing_iterations": NAN, "cache": NAN})
    assert parameter_label(machine, ["cache"]) == "framework=numpy, backend=openblas"
    assert parameter_label(pd.Series({"batch_size": 8.0}), []) == "batch 8"


def test_a_comparison_of_runs_with_different_benchmarks_side_by_side():
    """Old has forward and backward, new has backward and train_step: three rows, each side's figures where
    it has them and "missing" where not; the unit and keys from whichever side has the row."""
    old = [row("a", "forward", 0.2, 0.19, 0.21, 5), row("a", "backward", 0.4, 0.39, 0.41, 5)]
    new = [row("b", "backward", 0.2, 0.19, 0.21, 7), row("b", "train_step", 0.9, 0.8, 1.0, 7, batch=64)]
    frame = comparison_table(tidy_frame(old + new), run("a"), run("b")).set_index("benchmark")
    assert sorted(frame.index) == ["time_backward", "time_forward", "time_train_step"]
    backward, forward, step = (frame.loc[name] for name in ("time_backward", "time_forward", "time_train_step"))
    assert [backward[c] for c in ("old", "old_q25", "old_q75", "old_samples", "new", "new_q25", "new_q75",
                                  "new_samples", "ratio", "change")] == [0.4, 0.39, 0.41, 5, 0.2, 0.19, 0.21, 7,
                                                                         0.5, "better"]
    assert (forward["old_status"], forward["new_status"], forward["change"]) == ("ok", "missing", "missing in new")
    assert (step["old_status"], step["new_status"], step["change"]) == ("missing", "ok", "missing in old")
    assert (step["unit"], step["implementation"], step["batch_size"], step["routing_iterations"]) == (
        "seconds", "torch-vectorised", 64, 3)
    assert (forward["unit"], forward["batch_size"]) == ("seconds", 32)


def test_a_comparison_keeps_the_final_gradient_rows_of_both_runs():
    rows = [row("a", "backward", 0.4, routing_gradient="final"), row("b", "backward", 0.2, routing_gradient="final")]
    frame = comparison_table(tidy_frame(rows), run("a"), run("b"))
    assert frame[["params", "old", "new"]].values.tolist() == [["torch-vectorised, batch 32, 3 it., final gradient",
                                                                0.4, 0.2]]


def test_the_routing_gradient_table_s_columns_measured_or_not():
    """The same 31 columns whether empty or not; an implementation measured at final alone is left out."""
    expected_head = ["implementation", "batch_size", "backward_full", "backward_full_q25", "backward_full_q75",
                     "backward_full_samples", "backward_final", "backward_final_q25", "backward_final_q75",
                     "backward_final_samples"]
    expected_tail = ["backward_saving", "train_step_saving", "routing_backward_saving", "routing_share_full",
                     "routing_share_final"]
    empty = routing_gradient_table(run_rows(tidy_frame([row("a", "forward", 0.5)]), run("a"), None), 3)
    columns = list(empty.columns)
    assert len(columns) == 31 and columns[:10] == expected_head and columns[-5:] == expected_tail
    rows = gradient_rows() + [row("a", "backward", 0.7, implementation="jax-vectorised", routing_gradient="final")]
    frame = routing_gradient_table(run_rows(tidy_frame(rows), run("a"), None), 3)
    assert sorted(frame.columns) == sorted(columns) and list(frame["implementation"]) == ["torch-vectorised"]


def test_asking_whether_a_training_process_lives_sends_it_nothing():
    """A live child is found and still running after the question; once it has ended and been reaped it is gone."""

    from harness.reporting.tables import process_exists

    with sleeping_child() as child:
        assert process_exists(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):  # still running: a signal other than 0 (SIGHUP) ends it
            child.wait(timeout=0.5)
    assert not process_exists(child.pid)


def test_someone_else_s_process_exists_though_it_may_not_be_signalled(monkeypatch):
    import harness.reporting.tables

    def refuse(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(harness.reporting.tables.os, "kill", refuse)
    assert harness.reporting.tables.process_exists(1)


def test_run_rows_keep_one_run_at_one_routing_gradient():
    table = tidy_frame(gradient_rows() + [row("b", "train_step", 0.7)])
    full = run_rows(table, run("a"))
    assert set(full["routing_gradient"]) == {"full"} and set(full["commit"]) == {"a"}
    assert len(full) == 5  # torch-vectorised's three at full, its forward, numpy's backward
    assert len(run_rows(table, run("a"), None)) == len(gradient_rows())
    assert sorted(run_rows(table, run("a"), "final")["value"]) == [0.04, 0.24, 0.44, 0.5]


def test_a_run_of_the_train_step_alone_gives_a_summary_with_every_column():
    """`asv run --bench TrainStep`: no routing, forward or memory benchmark; their columns are there, n/a."""
    from harness.reporting.tables import SUMMARY_METRICS

    rows = [row("a", "train_step", 0.4, 0.36, 0.48, 5)]
    frame = summary_table(tidy_frame(rows), 3)
    assert set(SUMMARY_METRICS) <= set(frame.columns)
    line = frame.iloc[0]
    assert line["train_step"] == 0.4 and line["images_per_second"] == pytest.approx(80.0)
    assert math.isnan(line["routing_share"]) and math.isnan(line["forward"])


def test_the_speedup_of_a_phase_the_looped_variant_lacks_is_nan_and_no_pair_is_an_empty_table():
    rows = [row("a", "train_step", 0.5), row("a", "backward", 0.3),
            {**row("a", "train_step", 1.5), "implementation": "torch-looped", "routing_variant": "looped"}]
    table = speedup_table(tidy_frame(rows), 3).set_index("phase")
    assert table.loc["train_step", "speedup"] == 3.0
    assert table.loc["backward", "vectorised_s"] == 0.3 and math.isnan(table.loc["backward", "looped_s"])
    assert math.isnan(table.loc["backward", "speedup"])
    alone = speedup_table(tidy_frame([row("a", "train_step", 0.5)]), 3)
    assert alone.empty and list(alone.columns) == SPEEDUP_COLUMNS


# ------------------------------------------------- the tables the report alone reached (tables-report mutants)

def test_the_summary_shows_the_default_routing_iterations_or_the_nearest_measured_with_a_note():
    def iterations(*measured, metric="train_step"):
        return step_iterations(tidy_frame([row("a", metric, 1.0, iterations=count) for count in measured]), "paper")

    assert iterations(1, 3, 5) == (3, "")
    note = "3 routing iterations (the default) were not measured; showing {}."
    assert iterations(2, 5) == (2, note.format(2))
    assert iterations(5, 1) == (1, note.format(1))  # as near as 5: the smaller
    assert iterations(4, 10) == (4, note.format(4))
    assert iterations(1, 4) == (4, note.format(4))  # the nearest, not the smallest
    assert iterations(1, 5, metric="routing") == (3, "")  # only the whole-network step counts


def test_host_memory_is_the_step_minus_the_process_before_the_model_beside_the_expected_figure():
    def memory(name, framework, before, after, iterations=3, device="cpu"):
        return [row("a", "host_memory_before_model", before, unit="bytes", implementation=name, framework=framework,
                    iterations=iterations, device=device),
                row("a", "host_memory", after, unit="bytes", implementation=name, framework=framework,
                    iterations=iterations, device=device)]

    rows = tidy_frame(memory("torch-vectorised", "torch", 1e6, 9e9, iterations=1)  # another iteration count
                      + memory("torch-vectorised-cuda", "torch", 1e6, 9e9, device="cuda")  # not host memory
                      + memory("numpy-vectorised", "numpy", 400e6, 1000e6)
                      + memory("torch-vectorised", "torch", 500e6, 900e6))
    frame = memory_table(rows, 3, "paper")
    config = CONFIGS["paper"].replace(routing_iterations=3)
    assert frame["implementation"].tolist() == ["numpy-vectorised", "torch-vectorised"]
    assert frame["model_and_step"].tolist() == [600e6, 400e6]
    expected = parameter_state_bytes(config) + sum(kept_activations(config, 32).values())
    assert frame["expected"].tolist() == [expected, expected]
    assert frame["im2col"].tolist() == [im2col_bytes(config, 32), 0]  # only NumPy keeps its patches
    assert frame["ratio"].tolist() == pytest.approx([600e6 / (expected + im2col_bytes(config, 32)), 400e6 / expected])
    only_after = tidy_frame([memory("torch-vectorised", "torch", 500e6, 900e6)[1]])
    assert memory_table(only_after, 3, "paper").empty  # without the figure before the model: no table


def scaling_run(world_size, threads, images_per_second, **extra):
    return {"world_size": world_size, "threads_per_rank": threads, "per_rank_batch_size": 32,
            "global_batch_size": 32 * world_size, "steps": 20, "step_seconds": 0.5,
            "images_per_second": images_per_second,
            "allreduce_seconds": None if world_size == 1 else 0.05, "allreduce_share": None if world_size == 1 else 0.1,
            **extra}


def test_the_distributed_table_labels_each_file_and_divides_by_the_compute_of_its_device():
    spread = {"step_seconds_q25": 0.45, "step_seconds_q75": 0.55}  # ±10 % each
    cpu = {"implementation": "torch-vectorised", "backend": "gloo", "device": "cpu", "config_name": "small",
           "machine": {"cpu": "AMD EPYC"},
           "runs": [scaling_run(2, 1, 64.0, **spread), scaling_run(1, 2, 64.0, **spread)]}  # listed out of order
    gpu = {"implementation": "torch-vectorised-cuda", "backend": "nccl", "device": "cuda", "config_name": "paper",
           "scaling": "weak", "runs": [scaling_run(1, 2, 100.0), scaling_run(2, 2, 150.0, step_seconds=0.25)]}
    bare = {"runs": [{key: value for key, value in scaling_run(1, 1, 10.0).items() if key != "steps"}]}
    frame = distributed_table([(Path("a.json"), cpu), (Path("b.json"), cpu), (Path("g.json"), gpu),
                               (Path("old.json"), bare)])
    assert frame["label"].tolist() == ["torch-vectorised (gloo, cpu) [a]"] * 2 \
        + ["torch-vectorised (gloo, cpu) [b]"] * 2 + ["torch-vectorised-cuda (nccl, cuda, weak scaling)"] * 2 \
        + ["? (?, ?)"]
    assert frame["implementation"].tolist()[:6] == ["torch-vectorised"] * 4 + ["torch-vectorised-cuda"] * 2
    assert frame[["implementation", "backend", "config"]].iloc[6].isna().all()  # a file that does not say
    assert frame["backend"].tolist()[:6] == ["gloo"] * 4 + ["nccl"] * 2
    assert frame["device"].tolist() == ["cpu"] * 4 + ["cuda"] * 2 + ["cpu"]  # none said: the CPU
    assert frame["config"].tolist()[:6] == ["small"] * 4 + ["paper"] * 2
    assert frame["world_size"].tolist() == [1, 2, 1, 2, 1, 2, 1]
    assert frame["steps"].tolist()[:6] == [20] * 6 and math.isnan(frame["steps"].iloc[6])
    assert frame["threads_per_rank"].tolist() == [2, 1, 2, 1, 2, 2, 1]
    assert frame["per_rank_batch_size"].tolist() == [32] * 7
    assert frame["global_batch_size"].tolist() == [32, 64, 32, 64, 32, 64, 32]
    assert frame["step_seconds"].tolist() == [0.5] * 5 + [0.25, 0.5]
    assert frame["images_per_second"].tolist() == [64.0] * 4 + [100.0, 150.0, 10.0]
    assert frame["machine"].tolist() == [{"cpu": "AMD EPYC"}] * 4 + [{}] * 3
    # the CPU: 2 ranks x 1 thread is the compute of 1 rank x 2 threads, so equal images/s is linear scaling;
    # on GPUs the compute is the ranks: 1.5x the images/s on 2 GPUs is 75 %
    assert frame["compute_units"].tolist() == [2, 2, 2, 2, 1, 2, 1]
    assert frame["efficiency"].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 1.0])
    assert frame["ideal_images_per_second"].tolist() == pytest.approx([64.0, 64.0, 64.0, 64.0, 100.0, 200.0, 10.0])
    assert frame["efficiency_caveat"].iloc[1].startswith("the step times spread by ±20%")  # 1.0 within ±20 %
    assert frame["allreduce_seconds"].dtype == float and math.isnan(frame["allreduce_seconds"].iloc[0])
    assert frame["allreduce_share"].tolist()[1] == 0.1 and math.isnan(frame["allreduce_share"].iloc[0])
    alone = distributed_table([(Path("one.json"), {"runs": [scaling_run(1, 2, 64.0)]})])  # one rank: no all-reduce
    assert alone["allreduce_seconds"].dtype == float and alone["allreduce_share"].dtype == float


# ---------------------------------------------------------------------------------------------- routing algorithm
def algorithm_rows(commit="a", attention_iterations=3) -> list[dict]:
    """torch-fused at batch 128: train step 1.00 s dynamic (q 0.90–1.10), 0.80 s self-attention (0.76–0.84);
    routing forward + backward 0.20 s (0.19–0.21) at 3 iterations and 0.10 s at 1 (another count), 0.08 s
    (0.078–0.082) under self-attention; host memory 500 / 480 MiB with 300 MiB before the model under both.
    numpy-vectorised under dynamic routing alone.  Self-attention at ``attention_iterations``."""
    mib = 2**20
    attention = dict(routing_algorithm="self-attention", implementation="torch-fused", batch=128)
    dynamic = dict(routing_algorithm="dynamic", implementation="torch-fused", batch=128)
    return [
        row(commit, "train_step", 1.00, 0.90, 1.10, 7, **dynamic),
        row(commit, "train_step", 0.80, 0.76, 0.84, 7, iterations=attention_iterations, **attention),
        row(commit, "routing_backward", 0.20, 0.19, 0.21, 7, **dynamic),
        row(commit, "routing_backward", 0.10, 0.09, 0.11, 7, iterations=1, **dynamic),
        row(commit, "routing_backward", 0.08, 0.078, 0.082, 7, iterations=attention_iterations, **attention),
        row(commit, "routing_backward", NAN, iterations=1 if attention_iterations != 1 else 5, **attention),
        row(commit, "host_memory", 500.0 * mib, unit="bytes", **dynamic),
        row(commit, "host_memory_before_model", 300.0 * mib, unit="bytes", **dynamic),
        row(commit, "host_memory", 480.0 * mib, unit="bytes", iterations=attention_iterations, **attention),
        row(commit, "host_memory_before_model", 300.0 * mib, unit="bytes", iterations=attention_iterations,
            **attention),
        row(commit, "train_step", 1.30, 1.2, 1.4, 7, implementation="numpy-vectorised", batch=128),
        row(commit, "train_step", NAN, implementation="numpy-vectorised", batch=128, **{
            "routing_algorithm": "self-attention"}),
    ]


def test_each_routing_algorithm_beside_dynamic_routing_by_hand():
    from harness.reporting.tables import routing_algorithm_table, timed_under_dynamic_alone

    table = tidy_frame(algorithm_rows())
    rows = run_rows(table, run("a"), routing_algorithm=None)
    frame = routing_algorithm_table(rows, 3, {"dynamic": True, "self-attention": False})
    assert list(frame["implementation"]) == ["torch-fused"]  # numpy-vectorised: dynamic routing alone
    line = frame.iloc[0]
    assert line["train_step_ratio_self-attention"] == pytest.approx(0.8)
    assert line["train_step_ratio_self-attention_low"] == pytest.approx(0.76 / 1.10)  # q25 / the other's q75
    assert line["train_step_ratio_self-attention_high"] == pytest.approx(0.84 / 0.90)
    assert line["routing_backward_dynamic"] == pytest.approx(0.20)  # at 3 iterations, not 1's 0.10
    assert line["routing_backward_ratio_self-attention"] == pytest.approx(0.4)
    assert line["routing_backward_ratio_self-attention_low"] == pytest.approx(0.078 / 0.21)
    assert line["routing_share_dynamic"] == pytest.approx(0.2) and line["routing_share_self-attention"] == \
        pytest.approx(0.1)
    assert line["routing_share_ratio_self-attention"] == pytest.approx(0.5)
    assert line["host_model_and_step_dynamic"] == 200 * 2**20 and line["host_model_and_step_self-attention"] == \
        180 * 2**20
    assert line["host_model_and_step_ratio_self-attention"] == pytest.approx(0.9)
    assert (line["train_step_self-attention_q25"], line["train_step_self-attention_samples"]) == (0.76, 7)
    assert math.isnan(line["gpu_memory_allocator_live_self-attention"])
    assert timed_under_dynamic_alone(rows, frame) == {"self-attention": ["numpy-vectorised"]}


def test_a_non_iterative_algorithm_is_taken_at_the_count_it_was_measured_and_an_iterative_one_at_the_step_count():
    """Self-attention measured at 5 iterations (a grid without 3): taken there when the run says it is not
    iterative, and not at all when it says it is (every count then stands for itself)."""
    from harness.reporting.tables import routing_algorithm_table

    rows = run_rows(tidy_frame(algorithm_rows(attention_iterations=5)), run("a"), routing_algorithm=None)
    frame = routing_algorithm_table(rows, 3, {"self-attention": False})
    assert frame.iloc[0]["routing_backward_ratio_self-attention"] == pytest.approx(0.4)
    assert routing_algorithm_table(rows, 3, {"self-attention": True}).empty
    assert routing_algorithm_table(rows, 3).empty  # nothing said: iterative


def test_every_other_table_sees_dynamic_routing_and_old_results_are_dynamic():
    table = tidy_frame(algorithm_rows())
    summary = summary_table(run_rows(table, run("a")), 3).set_index(["implementation", "batch_size"])
    assert summary.loc[("torch-fused", 128), "train_step"] == pytest.approx(1.00)  # not self-attention's 0.80
    assert summary.loc[("torch-fused", 128), "routing_share"] == pytest.approx(0.2)
    old = tidy_frame([row("a", "train_step", 0.5)])  # no routing_algorithm parameter at all
    assert old["routing_algorithm"].tolist() == ["dynamic"]
    from harness.reporting.tables import routing_algorithm_table

    assert routing_algorithm_table(run_rows(old, run("a"), routing_algorithm=None), 3).empty


def test_the_flops_of_a_phase_are_counted_for_dynamic_routing_alone():
    from harness.suite.asv_results import add_flops

    table = add_flops(tidy_frame([row("a", "train_step", 1.0, routing_algorithm=algorithm, profile="fast")
                                  for algorithm in ("dynamic", "self-attention")]))
    flops = dict(zip(table["routing_algorithm"], table["flops"]))
    assert flops["dynamic"] > 0 and math.isnan(flops["self-attention"])


def test_cells_never_measured_under_their_algorithm_are_not_applicable_and_left_out_of_every_table():
    """Self-attention is not iterative: its cells at 1 and 5 iterations of a 1, 3, 5 grid are no skip of
    anything (the suite measures it at 3 alone), nor is self-attention at the final gradient; a skipped cell
    of dynamic routing, or of self-attention at 3, stays a skip; an algorithm the facts call iterative, or do
    not describe (a plugin's, from another machine), keeps every cell."""
    from harness.suite.asv_results import NOT_APPLICABLE, mark_not_applicable

    def cells(algorithm, gradient="full"):
        return [{"routing_algorithm": algorithm, "routing_iterations": count, "routing_gradient": gradient,
                 "status": "skipped"} for count in (1, 3, 5)]

    grid = cells("self-attention") + cells("dynamic") + cells("self-attention", "final") + cells("plugin-routing")
    grid.append({"routing_algorithm": "self-attention", "routing_iterations": 5, "status": "ok"})
    mark_not_applicable(grid, {}, 3)
    statuses = [cell["status"] for cell in grid]
    assert statuses[:3] == [NOT_APPLICABLE, "skipped", NOT_APPLICABLE]
    assert statuses[3:6] == ["skipped"] * 3
    assert statuses[6:9] == [NOT_APPLICABLE] * 3
    assert statuses[9:12] == ["skipped"] * 3  # an algorithm nothing describes
    assert statuses[12] == "ok"  # a measured figure is never hidden
    plugin = cells("plugin-routing")
    mark_not_applicable(plugin, {"routing_algorithms": {"plugin-routing": {"iterative": False}}}, 1)
    assert [cell["status"] for cell in plugin] == ["skipped", NOT_APPLICABLE, NOT_APPLICABLE]  # measured at 1
    rows = [row("a", "routing_backward", NAN, iterations=count, routing_algorithm="self-attention")
            for count in (1, 3, 5)]
    for each, status in zip(rows, (NOT_APPLICABLE, "skipped", NOT_APPLICABLE)):
        each["status"] = status
    shown = run_rows(tidy_frame(rows), run("a"), routing_algorithm=None)
    assert list(shown["routing_iterations"]) == [3]
    assert len(comparison_table(tidy_frame(rows + [dict(r, commit="b") for r in rows]), run("a"), run("b"))) == 1


def test_parameter_labels_name_an_algorithm_other_than_dynamic():
    from harness.reporting.tables import parameter_label

    step = pd.Series({"implementation": "torch-fused", "batch_size": 128.0, "routing_iterations": 3.0,
                      "routing_gradient": "full", "routing_algorithm": "dynamic"})
    assert parameter_label(step, ["routing_gradient", "routing_algorithm"]) == "torch-fused, batch 128, 3 it."
    assert parameter_label({**step, "routing_algorithm": "self-attention"}, ["routing_algorithm"]) == (
        "torch-fused, batch 128, 3 it., self-attention routing")


def test_a_ratio_is_written_with_its_range_over_the_two_interquartile_ranges_and_a_single_sample_without():
    from harness.reporting.sections import ratio_cell

    assert ratio_cell(0.8, 0.76 / 1.10, 0.84 / 0.90) == "0.80× (0.69–0.93×)"
    assert ratio_cell(0.4, 0.4, 0.4) == "0.40×"  # one sample each: q25 = q75 = the value, no range
    assert ratio_cell(0.4, NAN, NAN) == "0.40×" and ratio_cell(NAN, 0.3, 0.5) == "n/a"
