"""python -m harness.report on real asv output (tests/fixtures/asv_cpu_fast, a quick CPU run of the suite:
one sample per benchmark) and on copies of it given several samples and a spread: the tidy table holds
exactly what the files hold, every derived figure of the summary equals the one computed here by hand from
the fixture's raw numbers, every plot is a real PNG, two runs are compared (and single samples are not
judged), the profile fixture (tests/fixtures/report/profile) becomes a section and a plot, and missing or
malformed inputs end in one clear line."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import image

from harness import report, train
from harness.measure.flops import phase_flops
from harness.reporting import sections
from harness.reporting.tables import plan_lines
from harness.spec import PAPER
from harness.suite.asv_results import load_asv

from conftest import run_module

FIXTURE = Path(__file__).parent / "fixtures" / "asv_cpu_fast"
PROFILE = Path(__file__).parent / "fixtures" / "report" / "profile"
MACHINE = "vm"
RUN_FILE = next((FIXTURE / MACHINE).glob("*-*.json"), None) if (FIXTURE / MACHINE).is_dir() else None
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_STEP = "bench_phases.TrainStep.time_train_step"
ROUTING_BACKWARD = "bench_phases.Routing.time_routing_backward"
GEMM_PEAK = "bench_peak.GemmPeak.track_gemm_peak_gflops"
NOT_RUN = ["cupy-looped", "cupy-vectorised", "torch-looped-cuda", "torch-vectorised-cuda"]
MEASURED = ["numpy-looped", "numpy-vectorised", "torch-looped", "torch-vectorised"]
# The paper network, counted by hand (harness.measure.expected_memory' docstring has the same figures):
PAPER_PARAMETERS = 8_215_568
KEPT_VALUES_PER_IMAGE = (784  # the images
                         + 20 * 20 * 256  # the Conv1 output
                         + 2 * 1152 * 8  # primary capsules before and after the squash
                         + 1152 * 10 * 16  # u_hat
                         + 3 * (1152 * 10 + 2 * 10 * 16)  # per routing iteration c, s and v
                         + 10  # lengths
                         + 160 + 512 + 1024 + 784)  # the decoder's input and layer outputs
IM2COL_VALUES_PER_IMAGE = 20 * 20 * 9 * 9 * 1 + 6 * 6 * 9 * 9 * 256  # the patches of both convolutions


def fixture_json() -> dict:
    """The fixture's results file, read with json alone (not with the code under test)."""
    return json.loads(RUN_FILE.read_text())


def fixture_value(benchmark: str, *params) -> float:
    """One result of the fixture, found with json alone: ``params`` as asv stores them (repr strings)."""
    fields = dict(zip(fixture_json()["result_columns"], fixture_json()["results"][benchmark]))
    return dict(zip(itertools.product(*fields["params"]), fields["result"]))[params]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def results_layout(root: Path) -> Path:
    """The fixture arranged as a results folder: <root>/asv/... and <root>/asv-facts/..."""
    shutil.copytree(FIXTURE, root / "asv", ignore=shutil.ignore_patterns("asv-facts"))
    shutil.copytree(FIXTURE / "asv-facts", root / "asv-facts")
    return root


def add_run(root: Path, commit: str, transform, date_offset_ms: int = 86_400_000) -> Path:
    """A second run beside the fixture's: the fixture's file with another commit, a later date, and every
    benchmark entry passed through ``transform(name, entry, columns)``."""
    payload = fixture_json()
    payload["commit_hash"] = commit
    payload["date"] += date_offset_ms
    columns = payload["result_columns"]
    payload["results"] = {name: transform(name, list(entry), columns) for name, entry in payload["results"].items()}
    path = root / "asv" / MACHINE / f"{commit[:8]}-{payload['env_name']}.json"
    path.write_text(json.dumps(payload))
    return path


def with_samples(repeat: int, low: float, high: float):
    """Give every timed result ``repeat`` samples and the interquartile range [value * low, value * high]."""
    def transform(name, entry, columns):
        if "stats_repeat" not in columns or columns.index("stats_repeat") >= len(entry):
            return entry  # a track_ benchmark: no statistics
        values = entry[columns.index("result")]
        if not isinstance(values, list):
            return entry
        measured = [isinstance(v, (int, float)) and not math.isnan(v) for v in values]
        for column, factor in (("stats_q_25", low), ("stats_q_75", high)):
            entry[columns.index(column)] = [v * factor if ok else None for v, ok in zip(values, measured)]
        entry[columns.index("stats_repeat")] = [repeat if ok else None for ok in measured]
        return entry
    return transform


def chain(*transforms):
    def transform(name, entry, columns):
        for each in transforms:
            entry = each(name, entry, columns)
        return entry
    return transform


def markdown_tables(text: str, section: str) -> list[list[dict[str, str]]]:
    """The Markdown tables of a ``## section`` of a report, each a list of rows keyed by the headings."""
    lines = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    tables, current = [], None
    for line in lines + [""]:
        if line.startswith("| "):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            if current is None:
                current = {"header": cells, "rows": []}
            elif not set("".join(cells)) <= set("-: "):
                current["rows"].append(dict(zip(current["header"], cells)))
        elif current is not None:
            tables.append(current["rows"])
            current = None
    return tables


def cell(row: dict[str, str], heading: str) -> str:
    """The cell of the one column whose heading starts with ``heading``."""
    names = [name for name in row if name.startswith(heading)]
    assert len(names) == 1, (heading, list(row))
    return row[names[0]]


def assert_shows(text: str, expected: float) -> None:
    """``text`` ("26.1%", "1.55×", "121") is ``expected`` written with the digits it shows."""
    number = text.rstrip("%×").replace(",", "")
    decimals = len(number.split(".")[1]) if "." in number else 0
    assert abs(float(number) - expected) <= 0.5 * 10**-decimals + 1e-9, (text, expected)


def scaled(factor: float):
    """Multiply every result and quartile by ``factor`` (nulls and NaNs stay as they are)."""
    def transform(name, entry, columns):
        for column in ("result", "stats_q_25", "stats_q_75"):
            index = columns.index(column)
            if index < len(entry) and isinstance(entry[index], list):
                entry[index] = [v * factor if isinstance(v, (int, float)) else v for v in entry[index]]
        return entry
    return transform


