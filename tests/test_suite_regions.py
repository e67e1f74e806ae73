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
from implementations.torch.autograd import TorchCapsNet

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
    assert cls.param_names[-2] == "routing_gradient" and cls.params[-2] == common.ROUTING_GRADIENTS
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
    assert asked and set(asked) == {"numpy-vectorised"}  # once per routing algorithm it computes


# ------------------------------------------------------------------------------------------------ routing algorithm
ALGORITHM_CLASSES = [bench_phases.TrainStep, bench_phases.Forward, bench_phases.Inference, bench_phases.Backward,
                     bench_phases.Routing, bench_phases.RoutingBackward, bench_memory.HostMemory,
                     bench_memory.GpuMemory, bench_memory.GpuProcessMemory]


@pytest.mark.parametrize("cls", ALGORITHM_CLASSES)
def test_the_routing_algorithm_is_the_last_parameter_of_every_phase_routing_and_memory_benchmark(cls):
    """Last, so that every earlier parameter keeps its position, and an older results file (without it) its
    meaning when the report reads it with the new names."""
    assert cls.param_names[-1] == "routing_algorithm" and cls.params[-1] == common.ROUTING_ALGORITHMS
    assert cls.param_names[:3] == ["implementation", "batch_size", "routing_iterations"]
    assert len(cls.params) == len(cls.param_names)


class CountingTorch(TorchCapsNet):
    """torch-vectorised (which computes both built-in algorithms), logging every contract call the suite makes."""

    def __getattribute__(self, name):
        if name in {"train_step", "routing_forward", "routing_backward", "to_device", "prediction_vectors"}:
            LOG.append(name)
        return super().__getattribute__(name)


@pytest.fixture
def small_grid(counting, monkeypatch):
    """The counting implementations on the small network and a routing-iteration grid of 1, 3 and 5."""
    for module in (common, bench_phases):
        monkeypatch.setattr(module, "CONFIG", SMALL)
    monkeypatch.setattr(common, "STEP_ROUTING_ITERATIONS", [1, 3, 5])
    with registry.registered("counting-torch", CountingTorch):
        monkeypatch.setattr(common, "SELECTED", set(registry.names()))
        yield


@pytest.mark.parametrize("cls, extra", [(bench_phases.TrainStep, ("full",)), (bench_phases.Forward, ()),
                                        (bench_phases.Routing, ()), (bench_phases.RoutingBackward, ("full",))])
def test_each_grid_point_builds_its_routing_algorithm_and_self_attention_is_measured_at_one_count(small_grid, cls,
                                                                                                   extra):
    """Under self-attention (not iterative) a benchmark builds the network with the algorithm at the grid's one
    measured count (the network's 3) and skips every other count at once, before building anything; dynamic
    routing is built at every count."""
    grid = [1, 3, 5]
    cls = type(cls.__name__, (cls,), {"params": [cls.params[0], [2], grid, *cls.params[3:]]})
    benchmark = cls()
    benchmark.setup("counting-torch", 2, 3, *extra, "self-attention")
    assert benchmark.impl.config.routing_algorithm == "self-attention"
    for iterations in (1, 5):
        LOG.clear()
        with pytest.raises(NotImplementedError, match="self-attention routing is not iterative: measured at 3 "
                                                      "routing iterations alone"):
            cls().setup("counting-torch", 2, iterations, *extra, "self-attention")
        assert LOG == []  # skipped before any model was built
    for iterations in grid:
        benchmark = cls()
        benchmark.setup("counting-torch", 2, iterations, *extra, "dynamic")
        assert (benchmark.impl.config.routing_algorithm, benchmark.impl.config.routing_iterations) == \
            ("dynamic", iterations)


class DynamicOnly(Counting):
    """The counting NumPy implementation, claiming dynamic routing alone (NumPy's classes compute both)."""

    routing_algorithms = ("dynamic",)


def test_an_implementation_without_the_algorithm_and_self_attention_at_final_are_skipped_with_the_reason(
        small_grid, monkeypatch):
    """An implementation that computes dynamic routing alone is skipped under self-attention
    (ImplementationInfo.computes says why); self-attention has no routing gradient final, whoever computes it."""
    with registry.registered("dynamic-only", DynamicOnly):
        monkeypatch.setattr(common, "SELECTED", set(registry.names()))
        with pytest.raises(NotImplementedError, match="dynamic-only computes the routing algorithm dynamic only, "
                                                      "not 'self-attention'"):
            bench_phases.TrainStep().setup("dynamic-only", 2, 3, "full", "self-attention")
        with pytest.raises(NotImplementedError, match="dynamic-only computes the routing algorithm dynamic only"):
            bench_memory.HostMemory().setup("dynamic-only", 2, 3, "self-attention")
    with pytest.raises(NotImplementedError, match="self-attention routing has the routing gradient full only, "
                                                  "not 'final'"):
        bench_phases.RoutingBackward().setup("counting-torch", 2, 3, "final", "self-attention")


def test_the_routing_inputs_of_each_algorithm_are_their_own(small_grid):
    """u_hat is prepared once per process and grid point: the self-attention point times its own model."""
    dynamic, attention = bench_phases.RoutingBackward(), bench_phases.RoutingBackward()
    dynamic.setup("counting-torch", 2, 3, "full", "dynamic")
    attention.setup("counting-torch", 2, 3, "full", "self-attention")
    assert dynamic.impl is not attention.impl and attention.impl.config.routing_algorithm == "self-attention"
    LOG.clear()
    attention.time_routing_backward()
    assert LOG == ["routing_backward"]


def test_the_gpu_memory_grid_measures_each_algorithm_apart_keyed_by_the_grid_point(monkeypatch):
    """One measure_grid per routing algorithm, at its own network, of the implementations that compute it;
    the self-attention points at the measured count alone; the figures keyed as the benchmark's parameters."""
    asked = []

    def measure(names, config, dtype, points):
        asked.append((names, config.routing_algorithm, points))
        return {(name, *point): {"algorithm": config.routing_algorithm} for name in names for point in points}

    monkeypatch.setattr(common, "SELECTED", {"numpy-vectorised", "torch-vectorised"})
    monkeypatch.setattr(common, "ROUTING_ALGORITHMS", ["dynamic", "self-attention"])
    monkeypatch.setattr(bench_memory, "ROUTING_ALGORITHMS", ["dynamic", "self-attention"])
    monkeypatch.setattr(bench_memory, "STEP_ROUTING_ITERATIONS", [1, 3])
    monkeypatch.setattr(bench_memory, "BATCH_SIZES", [8])
    monkeypatch.setattr(bench_memory, "measure_grid", measure)
    monkeypatch.setattr(bench_memory, "IMPLEMENTATIONS", ["numpy-vectorised", "torch-vectorised"])
    monkeypatch.setattr(registry.get("numpy-vectorised").cls, "routing_algorithms", ("dynamic",))
    measured = bench_memory.shared_setup_cache(None)
    assert asked == [(["numpy-vectorised", "torch-vectorised"], "dynamic", [(8, 1), (8, 3)]),
                     (["torch-vectorised"], "self-attention", [(8, 3)])]
    assert measured[("torch-vectorised", 8, 3, "self-attention")] == {"algorithm": "self-attention"}
    assert measured[("numpy-vectorised", 8, 1, "dynamic")] == {"algorithm": "dynamic"}
