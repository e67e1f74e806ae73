"""python -m harness.report on real asv output (tests/fixtures/asv_cpu_fast, a quick CPU run of the suite):
the tidy table holds exactly what the files hold, every plot is a real PNG, two runs are compared, and
missing or malformed inputs end in one clear line."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from harness import report, train
from harness.activations import im2col_bytes
from harness.asv_results import load_asv
from harness.flops import phase_flops
from harness.spec import PAPER

from conftest import run_module

FIXTURE = Path(__file__).parent / "fixtures" / "asv_cpu_fast"
MACHINE = "vm"
RUN_FILE = next((FIXTURE / MACHINE).glob("*-*.json"), None) if (FIXTURE / MACHINE).is_dir() else None
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_STEP = "bench_phases.TrainStep.time_train_step"


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


def test_tidy_rows_equal_the_numbers_in_the_file(fixture_root):
    table = load_asv(fixture_root).table
    entry = dict(zip(fixture_json()["result_columns"], fixture_json()["results"][TRAIN_STEP]))
    combinations = list(itertools.product(*entry["params"]))
    rows = table[table["benchmark"] == "time_train_step"]
    assert len(rows) == len(combinations) == 8 * 2 * 1  # implementations x batch sizes x iterations
    for (name, batch, iterations), expected in zip(combinations, entry["result"]):
        match = rows[(rows["implementation"] == json.loads(name.replace("'", '"')))
                     & (rows["batch_size"] == int(batch)) & (rows["routing_iterations"] == int(iterations))]
        assert len(match) == 1
        value = match["value"].iloc[0]
        if expected is None or (isinstance(expected, float) and math.isnan(expected)):
            assert math.isnan(value)  # skipped on this machine: kept as a row with no value
        else:
            assert value == expected
    cuda = rows[rows["device"] == "cuda"]
    assert len(cuda) == 8 and cuda["value"].isna().all() and (cuda["status"] == "skipped").all()
    measured = rows.dropna(subset=["value"]).iloc[0]
    config = PAPER.replace(routing_iterations=int(measured["routing_iterations"]))
    assert measured["flops"] == phase_flops(config, int(measured["batch_size"]))["train_step"]
    assert measured["gflops_per_s"] == pytest.approx(measured["flops"] / measured["value"] / 1e9)
    assert measured["spread"] == measured["q75"] - measured["q25"]


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
    code, out, err = run_report(root, capsys)
    assert code == 0 and err == ""
    folder = root / "report"
    assert "report.md" in out
    for name in ("phase_times", "batch_scaling", "routing_iterations", "vectorised_speedup", "memory",
                 "roofline", "training_curves"):
        assert_png_with_content(folder / f"{name}.png")
    text = (folder / "report.md").read_text()
    assert "Intel(R) Xeon(R) Processor" in text and fixture_json()["commit_hash"] in text
    assert "torch 2.13.0+cpu" in text and "benchmark profile: fast (network: paper)" in text
    summary = next(line for line in text.splitlines() if line.startswith("| torch-vectorised | 32 |"))
    train_step = fixture_value(TRAIN_STEP, "'torch-vectorised'", "32", "3")
    assert f"| {ms(train_step)} |" in summary  # the train step of the fixture, in ms with one decimal
    peak = fixture_value("bench_peak.GemmPeak.track_gemm_peak_gflops", "'torch'")
    percent = 100 * phase_flops(PAPER, 32)["train_step"] / train_step / 1e9 / peak
    assert f"| {percent:.1f}% |" in summary  # % of the GEMM peak measured in the same run
    assert "| torch-vectorised-cuda | 128 | n/a |" in text  # unavailable here: shown, not dropped
    assert "| torch (cpu) | 128 |" in text  # the speed-up table
    memory = next(line for line in text.splitlines() if line.startswith("| numpy-vectorised | 128 |")
                  and "×" in line and "n/a" not in line)
    peak_rss = fixture_value("bench_memory.HostMemory.track_host_memory_train_step", "'numpy-vectorised'", "128", "3")
    before = fixture_value("bench_memory.HostMemory.track_host_memory_before_model", "'numpy-vectorised'", "128", "3")
    assert f"| {(peak_rss - before) / 2**20:.1f} |" in memory  # measured = peak in the step - before the model
    assert f"| {im2col_bytes(PAPER, 128) / 2**20:.1f} |" in memory
    assert "## Training" in text
    assert "| torch-vectorised_small.json | torch-vectorised | cpu | small | 64 | 2/2 |" in text
    assert not (folder / "comparison.md").exists()
    tidy = (folder / "results_tidy.csv").read_text().splitlines()
    assert tidy[0].startswith("implementation,framework,device,routing_variant,backend,batch_size,"
                              "routing_iterations,benchmark")


def test_two_commits_are_compared_and_a_doubling_is_flagged(tmp_path, capsys, tables_only):
    root = results_layout(tmp_path / "results")
    add_run(root, "f" * 40, scaled(2.0))
    code, _, err = run_report(root, capsys)
    assert code == 0 and err == ""
    comparison = (root / "report" / "comparison.md").read_text()
    line = next(line for line in comparison.splitlines()
                if line.startswith("| time_train_step | torch-vectorised, batch 32, 3 it. |"))
    old = fixture_value(TRAIN_STEP, "'torch-vectorised'", "32", "3")
    assert f"| {ms(old)} ms | {ms(2 * old)} ms | 2.00× | **worse** |" in line
    assert "| time_train_step | torch-vectorised-cuda" not in comparison  # no result in either run: not listed
    assert "## Comparison of runs" in (root / "report" / "report.md").read_text()


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
    assert f"| {ms(old)} ms | missing |" in line and "missing in new" in line


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


def test_gemm_peak_and_gpu_memory_give_roofline_and_gpu_memory_plots(tmp_path, capsys):
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
    assert_png_with_content(root / "report" / "roofline.png")
    assert_png_with_content(root / "report" / "memory.png")
    text = (root / "report" / "report.md").read_text()
    assert ("| torch-vectorised-cuda | 128 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 7629.4 | "
            "3814.7 | 5722.0 |") in text


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
