"""What the asv suite times: set-up and warm-up stay in ``setup``, each ``time_*`` calls only its phase and
ends by synchronising the device.  Checked by calling the benchmark classes directly on a counting stand-in
implementation."""

from __future__ import annotations

import contextlib

import pytest

from benchmarks import bench_memory, bench_phases, common
from harness import registry
from harness.spec import SMALL
from implementations.numpy.capsnet import NumpyCapsNet

LOG: list[str] = []


class Counting(NumpyCapsNet):
    """The NumPy implementation, logging every contract call the suite makes."""

    def __getattribute__(self, name):
        if name in {"forward", "forward_loss", "backward", "adam_step", "train_step", "synchronize",
                    "prediction_vectors", "routing_forward", "routing_backward", "to_device"}:
            LOG.append(name)
        return super().__getattribute__(name)


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setattr(common, "_prepared", {})
    monkeypatch.setattr(bench_phases, "_routing_inputs", {})
    with registry.registered("counting", Counting):
        monkeypatch.setattr(common, "SELECTED", set(registry.names()))
        LOG.clear()
        yield ("counting", common.BATCH_SIZES[0], common.STEP_ROUTING_ITERATIONS[0])


@pytest.mark.parametrize("cls, method, setup_calls, timed_calls", [
    (bench_phases.TrainStep, "time_train_step", ["train_step"],
     ["train_step", "forward_loss", "backward", "adam_step", "synchronize"]),
    (bench_phases.Forward, "time_forward", ["forward_loss"], ["forward_loss", "synchronize"]),
    (bench_phases.Inference, "time_inference", ["forward"], ["forward", "synchronize"]),
    (bench_phases.Backward, "time_backward", ["forward_loss", "backward", "forward_loss"],
     ["backward", "synchronize"]),
])
def test_setup_warms_up_and_each_timed_call_does_only_its_phase(counting, cls, method, setup_calls, timed_calls):
    benchmark = cls()
    benchmark.setup(*counting)
    calls = [name for name in LOG if name not in ("synchronize", "to_device")]
    for expected in setup_calls:  # the warm-up, and for Backward the fresh forward pass of each sample
        assert expected in calls
    LOG.clear()
    getattr(benchmark, method)(*counting)
    assert LOG == timed_calls
    LOG.clear()
    benchmark.setup(*counting)  # asv runs setup before every sample: no second build or warm-up
    assert "to_device" not in LOG and ("train_step" not in LOG or cls is bench_phases.Backward)


def test_host_memory_builds_a_model_only_for_the_step_it_samples(counting, monkeypatch):
    """The before-model figure's process builds nothing (README's main job measures it for every
    implementation, each in a process of its own); the step figure builds and warms up outside the sampled
    region, which holds exactly one training step."""
    real_sampler = bench_memory.host_sampler

    @contextlib.contextmanager
    def marked_sampler(**options):
        LOG.append("sampling starts")
        with real_sampler(**options) as sampler:
            yield sampler
        LOG.append("sampling ends")

    monkeypatch.setattr(bench_memory, "host_sampler", marked_sampler)
    benchmark = bench_memory.HostMemory()
    benchmark.setup(*counting)
    assert benchmark.track_host_memory_before_model(*counting) > 0
    assert LOG == []
    benchmark = bench_memory.HostMemory()
    benchmark.setup(*counting)
    assert benchmark.track_host_memory_train_step(*counting) > 0
    before, sampled = LOG[:LOG.index("sampling starts")], LOG[LOG.index("sampling starts") + 1:-1]
    assert "to_device" in before and "train_step" in before  # built and warmed up before sampling
    assert sampled == ["train_step", "forward_loss", "backward", "adam_step", "synchronize"]
    assert LOG[-1] == "sampling ends"


def test_routing_times_routing_alone_on_the_u_hat_it_prepared(counting):
    name, batch, _ = counting
    params = (name, batch, common.ROUTING_ITERATIONS[0])
    benchmark = bench_phases.Routing()
    benchmark.setup(*params)
    assert "prediction_vectors" in LOG and "routing_forward" in LOG and "routing_backward" in LOG  # warm-ups
    u_hat = benchmark.u_hat
    LOG.clear()
    benchmark.time_routing(*params)
    assert LOG == ["routing_forward", "synchronize"]
    benchmark.setup(*params)
    assert benchmark.u_hat is u_hat  # prepared once per process, in the implementation's own layout
    backward = bench_phases.RoutingBackward()
    backward.setup(*params, "full")
    LOG.clear()
    backward.time_routing_backward(*params, "full")
    assert LOG == ["routing_backward", "synchronize"]


class FullGradientOnly(NumpyCapsNet):
    routing_gradients = ("full",)


@pytest.mark.parametrize("cls", [bench_phases.TrainStep, bench_phases.Backward, bench_phases.RoutingBackward])
def test_the_routing_gradient_is_a_parameter_of_the_work_it_changes(counting, cls, monkeypatch):
    """Each benchmark of the work the routing gradient changes builds the network at the gradient of its
    grid point; an implementation without it is skipped (NotImplementedError) with the reason."""
    assert cls.param_names[-1] == "routing_gradient" and cls.params[-1] == common.ROUTING_GRADIENTS
    name, _, iterations = counting
    batch = 2
    for module in (common, bench_phases):  # the small network: what is built matters here, not its size
        monkeypatch.setattr(module, "CONFIG", SMALL)
    benchmark = cls()
    benchmark.setup(name, batch, iterations, "final")
    assert benchmark.impl.config.routing_gradient == "final"
    with registry.registered("full-only", FullGradientOnly):
        monkeypatch.setattr(common, "SELECTED", set(registry.names()))
        with pytest.raises(NotImplementedError, match="full only, not 'final'"):
            cls().setup("full-only", batch, iterations, "final")


def test_the_profiles_that_sweep_routing_measure_both_gradients_and_smoke_stays_small():
    from harness.suite.sizes import PROFILES, routing_gradients

    for name in ("fast", "regular", "large"):
        assert routing_gradients(PROFILES[name]) == ["full", "final"], name
    assert routing_gradients(PROFILES["smoke"]) == ["full"]


def test_the_gpu_memory_grid_measures_only_the_selected_implementations(monkeypatch):
    """--impl shrinks the memory grid: measure_grid is asked only for the selected names."""
    asked = []
    monkeypatch.setattr(common, "SELECTED", {"numpy-vectorised"})
    monkeypatch.setattr(bench_memory, "measure_grid", lambda names, *rest: asked.extend(names) or {})
    bench_memory.shared_setup_cache(None)
    assert asked == ["numpy-vectorised"]
