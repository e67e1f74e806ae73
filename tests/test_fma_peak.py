"""The FMA microbenchmark that checks the derived hardware peak: its kernel's arithmetic against a float64
recurrence, its FLOP count, how its figure decides an assumed FMA-unit count or an unknown clock, its cache,
and the one-line reason where no C compiler is found."""

import numpy as np
import pytest
from test_flops import cpuinfo

from harness.measure import fma_peak
from harness.measure.peak import hardware_peak, peak_sentence
from harness.settings import PLAN_CACHE_ENV


def test_the_kernel_does_every_fma_of_every_accumulator(tmp_path):
    kernel = fma_peak.compile_kernel(4, folder=tmp_path)
    a, b, iterations = 0.999, 0.002, 1000
    x = np.arange(fma_peak.ACCUMULATORS, dtype=np.float64) / fma_peak.ACCUMULATORS
    for _ in range(iterations):
        x = x * a + b
    expected = 4 * x.sum()  # every lane of accumulator k starts at k / ACCUMULATORS
    assert kernel(iterations, a, b) == pytest.approx(expected, rel=1e-5)
    assert kernel(iterations + 1, a, b) != pytest.approx(expected, rel=1e-5)  # one iteration more is seen


def test_flops_count_two_per_lane_per_accumulator_per_iteration():
    assert fma_peak.flops(10, 16, calls=2) == 2 * fma_peak.ACCUMULATORS * 16 * 10 * 2


def test_a_measured_figure_decides_an_assumed_fma_unit_count_and_checks_a_reported_one():
    one = hardware_peak(cpuinfo(2), fma_gflops=120.0)  # Intel AVX-512: 2 units assumed; 120 / 147.2 = 0.82
    assert one["fma_units"] == 1 and one["fma_units_source"] == "measured"
    assert one["gflops"] == pytest.approx(2 * 16 * 1 * 2 * 2.3) and "0.82 full-width FMAs per cycle" in one["note"]
    two = hardware_peak(cpuinfo(2), fma_gflops=280.0)  # 1.90 x: two units
    assert two["fma_units"] == 2 and two["gflops"] == pytest.approx(294.4) and "95 % of it" in two["note"]
    assert two["fma_measured_gflops"] == 280.0
    zen4 = hardware_peak(cpuinfo(4, "AuthenticAMD", 25, "AMD EPYC 9R14", "avx512f"), fma_gflops=280.0)
    assert zen4["fma_units"] == 1 and zen4["fma_units_source"] == "reported by the CPU family"
    assert "FMA microbenchmark 280 GFLOP/s = 95 % of it" in zen4["note"]
    assert hardware_peak(cpuinfo(2))["fma_units_source"] == "assumed"
    loaded = hardware_peak(cpuinfo(2), fma_gflops=200.0, fma_core_gflops=140.0)  # one core's figure decides
    assert loaded["fma_units"] == 2 and "1.90 full-width FMAs per cycle" in loaded["note"]


def test_where_the_clock_is_unknown_the_measured_figure_is_the_peak():
    no_clock = hardware_peak(cpuinfo(2).replace("cpu MHz\t\t: 2300.000\n", ""), fma_gflops=250.0)
    assert no_clock["gflops"] == 250.0 and "microbenchmark" in no_clock["note"]
    sentence = peak_sentence(no_clock, {"torch": 200.0})
    assert "measured FMA peak: 250 GFLOP/s" in sentence and "200 GFLOP/s through torch" in sentence


def test_the_machine_figure_is_measured_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(PLAN_CACHE_ENV, str(tmp_path))
    calls = []
    monkeypatch.setattr(fma_peak, "measure_gflops", lambda lanes, cores: calls.append((lanes, cores)) or 99.0)
    assert fma_peak.machine_fma_gflops(16, 2, "cpu")["gflops"] == 99.0
    assert fma_peak.machine_fma_gflops(16, 2, "cpu")["gflops"] == 99.0 and calls == [(16, 2), (16, 1)]
    assert fma_peak.machine_fma_gflops(8, 2, "cpu")["gflops"] == 99.0 and len(calls) == 4  # another key: measured
    assert (tmp_path / fma_peak.CACHE_FILE).exists()


def test_without_a_c_compiler_the_reason_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(fma_peak.FmaUnavailable, match="no C compiler .*install gcc"):
        fma_peak.compile_kernel(16, folder=tmp_path)
    monkeypatch.setenv(PLAN_CACHE_ENV, str(tmp_path))
    entry = fma_peak.machine_fma_gflops(16, 2, "cpu")
    assert entry["gflops"] is None and entry["note"].startswith("FMA microbenchmark unavailable: no C compiler")
    assert not (tmp_path / fma_peak.CACHE_FILE).exists()  # an unavailable figure is not cached


def test_a_core_faster_than_the_reported_clock_sets_the_clock():
    zen4 = cpuinfo(4, "AuthenticAMD", 25, "AMD EPYC 9R14", "avx512f")  # 2.3 GHz nominal: 4 x 16 x 1 x 2 x 2.3 = 294.4
    turbo = hardware_peak(zen4, fma_gflops=430.0, fma_core_gflops=110.0)  # one core: 110 / (16 x 1 x 2) = 3.44 GHz
    assert turbo["clock_ghz"] == pytest.approx(110.0 / 32) and turbo["gflops"] == pytest.approx(4 * 110.0)
    assert turbo["clock_source"].startswith("measured") and "says 2.30 GHz" in turbo["clock_source"]
    assert "98 % of it" in turbo["note"]
    assert "x 3.44 GHz (measured" in peak_sentence(turbo, {"numpy": 200.0})
    near = hardware_peak(zen4, fma_gflops=310.0, fma_core_gflops=79.0)  # 2.47 GHz: within the margin, cpuinfo's stands
    assert near["clock_ghz"] == 2.3 and near["gflops"] == pytest.approx(294.4) and "105 % of it" in near["note"]
    assert hardware_peak(zen4, fma_gflops=400.0)["clock_ghz"] == pytest.approx(3.125)  # every core's figure / 4