def assert_png_with_content(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50, f"{path} is (nearly) one colour"


def run_report(root: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = report.main(["--results", str(root), "--out", str(root / "report"), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def tables_only(monkeypatch):
    """Skip the benchmark figures (a second or two each run) in tests about the tables."""
    monkeypatch.setattr(report, "benchmark_plots", lambda *args: None)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    """One copy of the fixture in the results layout, for the tests that only read it."""
    return results_layout(tmp_path_factory.mktemp("fixture") / "results")


@pytest.fixture(scope="module")
def training_file(tmp_path_factory, mnist_path) -> Path:
    """One short real training run (small network, 256 images, 2 epochs)."""
    out = tmp_path_factory.mktemp("training") / "torch-vectorised_small.json"
    code = train.main(["--impl", "torch-vectorised", "--config", "small", "--limit", "256", "--test-limit", "100",
                       "--batch-size", "64", "--epochs", "2", "--data-dir", str(mnist_path), "--out", str(out)])
    assert code == 0
    return out


def test_fixture_is_real_asv_output():
    assert RUN_FILE is not None, "tests/fixtures/asv_cpu_fast/vm/<commit>-<env>.json is missing"
    payload = fixture_json()
    assert payload["version"] == 2 and "result" in payload["result_columns"]


def test_tidy_rows_equal_the_numbers_in_the_file(tmp_path):
    """Every train-step row of two runs, the fixture's (one sample each, q25 = q75) and a copy with seven
    samples and q25 < q75, against the file read with json alone: value, q25, q75 and samples."""
    root = results_layout(tmp_path / "results")
    spread_file = add_run(root, "9" * 40, with_samples(7, 0.9, 1.2))
    table = load_asv(root).table
    for path in (RUN_FILE, spread_file):
        payload = json.loads(path.read_text())
        entry = dict(zip(payload["result_columns"], payload["results"][TRAIN_STEP]))
        combinations = list(itertools.product(*entry["params"]))
        rows = table[(table["benchmark"] == "time_train_step") & (table["commit"] == payload["commit_hash"])]
        assert len(rows) == len(combinations) == 8 * 2 * 1  # implementations x batch sizes x iterations
        for index, (name, batch, iterations) in enumerate(combinations):
            match = rows[(rows["implementation"] == json.loads(name.replace("'", '"')))
                         & (rows["batch_size"] == int(batch)) & (rows["routing_iterations"] == int(iterations))]
            assert len(match) == 1
            found = match.iloc[0]
            expected = entry["result"][index]
            if expected is None or (isinstance(expected, float) and math.isnan(expected)):
                assert math.isnan(found["value"])  # skipped on this machine: kept as a row with no value
                assert math.isnan(found["samples"]) and math.isnan(found["q25"])
            else:
                assert found["value"] == expected
                assert found["q25"] == entry["stats_q_25"][index]
                assert found["q75"] == entry["stats_q_75"][index]
                assert found["samples"] == entry["stats_repeat"][index]
                assert found["spread"] == found["q75"] - found["q25"]
        if path == spread_file:
            assert (rows["q25"] < rows["q75"]).sum() == 8 and set(rows["samples"].dropna()) == {7}
        else:
            assert set(rows["samples"].dropna()) == {1}
    rows = table[(table["benchmark"] == "time_train_step") & (table["commit"] == fixture_json()["commit_hash"])]
    cuda = rows[rows["device"] == "cuda"]
    assert len(cuda) == 8 and cuda["value"].isna().all() and (cuda["status"] == "skipped").all()
    measured = rows.dropna(subset=["value"]).iloc[0]
    config = PAPER.replace(routing_iterations=int(measured["routing_iterations"]))
    assert measured["flops"] == phase_flops(config, int(measured["batch_size"]))["train_step"]
    assert measured["gflops_per_s"] == pytest.approx(measured["flops"] / measured["value"] / 1e9)
    peaks = table[table["benchmark"] == "track_gemm_peak_gflops"]
    assert peaks["samples"].isna().all()  # a track_ benchmark records no statistics


def test_every_benchmark_and_combination_is_a_row(fixture_root):
    table = load_asv(fixture_root).table
    payload = fixture_json()
    expected = sum(len(list(itertools.product(*dict(zip(payload["result_columns"], entry))["params"])))
                   for entry in payload["results"].values())
    assert len(table) == expected
    routing = table[table["benchmark"] == "time_routing"]
    assert sorted(routing["routing_iterations"].unique()) == [1, 3, 5]
    context = table[table["benchmark"] == "track_cuda_context_bytes"]
    assert context["implementation"].isna().all() and set(context["framework"]) == {"cupy", "torch"}
    assert table.loc[table["benchmark"] == "track_threads", "value"].tolist() == [2]


def test_report_and_plots_from_the_fixture_and_a_training_run(tmp_path, capsys, training_file):
    root = results_layout(tmp_path / "results")
    (root / "training").mkdir()
    shutil.copy(training_file, root / "training")
    (root / "report").mkdir()
    for stale in ("roofline.png", "phase_times_another-machine.png", "profile.png", "notes.png"):
        (root / "report" / stale).write_bytes(b"an older report's plot")
    code, out, err = run_report(root, capsys)
    assert code == 0 and err == ""
    folder = root / "report"
    assert "report.md" in out
    for name in ("phase_times", "batch_scaling", "routing_iterations", "vectorised_speedup", "memory",
                 "peak_share", "training_curves"):
        assert_png_with_content(folder / f"{name}.png")
    assert not (folder / "roofline.png").exists()  # renamed peak_share.png: the stale file is gone
    # plots of results this report was not built from are gone too; a file that is not a plot stays
    assert not (folder / "phase_times_another-machine.png").exists() and (folder / "notes.png").exists()
    text = (folder / "report.md").read_text()
    assert "roofline" not in text
    assert "Intel(R) Xeon(R) Processor" in text and fixture_json()["commit_hash"] in text
    assert "torch 2.13.0+cpu" in text and "benchmark profile: fast (network: paper)" in text
    # every heading of a run names its environment
    label = f"vm @ {fixture_json()['commit_hash'][:8]}, py3.11-torch2.13.0"
    assert text.count(f"### {label}\n") == 4  # runs, summary, speed-up, host memory
    assert "## Where the time of a training step goes" not in text and not (folder / "profile.png").exists()
    # implementations that cannot run here: one line per table, no rows of n/a
    for name in NOT_RUN:
        assert f"| {name} |" not in text
    assert f"Not run here: {', '.join(NOT_RUN)} (unavailable: no CUDA GPU on this machine)." in text
    assert "Not run here: cupy (cuda), torch (cuda) (unavailable: no CUDA GPU on this machine)." in text
    assert "| torch (cpu) | 128 |" in text  # the speed-up table
    assert "## Training" in text
    training = markdown_tables(text, "Training")
    assert "\n### 256 training images, 100 test images (small network)" in text
    (run,) = training[0]
    assert [run[key] for key in ("file", "implementation", "device", "network", "batch", "ranks", "training images",
                                 "test images", "schedule", "epochs", "status")] == [
        "torch-vectorised_small.json", "torch-vectorised", "cpu", "small", "64", "1", "256", "100", "paper", "2/2",
        "completed"]
    record = json.loads(training_file.read_text())
    assert_shows(run["best test accuracy"], 100 * record["best_test_accuracy"])
    assert_shows(run["final test accuracy"], 100 * record["final_test_accuracy"])
    assert_shows(run["evaluation s"], sum(epoch["eval_seconds"] for epoch in record["epochs"]))
    assert_shows(run["wall s"], sum(epoch["wall_seconds"] for epoch in record["epochs"]))
    assert not (folder / "comparison.md").exists()
    tidy = (folder / "results_tidy.csv").read_text().splitlines()
    assert tidy[0].startswith("implementation,framework,device,routing_variant,backend,batch_size,"
                              "routing_iterations,benchmark,metric,value,unit,spread,q25,q75,samples,status")


def test_every_derived_figure_of_the_summary_is_the_one_computed_by_hand(fixture_root, tmp_path, capsys):
    """images/s, GFLOP/s, % of peak, routing share, measured / expected host memory and the
    vectorised speed-ups of every measured row, from the fixture's raw numbers and the paper network's
    sizes; FLOPs from harness.measure.flops (checked against a hand count in tests/test_flops.py)."""
    code, _, err = run_report(fixture_root, capsys, "--out", str(tmp_path / "report"))
    assert code == 0 and err == ""
    text = (tmp_path / "report" / "report.md").read_text()
    (summary,) = markdown_tables(text, "Summary per implementation")
    assert [(row["implementation"], row["batch"]) for row in summary] == [
        (name, batch) for name in MEASURED for batch in ("32", "128")]
    for row in summary:
        name, batch = row["implementation"], int(row["batch"])
        params = (f"'{name}'", str(batch), "3")
        step = fixture_value(TRAIN_STEP, *params)
        routing = fixture_value(ROUTING_BACKWARD, *params)
        # the fixture's facts predate the hardware peak: one figure for all, the best GEMM of the run
        peak = max(fixture_value(GEMM_PEAK, "'numpy'"), fixture_value(GEMM_PEAK, "'torch'"))
        gflops = phase_flops(PAPER, batch)["train_step"] / step / 1e9
        assert cell(row, "train step ms") == ms(step)  # one sample: the sample itself, no range
        assert_shows(row["images/s"], batch / step)
        assert_shows(row["train GFLOP/s"], gflops)
        assert_shows(row["% of peak"], 100 * gflops / peak)
        assert_shows(row["routing share"], 100 * routing / step)
    assert cell(summary[0], "train step ms") and "train step ms (1 sample)" in summary[0]
    (memory,) = markdown_tables(text, "Host memory of a training step: measured and expected")
    for row in memory:
        name, batch = row["implementation"], int(row["batch"])
        params = (f"'{name}'", str(batch), "3")
        measured = (fixture_value("bench_memory.HostMemory.track_host_memory_train_step", *params)
                    - fixture_value("bench_memory.HostMemory.track_host_memory_before_model", *params))
        expected = 4 * 4 * PAPER_PARAMETERS + 4 * KEPT_VALUES_PER_IMAGE * batch
        im2col = 4 * IM2COL_VALUES_PER_IMAGE * batch if name.startswith("numpy") else 0
        assert_shows(row["measured MiB"], measured / 2**20)
        assert_shows(row["im2col kept MiB"], im2col / 2**20)
        assert_shows(row["measured / expected"], measured / (expected + im2col))
    assert len(memory) == 8
    (speedups,) = markdown_tables(text, "Vectorised vs looped routing")
    phases = {"train step": TRAIN_STEP, "forward": "bench_phases.Forward.time_forward",
              "backward": "bench_phases.Backward.time_backward", "inference": "bench_phases.Inference.time_inference",
              "routing": "bench_phases.Routing.time_routing", "routing fwd+bwd": ROUTING_BACKWARD}
    assert [(row["framework (device)"], row["batch"]) for row in speedups] == [
        ("numpy (cpu)", "32"), ("numpy (cpu)", "128"), ("torch (cpu)", "32"), ("torch (cpu)", "128")]
    for row in speedups:
        framework = row["framework (device)"].split()[0]
        for heading, benchmark in phases.items():
            params = (str(row["batch"]), "3")
            looped = fixture_value(benchmark, f"'{framework}-looped'", *params)
            vectorised = fixture_value(benchmark, f"'{framework}-vectorised'", *params)
            assert_shows(row[heading], looped / vectorised)


def test_several_samples_show_the_median_and_its_interquartile_range(tmp_path, capsys, tables_only):
    """A run with five samples per benchmark and q25, q75 = 0.95, 1.1 x the median: the summary shows
    each time with its range and says how many samples stand behind it."""
    root = tmp_path / "results"
    shutil.copytree(FIXTURE, root / "asv", ignore=shutil.ignore_patterns("asv-facts", "*-*.json"))
    shutil.copytree(FIXTURE / "asv-facts", root / "asv-facts")
    payload = fixture_json()
    columns = payload["result_columns"]
    transform = with_samples(5, 0.95, 1.1)
    payload["results"] = {name: transform(name, list(entry), columns) for name, entry in payload["results"].items()}
    (root / "asv" / MACHINE / RUN_FILE.name).write_text(json.dumps(payload))
    code, _, err = run_report(root, capsys)
    assert code == 0 and err == ""
    text = (root / "report" / "report.md").read_text()
    (summary,) = markdown_tables(text, "Summary per implementation")
    row = next(row for row in summary if (row["implementation"], row["batch"]) == ("torch-vectorised", "32"))
    step = fixture_value(TRAIN_STEP, "'torch-vectorised'", "32", "3")
    assert "train step ms, median (q25–q75) of 5 samples" in row
    assert row["train step ms, median (q25–q75) of 5 samples"] == f"{ms(step)} ({ms(0.95 * step)}–{ms(1.1 * step)})"
    assert "single sample" not in text.split("## Summary per implementation")[1].split("## Vectorised")[0]


def comparison_line(root: Path, benchmark: str, params: str) -> str:
    comparison = (root / "report" / "comparison.md").read_text()
    return next(line for line in comparison.splitlines() if line.startswith(f"| {benchmark} | {params} |"))


def test_single_sample_runs_are_too_few_to_judge(tmp_path, capsys, tables_only):
    """The fixture is one sample per benchmark: a doubling is listed with its ratio, not called worse."""
    root = results_layout(tmp_path / "results")
    add_run(root, "f" * 40, scaled(2.0))
    code, _, err = run_report(root, capsys)
    assert code == 0 and err == ""
    comparison = (root / "report" / "comparison.md").read_text()
    line = comparison_line(root, "time_train_step", "torch-vectorised, batch 32, 3 it.")
    old = fixture_value(TRAIN_STEP, "'torch-vectorised'", "32", "3")
    assert f"| {ms(old)} ms (1 sample) | {ms(2 * old)} ms (1 sample) | 2.00× | too few samples (old 1, new 1) |" \
        in line
    assert "**Too few samples to judge**: the old and new runs" in comparison
    timings = [line for line in comparison.splitlines() if line.startswith("| time_")]
    assert len(timings) == 4 * 2 * (4 + 2 * 3)  # 4 CPU implementations x 2 batches x (4 phases + 2 routing x 3 it.)
    assert not [line for line in timings if "**" in line]  # no timing called worse or better
    assert all(line.endswith("| too few samples (old 1, new 1) |") for line in timings)
    # a figure asv records without statistics (peakmem_, track_: one measurement) is judged by the ratio
    peakmem = comparison_line(root, "peakmem_train_step", "torch-vectorised, batch 32, 3 it.")
    assert peakmem.endswith("| 2.00× | **worse** |")
    assert "| time_train_step | torch-vectorised-cuda" not in comparison  # no result in either run: not listed
    assert f"(not run in either: {', '.join(NOT_RUN)})" in comparison
    assert "## Comparison of runs" in (root / "report" / "report.md").read_text()


def test_with_several_samples_a_doubling_is_worse_a_halving_better(tmp_path, capsys, tables_only):
    """Both runs with 5 samples and q25, q75 = 0.99, 1.01 x the median: doubled train steps are worse,
    halved forwards better, a 5 % change (its ranges apart) and an overlapping 1.3x change not flagged, and
    a higher GEMM peak (GFLOP/s, higher is better) better."""
    root = tmp_path / "results"
    shutil.copytree(FIXTURE, root / "asv", ignore=shutil.ignore_patterns("asv-facts", "*-*.json"))
    shutil.copytree(FIXTURE / "asv-facts", root / "asv-facts")

    def per_benchmark(name, entry, columns):
        factor = {TRAIN_STEP: 2.0, "bench_phases.Forward.time_forward": 0.5,
                  "bench_phases.Backward.time_backward": 1.05, GEMM_PEAK: 1.5}.get(name, 1.0)
        return scaled(factor)(name, entry, columns)

    def wide_inference(name, entry, columns):
        """time_inference of the new run is 1.3x, but spread over [0.7, 1.6] x its median."""
        if name == "bench_phases.Inference.time_inference":
            entry = scaled(1.3)(name, entry, columns)
            values = entry[columns.index("result")]
            entry[columns.index("stats_q_25")] = [v * 0.7 if isinstance(v, float) else None for v in values]
            entry[columns.index("stats_q_75")] = [v * 1.6 if isinstance(v, float) else None for v in values]
        return entry

    spread = with_samples(5, 0.99, 1.01)
    add_run(root, "a" * 40, spread, date_offset_ms=0)
    add_run(root, "b" * 40, chain(spread, per_benchmark, wide_inference))
    code, _, err = run_report(root, capsys)
    assert code == 0 and err == ""
    comparison = (root / "report" / "comparison.md").read_text()
    assert "Too few samples" not in comparison
    params = "torch-vectorised, batch 32, 3 it."
    old = fixture_value(TRAIN_STEP, "'torch-vectorised'", "32", "3")
    line = comparison_line(root, "time_train_step", params)
    assert (f"| {ms(old)} ms ({ms(0.99 * old)}–{ms(1.01 * old)}, 5 samples) | {ms(2 * old)} ms "
            f"({ms(1.98 * old)}–{ms(2.02 * old)}, 5 samples) | 2.00× | **worse** |") in line
    assert "| 0.50× | **better** |" in comparison_line(root, "time_forward", params)
    # 1.05x with [q25, q75] apart ([0.99, 1.01] against [1.04, 1.06]): under 10 %, not flagged
    assert comparison_line(root, "time_backward", params).endswith("| 1.05× |  |")
    assert comparison_line(root, "time_inference", params).endswith("| 1.30× |  |")  # ranges overlap
    assert "| 1.50× | **better** |" in comparison_line(root, "track_gemm_peak_gflops", "backend=torch")
    flagged = [line for line in comparison.splitlines() if line.endswith(("| **worse** |", "| **better** |"))]
    assert len(flagged) == 4 * 2 * 2 + 2  # train step and forward x 4 CPU implementations x 2 batches; 2 peaks


def test_an_implementation_absent_from_one_run_is_shown_missing(tmp_path, capsys, tables_only):
    root = results_layout(tmp_path / "results")

    def without_numpy_looped(name, entry, columns):
        fields = dict(zip(columns, entry))
        params = fields.get("params") or []
        if not params or "'numpy-looped'" not in params[0]:
            return entry
        keep = [combo[0] != "'numpy-looped'" for combo in itertools.product(*params)]
        for column in columns:
            index = columns.index(column)
            if column == "params":
                entry[index] = [[p for p in params[0] if p != "'numpy-looped'"], *params[1:]]
            elif index < len(entry) and isinstance(entry[index], list) and len(entry[index]) == len(keep):
                entry[index] = [v for v, k in zip(entry[index], keep) if k]
        return entry

    add_run(root, "e" * 40, without_numpy_looped)
    code, _, err = run_report(root, capsys)
    assert code == 0 and err == ""
    comparison = (root / "report" / "comparison.md").read_text()
    assert "Only in the old run (shown as missing in the other): numpy-looped." in comparison
    line = next(line for line in comparison.splitlines()
                if line.startswith("| time_train_step | numpy-looped, batch 32, 3 it. |"))
    old = fixture_value(TRAIN_STEP, "'numpy-looped'", "32", "3")
    assert f"| {ms(old)} ms (1 sample) | missing |" in line and "missing in new" in line


@pytest.mark.parametrize("corrupt, problem", [
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: "[1, 2, 3]", "expected a JSON object"),
    (lambda text: text.replace('"version": 2', '"version": 1'), "format version 1"),
    (lambda text: text.replace('"result_columns": ["result"', '"result_columns": ["value"'), "result_columns"),
])
def test_a_malformed_results_file_is_named_and_the_rest_is_reported(tmp_path, capsys, tables_only, corrupt, problem):
    root = results_layout(tmp_path / "results")
    bad = add_run(root, "d" * 40, scaled(1.0))
    bad.write_text(corrupt(json.dumps(json.loads(bad.read_text()))))
    code, _, err = run_report(root, capsys)
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and problem in lines[0] and "skipped" in lines[0]
    text = (root / "report" / "report.md").read_text()
    assert "## Warnings" in text and bad.name in text
    good = fixture_value(TRAIN_STEP, "'torch-vectorised'", "32", "3")
    assert f"| torch-vectorised | 32 | {ms(good)} |" in text  # the good run is still reported


def test_a_malformed_benchmark_entry_skips_only_that_benchmark(tmp_path, capsys, tables_only):
    root = results_layout(tmp_path / "results")

    def truncated(name, entry, columns):
        if name == TRAIN_STEP:
            entry[columns.index("result")] = entry[columns.index("result")][:-1]
        return entry

    bad = add_run(root, "c" * 40, truncated)
    code, _, err = run_report(root, capsys)
    assert code == 0
    assert str(bad) in err and TRAIN_STEP in err and "15 results for 16 parameter combinations" in err
    table = load_asv(root).table
    assert (table.loc[table["commit"] == "c" * 40, "benchmark"] == "time_forward").sum() == 16
    assert (table.loc[table["commit"] == "c" * 40, "benchmark"] == "time_train_step").sum() == 0


def test_no_results_is_one_line_with_the_command_to_run(tmp_path):
    empty = tmp_path / "results"
    empty.mkdir()
    completed = run_module("harness.report", "--results", str(empty), "--out", str(tmp_path / "out"))
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no results under")
    assert "asv run --quick" in lines[0] and "python -m harness.train" in lines[0]
    assert "python -m harness.profile" in lines[0] and "python -m harness.scaling" in lines[0]
    assert "any one of" in lines[0]
    assert not (tmp_path / "out").exists()


def test_only_malformed_files_is_an_error_after_the_warnings(tmp_path, capsys):
    root = tmp_path / "results"
    (root / "training").mkdir(parents=True)
    (root / "training" / "broken.json").write_text("{not json")
    code, _, err = run_report(root, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 2
    assert "broken.json" in lines[0] and lines[1].startswith("error: no readable results")


def test_unknown_machine_is_one_line(tmp_path, capsys):
    root = results_layout(tmp_path / "results")
    code, _, err = run_report(root, capsys, "--machine", "elsewhere")
    assert code == 1 and err.strip() == (f"error: no asv results for machine 'elsewhere' under {root / 'asv'} "
                                         "(machines there: vm)")


def test_gemm_peak_and_gpu_memory_give_peak_share_and_gpu_memory_plots(tmp_path, capsys):
    """The fixture's run with two entries in asv's format added, as a GPU machine with the new GemmPeak
    benchmark would write them (CPU backends' peaks; GPU memory figures for torch-vectorised-cuda)."""
    root = results_layout(tmp_path / "results")
    path = root / "asv" / MACHINE / RUN_FILE.name
    payload = json.loads(path.read_text())
    peak = [[float("nan"), 200.0, 250.0, float("nan")], [["'cupy'", "'numpy'", "'torch'", "'torch-cuda'"]],
            "0" * 64, payload["date"], 1.0]
    payload["results"]["bench_peak.GemmPeak.track_gemm_peak_gflops"] = peak
    described = json.loads((root / "asv" / "benchmarks.json").read_text())
    described["bench_peak.GemmPeak.track_gemm_peak_gflops"] = {
        "name": "bench_peak.GemmPeak.track_gemm_peak_gflops", "param_names": ["backend"], "params": peak[1],
        "type": "track", "unit": "GFLOP/s", "version": "0" * 64}
    (root / "asv" / "benchmarks.json").write_text(json.dumps(described))
    nvml = "bench_memory.GpuMemory.track_gpu_memory_nvml"
    for name, base in ((nvml, 2.0e9), ("bench_memory.GpuMemory.track_gpu_memory_allocator_live", 1.0e9),
                       ("bench_memory.GpuMemory.track_gpu_memory_allocator_reserved", 1.5e9)):
        entry = payload["results"].setdefault(name, json.loads(json.dumps(payload["results"][nvml])))
        described.setdefault(name, {**described[nvml], "name": name})
        combos = list(itertools.product(*entry[1]))
        entry[0] = [base * int(batch) / 32 if impl == "'torch-vectorised-cuda'" else float("nan")
                    for impl, batch, _ in combos]
    (root / "asv" / "benchmarks.json").write_text(json.dumps(described))
    path.write_text(json.dumps(payload))
    code, _, err = run_report(root, capsys)
    assert code == 0 and err == ""
    table = load_asv(root).table
    row = table[(table["benchmark"] == "time_train_step") & (table["implementation"] == "torch-vectorised")
                & (table["batch_size"] == 128)].iloc[0]
    assert row["peak_gflops"] == 250.0
    assert row["pct_of_peak"] == pytest.approx(100 * row["gflops_per_s"] / 250.0)
    assert_png_with_content(root / "report" / "peak_share.png")
    assert_png_with_content(root / "report" / "memory.png")
    text = (root / "report" / "report.md").read_text()
    # its parity was not measured (the fixture's CPU run could not): marked, with the reason in the last column
    assert ("| torch-vectorised-cuda (parity not measured) | 128 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | "
            "n/a | n/a | 7629.4 | 3814.7 | 5722.0 | not measured |") in text
    assert "old mixed figure" not in text  # a run with live and reserved: no column for the old figure
    # torch-vectorised-cuda has results now; the other CUDA implementations still fold into one line
    assert "Not run here: cupy-looped, cupy-vectorised, torch-looped-cuda (unavailable: no CUDA GPU" in text


def test_an_old_run_shows_the_mixed_allocator_figure_labelled_as_such(tmp_path, capsys, tables_only):
    root = results_layout(tmp_path / "results")
    path = root / "asv" / MACHINE / RUN_FILE.name
    payload = json.loads(path.read_text())
    entry = payload["results"]["bench_memory.GpuMemory.track_gpu_memory_allocator_peak"]
    entry[0] = [3 * 2**30 if impl == "'torch-vectorised-cuda'" else float("nan")
                for impl, _, _ in itertools.product(*entry[1])]
    path.write_text(json.dumps(payload))
    code, _, err = run_report(root, capsys)
    assert code == 0 and err == ""
    text = (root / "report" / "report.md").read_text()
    (summary,) = markdown_tables(text, "Summary per implementation")
    row = next(row for row in summary if (row["implementation"], row["batch"])
               == ("torch-vectorised-cuda (parity not measured)", "32"))
    assert row["GPU allocator MiB (old mixed figure)"] == "3072.0"
    assert "older runs recorded torch's live peak and CuPy's pool after the step in one figure" in text


def test_the_profile_becomes_a_section_and_a_plot(tmp_path, capsys):
    root = tmp_path / "results"
    shutil.copytree(PROFILE, root / "profile")
    code, out, err = run_report(root, capsys)
    assert code == 0 and err == ""
    text = (root / "report" / "report.md").read_text()
    assert "## Where the time of a training step goes" in text
    assert "Profiled on `fixture-host`: Fixture CPU, 4 cores; GPU: none (no GPU in the fixture)." in text
    assert_png_with_content(root / "report" / "profile.png")
    assert "[`profile.png`](profile.png)" in text
    section = text.split("## Where the time of a training step goes")[1]
    assert "### torch-vectorised (torch, cpu, vectorised routing)" in section
    assert ("batch 16; small network; float32; 5 profiled steps; profiled step 40.0 ms; unprofiled step 32.0 ms; "
            "profiler overhead +25.0%; the layers add up to 38.0 ms (95.0% of the profiled step).") in section
    assert ("Per phase: forward 16.0 ms of layers (40.0% of the step; the phase measured whole: 17.0 ms); "
            "backward 18.0 ms of layers (45.0% of the step; the phase measured whole: 19.0 ms); update 4.0 ms of "
            "layers (10.0% of the step; the phase measured whole: 4.0 ms).") in section
    torch, numpy = markdown_tables(text, "Where the time of a training step goes")
    assert [(row["phase"], row["layer"]) for row in torch] == [
        ("forward", "conv1"), ("forward", "primary_caps"), ("forward", "routing_iteration_1"),
        ("forward", "routing_iteration_2"), ("backward", "conv1"), ("backward", "primary_caps"),
        ("update", "optimizer")]
    primary = torch[5]
    assert list(primary.values()) == ["backward", "primary_caps", "12.0 (11.0–13.0)", "30.0%", "200", "100.0%", "n/a"]
    assert "time ms, median (q25–q75) of 5 steps" in primary and "allocated MiB" in primary
    assert "peak MiB" not in primary  # torch reports no per-layer peak: no column of n/a
    # one figure for every implementation: this older profile has no hardware peak, so its best GEMM (torch's
    # 200 GFLOP/s, not NumPy's own 100) divides NumPy's 40 GFLOP/s too
    assert numpy[0] == {"phase": "forward", "layer": "conv1", "time ms (1 step)": "10.0", "share of step": "12.5%",
                        "GFLOP/s": "40.0", "% of peak": "20.0%", "allocated MiB": "2.0", "peak MiB": "3.0"}


def test_a_malformed_profile_is_one_warning_and_no_section(tmp_path, capsys, tables_only):
    root = results_layout(tmp_path / "results")
    shutil.copytree(PROFILE, root / "profile")
    bad = root / "profile" / "profile.csv"
    bad.write_text(bad.read_text().replace("0.012,0.011", "0.012s,0.011"))
    code, _, err = run_report(root, capsys)
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "time_s is '0.012s', not a number" in lines[0]
    text = (root / "report" / "report.md").read_text()
    assert "## Where the time of a training step goes" not in text and "## Warnings" in text
    # a malformed profile.json alone: a warning, and the table without it
    shutil.copy(PROFILE / "profile.csv", bad)
    (root / "profile" / "profile.json").write_text('{"kind": "something else"}')
    code, _, err = run_report(root, capsys)
    assert code == 0 and "profile.json: not a capsbench profile file" in err and len(err.strip().splitlines()) == 1
    assert "### torch-vectorised (torch, cpu)\n" in (root / "report" / "report.md").read_text()


def test_distributed_scaling_results_give_a_table_and_a_plot(tmp_path, capsys):
    root = tmp_path / "results"
    (root / "distributed").mkdir(parents=True)
    runs = [{"world_size": w, "threads_per_rank": 1, "per_rank_batch_size": 32, "global_batch_size": 32 * w,
             "steps": 10, "step_seconds": 0.5 * (1 + 0.1 * (w - 1)), "images_per_second": 64 * w / (1 + 0.1 * (w - 1)),
             "allreduce_seconds": 0.02 * w, "allreduce_share": 0.04 * w} for w in (1, 2, 4)]
    (root / "distributed" / "gloo.json").write_text(json.dumps({
        "kind": "capsbench-distributed-scaling", "implementation": "torch-vectorised", "backend": "gloo",
        "device": "cpu", "config_name": "paper", "machine": {}, "runs": runs}))
    (root / "distributed" / "bad.json").write_text(json.dumps({"kind": "capsbench-distributed-scaling", "runs": []}))
    code, _, err = run_report(root, capsys)
    assert code == 0 and "bad.json" in err and "'runs' must be a non-empty list" in err
    assert_png_with_content(root / "report" / "distributed_scaling.png")
    text = (root / "report" / "report.md").read_text()
    assert "| torch-vectorised (gloo, cpu) | 4 | 1 | 32 | 128 | 4 | 650.0 | 197 | 76.9% |" in text


def test_with_the_hardware_peak_in_the_facts_every_implementation_divides_by_it(tmp_path):
    """One figure for every implementation: 100 GFLOP/s in the facts, so % of peak = GFLOP/s itself."""
    root = results_layout(tmp_path / "results")
    (facts_file,) = (root / "asv-facts").rglob("*.json")
    facts = json.loads(facts_file.read_text())
    facts["hardware_peak"] = {"gflops": 100.0, "cores": 2, "lanes": 16, "fma_units": 1, "clock_ghz": 1.5625,
                              "clock_source": "given", "note": "given", "formula": "x"}
    facts_file.write_text(json.dumps(facts))
    table = load_asv(root).table
    steps = table[(table["benchmark"] == "time_train_step") & table["value"].notna() & (table["device"] == "cpu")]
    assert len(steps) and set(steps["peak_source"]) == {"hardware float32 peak"}
    np.testing.assert_allclose(steps["pct_of_peak"], steps["gflops_per_s"])
    best = max(fixture_value(GEMM_PEAK, "'numpy'"), fixture_value(GEMM_PEAK, "'torch'"))
    np.testing.assert_allclose(steps["best_gemm_gflops"], best)


def test_a_run_of_some_benchmarks_is_compared_on_them_alone_with_parameters_that_are_parameters(tmp_path, capsys,
                                                                                                 tables_only):
    """The new run measured the train step and the GEMM peak only, both runs with a hardware peak in their facts:
    every other benchmark is one line (not a row of 'missing in new' per combination), the CUDA implementations
    that ran in neither are not rows, and no parameter cell names the hardware peak (a run's fact)."""
    root = results_layout(tmp_path / "results")
    (facts_file,) = (root / "asv-facts").rglob("*.json")
    facts = json.loads(facts_file.read_text())
    facts["hardware_peak"] = {"gflops": 204.2028530153354, "note": "given", "formula": "x"}
    facts_file.write_text(json.dumps(facts))
    path = add_run(root, "c" * 40, scaled(1.0))
    payload = json.loads(path.read_text())
    payload["results"] = {name: entry for name, entry in payload["results"].items() if name in (TRAIN_STEP, GEMM_PEAK)}
    for entry in payload["results"].values():  # measured a day after the fixture's run
        entry[payload["result_columns"].index("started_at")] += 86_400_000
    path.write_text(json.dumps(payload))
    facts_file.with_name(facts_file.name.replace(RUN_FILE.name[:8], "c" * 8)).write_text(json.dumps(facts))
    code, _, err = run_report(root, capsys)
    assert code == 0 and err == ""
    comparison = (root / "report" / "comparison.md").read_text()
    assert "hardware_peak_gflops" not in comparison
    rows = [line for line in comparison.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]
    assert {line.split(" | ")[0] for line in rows} == {"| time_train_step", "| track_gemm_peak_gflops"}
    assert not [line for line in rows if "cuda" in line or "missing" in line]
    assert len([line for line in rows if line.startswith("| time_train_step")]) == len(MEASURED) * 2
    others = {name.rsplit(".", 1)[-1] for name in fixture_json()["results"] if name not in (TRAIN_STEP, GEMM_PEAK)}
    line = next(line for line in comparison.splitlines() if line.startswith("Measured in the old run only"))
    assert line.endswith(f": {', '.join(sorted(others))}.")
    assert "(not run in either: " + ", ".join(NOT_RUN) in comparison


CORRECTNESS = "bench_correctness.Correctness.track_max_rel_error"


def rewrite_results(path: Path, change) -> None:
    """Rewrite a results file: ``change(name, fields)`` edits the fields (result, params, ...) of a benchmark."""
    payload = json.loads(path.read_text())
    columns = payload["result_columns"]
    for name, entry in payload["results"].items():
        fields = dict(zip(columns, entry))
        change(name, fields)
        payload["results"][name] = [fields.get(column) for column in columns[:len(entry)]]
    path.write_text(json.dumps(payload))


def one_implementation(name: str, value_of):
    """A change that replaces each result of implementation ``name`` by ``value_of(benchmark, result)``."""
    def change(benchmark, fields):
        params = fields.get("params") or []
        if params and f"'{name}'" in params[0]:
            fields["result"] = [value_of(benchmark, value) if combo[0] == f"'{name}'" else value
                                for combo, value in zip(itertools.product(*params), fields["result"])]
    return change


def with_a_wrong_and_an_unchecked_implementation(root: Path) -> Path:
    """The fixture's run with torch-looped computing the wrong function (max rel error 0.3, the softmax over
    the wrong axis) at half its train-step time, so the fastest at both batches, and numpy-looped's parity
    not measured (skipped)."""
    path = next((root / "asv" / MACHINE).glob("*-*.json"))
    rewrite_results(path, one_implementation(
        "torch-looped", lambda benchmark, value: 0.3 if benchmark == CORRECTNESS else
        value / 2 if benchmark == TRAIN_STEP else value))
    rewrite_results(path, one_implementation(
        "numpy-looped", lambda benchmark, value: math.nan if benchmark == CORRECTNESS else value))
    return path


def test_an_implementation_that_failed_or_skipped_parity_is_marked_and_a_failed_one_never_ranked(tmp_path, capsys,
                                                                                                 tables_only):
    root = results_layout(tmp_path / "results")
    with_a_wrong_and_an_unchecked_implementation(root)
    code, _, err = run_report(root, capsys)
    assert code == 0 and err == ""
    text = (root / "report" / "report.md").read_text()
    (summary,) = markdown_tables(text, "Summary per implementation")
    by_name = {(row["implementation"], row["batch"]): row for row in summary}
    assert by_name[("torch-looped (parity FAILED)", "32")]["parity (max rel error)"] == "FAILED (3.0e-01 > 1e-02)"
    assert by_name[("numpy-looped (parity not measured)", "128")]["parity (max rel error)"] == "not measured"
    expected = fixture_value(CORRECTNESS, "'torch-vectorised'")
    assert by_name[("torch-vectorised", "32")]["parity (max rel error)"] == f"passed ({expected:.1e})"
    assert "**Parity FAILED**: torch-looped (not ranked" in text
    rankings = [line for line in text.splitlines() if line.startswith("- batch ")]
    assert len(rankings) == 2 and not [line for line in rankings if "torch-looped" in line]
    # the fixture's single samples: no pair ranked, every neighbour '≈', and its reason given
    fastest = sorted(["torch-vectorised", "numpy-vectorised", "numpy-looped"],
                     key=lambda name: fixture_value(TRAIN_STEP, f"'{name}'", "32", "3"))
    names = [name + (" (parity not measured)" if name == "numpy-looped" else "") for name in fastest]
    assert rankings[0] == (f"- batch 32: {' ≈ '.join(names)}; the samples cannot rank {fastest[0]} / {fastest[1]}, "
                           f"{fastest[1]} / {fastest[2]} (a single sample).")


def test_the_plan_each_batch_size_ran_with_is_in_the_summary():
    plans = {"torch-fused": {"128": {"conv1": {"forward": "im2col-gemm", "weight": "im2col-gemm", "input": "offsets"},
                                     "primary_caps": {"forward": "library", "weight": "library", "input": "rows"},
                                     "source": "measured", "measure_seconds": 4.25},
                             "32": {"conv1": {"forward": "offsets", "weight": "offsets", "input": "offsets"},
                                    "primary_caps": {"forward": "library", "weight": "offsets", "input": "col2im"},
                                    "source": "cache"}}}
    assert plan_lines(plans) == [
        "- torch-fused, batch 32: conv1: offsets/offsets/offsets; primary_caps: library/offsets/col2im (cache)",
        "- torch-fused, batch 128: conv1: im2col-gemm/im2col-gemm/offsets; primary_caps: library/library/rows "
        "(measured, measuring took 4.2 s)"]
    for facts in plans["torch-fused"].values():  # a note the plans carry comes once, after them
        facts["note"] = "spectral: effective rates"
    assert plan_lines(plans)[2:] == ["", "spectral: effective rates"]


BACKWARD = "bench_phases.Backward.time_backward"
FINAL_FACTORS = {BACKWARD: 0.8, TRAIN_STEP: 0.9, ROUTING_BACKWARD: 0.5}  # final's time over full's, by hand


def with_final_gradient(root: Path) -> None:
    """The fixture's run as if measured at both routing gradients: the benchmarks the gradient changes get
    the parameter (last, as the suite declares it), ``full`` keeping the fixture's results and ``final``
    the fixture's times x :data:`FINAL_FACTORS`; benchmarks.json names the parameter."""
    path = next((root / "asv" / MACHINE).glob("*-*.json"))
    payload = json.loads(path.read_text())
    columns = payload["result_columns"]
    for name, factor in FINAL_FACTORS.items():
        entry = payload["results"][name]
        entry[columns.index("params")] = entry[columns.index("params")] + [["'full'", "'final'"]]
        for column in ("result", "stats_q_25", "stats_q_75", "stats_repeat"):
            index = columns.index(column)
            if index < len(entry) and isinstance(entry[index], list):
                scale = 1.0 if column == "stats_repeat" else factor
                entry[index] = [value for v in entry[index] for value in
                                (v, v * scale if isinstance(v, (int, float)) else v)]
    path.write_text(json.dumps(payload))
    benchmarks_path = root / "asv" / "benchmarks.json"
    described = json.loads(benchmarks_path.read_text())
    for name in FINAL_FACTORS:
        described[name]["param_names"] = described[name]["param_names"] + ["routing_gradient"]
        described[name]["params"] = described[name]["params"] + [["'full'", "'final'"]]
    benchmarks_path.write_text(json.dumps(described))


def test_the_routing_gradient_saving_is_a_section_and_a_plot(tmp_path, capsys):
    root = results_layout(tmp_path / "results")
    with_final_gradient(root)
    code, _, _ = run_report(root, capsys)
    assert code == 0
    text = (root / "report" / "report.md").read_text()
    (table,) = markdown_tables(text, "Routing gradient: what final saves over full")
    shown = {(row["implementation"], row["batch"]) for row in table}
    assert shown == {(name, batch) for name in MEASURED for batch in ("32", "128")}
    line = next(row for row in table if row["implementation"] == "torch-vectorised" and row["batch"] == "32")
    assert_shows(cell(line, "backward saving"), 20.0)
    assert_shows(cell(line, "train step saving"), 10.0)
    assert_shows(cell(line, "routing fwd+bwd saving"), 50.0)
    step = fixture_value(TRAIN_STEP, "'torch-vectorised'", "32", "3")
    routing = fixture_value(ROUTING_BACKWARD, "'torch-vectorised'", "32", "3")
    assert_shows(cell(line, "routing share full"), 100 * routing / step)
    assert_shows(cell(line, "routing share final"), 100 * 0.5 * routing / (0.9 * step))
    assert cell(line, "backward final ms").startswith(ms(0.8 * fixture_value(BACKWARD, "'torch-vectorised'", "32",
                                                                                 "3")))
    summary = markdown_tables(text, "Summary per implementation")[0]  # every other table: the full gradient
    row = next(row for row in summary if row["implementation"] == "torch-vectorised" and row["batch"] == "32")
    assert cell(row, "train step ms").startswith(ms(step))
    assert_png_with_content(root / "report" / "routing_gradient_saving.png")


def test_a_run_without_the_final_gradient_has_no_such_section(fixture_root, tmp_path, capsys, tables_only):
    code = report.main(["--results", str(fixture_root), "--out", str(tmp_path / "report")])
    assert code == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Routing gradient" not in text


def test_the_report_imports_no_implementation_nor_torch(tmp_path):
    """The report reads what results files say of themselves: importing it and running it on the fixtures
    (benchmarks and profile) loads no module of implementations/, no plugin and not torch."""
    root = results_layout(tmp_path / "results")
    shutil.copytree(PROFILE, root / "profile")
    script = ("import sys\nfrom harness import report\n"
              f"code = report.main(['--results', {str(root)!r}, '--out', {str(tmp_path / 'out')!r}])\n"
              "loaded = sorted(name for name in sys.modules if name.split('.')[0] in "
              "('implementations', 'torch', 'cupy', 'jax') or name == 'harness.registry')\n"
              "print('LOADED', code, loaded)\n")
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                               timeout=300)
    line = next(line for line in completed.stdout.splitlines() if line.startswith("LOADED"))
    assert line == "LOADED 0 []", completed.stderr[-2000:]
    assert (tmp_path / "out" / "report.md").is_file()


def test_an_implementation_the_facts_do_not_describe_is_unknown():
    from harness.suite.asv_results import implementation_facts

    described = {"numpy-vectorised": {"framework": "numpy", "device": "cpu", "routing_variant": "vectorised"}}
    assert implementation_facts("numpy-vectorised", described)["framework"] == "numpy"
    assert implementation_facts("torch-vectorised", described) == {  # a real name, but not in this file
        "framework": "unknown", "device": "unknown", "routing_variant": "unknown", "backend": "unknown"}


def test_a_profile_alone_makes_a_report_that_says_what_it_reads_first_and_links_no_tidy_table(tmp_path, capsys):
    root = tmp_path / "results"
    shutil.copytree(PROFILE, root / "profile")
    (root / "report").mkdir(parents=True)
    (root / "report" / "results_tidy.csv").write_text("an older report's table")
    code, out, err = run_report(root, capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (f"report from the results under {root} (asv/, training/, profile/, distributed/) -> "
                        f"{root / 'report' / 'report.md'} and its tables and plots in {root / 'report'}")
    assert lines[-1].startswith(f"report written to {root / 'report' / 'report.md'}")
    text = (root / "report" / "report.md").read_text()
    assert "results_tidy.csv" not in text and "No benchmark (asv) results, so no tidy table of them." in text
    assert "## Where the time of a training step goes" in text
    assert not (root / "report" / "results_tidy.csv").exists()


def test_an_unreliable_scaling_efficiency_is_said_so_in_the_report():
    from harness.reporting.tables import distributed_table

    def run(world_size, images_per_second):
        return {"world_size": world_size, "threads_per_rank": 1, "per_rank_batch_size": 16 // world_size,
                "global_batch_size": 16, "steps": 4, "step_seconds": 16 / images_per_second,
                "images_per_second": images_per_second, "allreduce_seconds": None, "allreduce_share": None}

    record = {"implementation": "torch-vectorised", "backend": "gloo", "device": "cpu", "scaling": "strong",
              "runs": [run(1, 100.0), run(2, 280.0)]}
    text = sections.distributed_section(distributed_table([(Path("scaling.json"), record)]))
    assert text.endswith("Not reliable: torch-vectorised (gloo, cpu, strong scaling), world size 2: from 4 timed "
                         "step(s), fewer than the 10 a reliable figure needs.")
    assert text.count("Not reliable:") == 1


def test_a_run_without_facts_says_so_and_how_to_get_them(tmp_path):
    root = results_layout(tmp_path / "results")
    (facts_file,) = (root / "asv-facts").rglob("*.json")
    facts_file.unlink()
    (run,) = load_asv(root).runs
    header = sections.run_header(run, {})
    assert "**assumed**: no machine-facts file beside this run" in header
    assert "CAPSBENCH_ASV_COMMIT" in header and "CAPSBENCH_ASV_MACHINE" in header
    assert "assumed" not in sections.run_header(load_asv(results_layout(tmp_path / "again")).runs[0], {})


# ------------------------------------------------------------------------------------------------ routing algorithm
HOST_STEP = "bench_memory.HostMemory.track_host_memory_train_step"
HOST_BEFORE = "bench_memory.HostMemory.track_host_memory_before_model"
ATTENTION_FACTORS = {TRAIN_STEP: 0.8, ROUTING_BACKWARD: 0.4, HOST_STEP: 0.95, HOST_BEFORE: 1.0}  # over dynamic's
ALGORITHMS = ["'dynamic'", "'self-attention'"]


def with_self_attention(root: Path, without=("numpy-vectorised",)) -> None:
    """The fixture's run as if measured under both routing algorithms, as the suite measures them: the
    parameter last; dynamic keeping the fixture's results; self-attention the fixture's figures x
    :data:`ATTENTION_FACTORS` at 3 routing iterations alone (the routing benchmark's 1 and 5 skipped: NaN, as
    asv stores a skip) and skipped for the implementations in ``without``; benchmarks.json names the parameter.
    The fixture's facts predate the routing algorithms (the report knows the built-ins without them)."""
    path = next((root / "asv" / MACHINE).glob("*-*.json"))
    payload = json.loads(path.read_text())
    columns = payload["result_columns"]
    for name, factor in ATTENTION_FACTORS.items():
        entry = payload["results"][name]
        params = entry[columns.index("params")]
        measured = [cell[0].strip("'") not in without and cell[2] == "3" for cell in itertools.product(*params)]
        entry[columns.index("params")] = params + [ALGORITHMS]
        for column in ("result", "stats_q_25", "stats_q_75", "stats_repeat"):
            index = columns.index(column)
            if index < len(entry) and isinstance(entry[index], list):
                scale = 1.0 if column == "stats_repeat" else factor
                skipped = math.nan if column == "result" else None
                entry[index] = [value for v, ok in zip(entry[index], measured) for value in
                                (v, v * scale if ok and isinstance(v, (int, float)) else skipped)]
    path.write_text(json.dumps(payload))
    benchmarks_path = root / "asv" / "benchmarks.json"
    described = json.loads(benchmarks_path.read_text())
    for name in ATTENTION_FACTORS:
        described[name]["param_names"] = described[name]["param_names"] + ["routing_algorithm"]
        described[name]["params"] = described[name]["params"] + [ALGORITHMS]
    benchmarks_path.write_text(json.dumps(described))


def test_the_routing_algorithms_are_a_section_and_a_plot_with_ratios_by_hand(tmp_path, capsys):
    root = results_layout(tmp_path / "results")
    with_self_attention(root)
    code, _, _ = run_report(root, capsys)
    assert code == 0
    text = (root / "report" / "report.md").read_text()
    (table,) = markdown_tables(text, "Routing algorithms")
    shown = {(row["implementation"], row["batch"]) for row in table}
    assert shown == {(name, batch) for name in MEASURED if name != "numpy-vectorised" for batch in ("32", "128")}
    assert "Timed under dynamic routing alone in this run, not under self-attention (skipped: the implementation " \
           "does not compute it, or the run left it out): numpy-vectorised." in text
    line = next(row for row in table if row["implementation"] == "torch-looped" and row["batch"] == "128")
    step = fixture_value(TRAIN_STEP, "'torch-looped'", "128", "3")
    routing = fixture_value(ROUTING_BACKWARD, "'torch-looped'", "128", "3")
    assert cell(line, "train step dynamic ms").startswith(ms(step))
    assert cell(line, "train step self-attention ms").startswith(ms(0.8 * step))
    assert_shows(cell(line, "train step self-attention / dynamic"), 0.8)
    assert cell(line, "routing fwd+bwd self-attention ms").startswith(ms(0.4 * routing))
    assert_shows(cell(line, "routing fwd+bwd self-attention / dynamic"), 0.4)
    assert_shows(cell(line, "routing share dynamic"), 100 * routing / step)
    assert_shows(cell(line, "routing share self-attention"), 100 * 0.4 * routing / (0.8 * step))
    host = fixture_value(HOST_STEP, "'torch-looped'", "128", "3")
    before = fixture_value(HOST_BEFORE, "'torch-looped'", "128", "3")
    assert_shows(cell(line, "host model+step dynamic MiB"), (host - before) / 2**20)
    assert_shows(cell(line, "host model+step self-attention MiB"), (0.95 * host - before) / 2**20)
    assert "self-attention at the grid's 3 routing iterations (it is not iterative" in text
    summary = markdown_tables(text, "Summary per implementation")[0]  # every other table: dynamic routing
    row = next(row for row in summary if row["implementation"] == "torch-looped" and row["batch"] == "128")
    assert cell(row, "train step ms").startswith(ms(step))
    assert_png_with_content(root / "report" / "routing_algorithms.png")
    tidy = pd.read_csv(root / "report" / report.TIDY_CSV)
    attention = tidy[(tidy["benchmark"] == "time_routing_backward") & (tidy["routing_algorithm"] == "self-attention")
                     & (tidy["implementation"] == "torch-looped")]
    assert dict(zip(attention["routing_iterations"], attention["status"])) == {
        1: "not applicable", 3: "ok", 5: "not applicable"}  # in the tidy table, out of every report table
    assert "failed" not in set(tidy["status"])


def test_an_older_run_without_the_parameter_reads_as_dynamic_and_compares_with_a_newer_one_cell_for_cell(
        tmp_path, capsys, tables_only):
    """The fixture (no routing_algorithm parameter) beside a later run under both algorithms: every dynamic
    cell of the new run meets its old cell (the same parameters in words), self-attention's measured cells are
    new ("missing in old"), and its cells at 1 and 5 iterations appear nowhere, neither as rows nor as
    "without a result"."""
    root = results_layout(tmp_path / "results")
    old = next((root / "asv" / MACHINE).glob("*-*.json"))
    later = tmp_path / "later"
    results_layout(later)
    with_self_attention(later)
    payload = json.loads(next((later / "asv" / MACHINE).glob("*-*.json")).read_text())
    payload["commit_hash"], payload["date"] = "a" * 40, payload["date"] + 86_400_000
    (root / "asv" / MACHINE / f"aaaaaaaa-{payload['env_name']}.json").write_text(json.dumps(payload))
    shutil.copy(later / "asv" / "benchmarks.json", root / "asv" / "benchmarks.json")  # asv rewrites it each run
    code, _, _ = run_report(root, capsys)
    assert code == 0 and old.exists()
    comparison = pd.read_csv(root / "report" / "comparison.csv")
    routing = comparison[comparison["benchmark"] == "time_routing_backward"]
    attention = routing[routing["params"].str.contains("self-attention")]
    assert not attention.empty and (attention["old_status"] == "missing").all()
    assert set(attention["routing_iterations"]) == {3}
    dynamic = routing[~routing["params"].str.contains("self-attention")]
    measured = dynamic[dynamic["new"].notna()]
    assert len(measured) == 3 * 2 * len(MEASURED) and (measured["ratio"] == 1.0).all()  # both sides, the same
    text = (root / "report" / "report.md").read_text()
    assert "## Routing algorithms" in text
    assert "combination(s) without a result in either run not listed" in text
