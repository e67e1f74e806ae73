"""The torch.compile implementations beyond the contract (test_contract.py holds them to it): availability
messages, compiled graphs shared by every instance and every batch size, the reconstruction weight applied
outside the graph, and the compile-time benchmark's choice of what to measure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.bench_compile import CompileTime
from harness import registry, settings
from harness.data import synthetic_batch
from harness.params import init_parameters
from harness.spec import SMALL
from implementations.torch import compiled as tcc
from implementations.torch import routing as tr

from gradcheck_util import livelier_parameters

COMPILED = registry.get("torch-vectorised-compiled").availability()
needs_compiler = pytest.mark.skipif(not COMPILED, reason=f"torch-vectorised-compiled unavailable: {COMPILED.reason}")


def test_registered_on_both_devices_for_both_routings():
    for variant in registry.ROUTING_VARIANTS:
        for name, device in ((f"torch-{variant}-compiled", "cpu"), (f"torch-{variant}-cuda-compiled", "cuda")):
            info = registry.get(name)
            assert (info.cls, info.device, info.routing_variant) == (tcc.TorchCompiledCapsNet, device, variant)
    assert tcc.TorchCompiledCapsNet.first_call_compiles


def test_unavailability_names_the_reason(monkeypatch):
    cuda = registry.get("torch-vectorised-cuda-compiled").availability()
    if not torch.cuda.is_available():
        assert not cuda and cuda.reason.startswith("no CUDA device")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    status = tcc.TorchCompiledCapsNet.availability("cpu")
    assert not status and "C++ compiler" in status.reason and "/nonexistent/c++" in status.reason


def test_compiled_callables_are_made_once_per_process():
    assert tcc.compiled("training_outputs") is tcc.compiled("training_outputs")
    assert tcc.compiled("training_outputs") is not tcc.compiled("inference_outputs")


def test_configurations_that_differ_in_the_reconstruction_weight_share_the_graph_s_view():
    assert tcc.unit_weight(SMALL) == tcc.unit_weight(SMALL.replace(reconstruction_weight=0.5))
    assert tcc.unit_weight(SMALL).reconstruction_weight == 1.0
    assert tcc.unit_weight(SMALL) != tcc.unit_weight(SMALL.replace(routing_iterations=1))


def compiled_frames() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


@needs_compiler
def test_new_instances_and_batch_sizes_reuse_the_compiled_graphs():
    """After one instance has compiled, another (other parameters, other batch sizes, another reconstruction
    weight) compiles nothing, and its loss is the eager implementation's."""
    first = registry.create("torch-vectorised-compiled", SMALL, init_parameters(SMALL, dtype="float64"), "float64")
    first.forward_loss(first.to_device(*synthetic_batch(SMALL, 4)))
    first.backward()
    before = compiled_frames()
    config = SMALL.replace(reconstruction_weight=0.5)
    for batch_size in (2, 5):
        params = livelier_parameters(config, seed=batch_size)
        impl = registry.create("torch-vectorised-compiled", config, params, "float64")
        eager = registry.create("torch-vectorised", config, params, "float64")
        images, labels = synthetic_batch(config, batch_size, seed=batch_size)
        loss = impl.forward_loss(impl.to_device(images, labels))
        impl.backward()
        np.testing.assert_allclose(float(loss), float(eager.forward_loss(eager.to_device(images, labels))),
                                   rtol=1e-12)
    assert compiled_frames() == before


def test_the_compile_benchmark_measures_only_what_compiles_or_captures():
    benchmark = CompileTime()
    with pytest.raises(NotImplementedError, match="torch-vectorised neither compiles nor captures"):
        benchmark.setup("torch-vectorised")
    assert registry.get("torch-vectorised-cuda-graph").cls.first_call_compiles


@needs_compiler
def test_the_compile_benchmark_runs_on_the_small_network(monkeypatch):
    """Its body, in this process, with the smoke profile's sizes (a graph compiled earlier in the process
    makes the figure small: it is a difference of two step times either way)."""
    from benchmarks import bench_compile, common

    monkeypatch.setattr(common, "CONFIG", SMALL)
    monkeypatch.setattr(bench_compile, "CONFIG", SMALL)
    monkeypatch.setattr(bench_compile, "BATCH_SIZES", [4])
    monkeypatch.setitem(common.PROFILE, "compiled", True)  # the quick profiles leave compiling ones out
    monkeypatch.delenv(settings.IMPLEMENTATIONS_ENV, raising=False)
    benchmark = CompileTime()
    benchmark.setup("torch-vectorised-compiled")
    assert isinstance(benchmark.track_compile_seconds("torch-vectorised-compiled"), float)


@pytest.mark.parametrize("algorithm", ["dynamic", "self-attention"])
def test_the_routing_alone_is_the_eager_routing(algorithm):
    """What the routing benchmarks time for these implementations (see the module docstring)."""
    config = SMALL.replace(routing_algorithm=algorithm)
    params = livelier_parameters(config)
    impl = registry.create("torch-vectorised-compiled", config, params, "float64")
    u_hat = impl.prediction_vectors(impl.to_device(*synthetic_batch(config, 2)))
    frames = compiled_frames()
    v = impl.routing_forward(u_hat)
    eager = tr.ROUTING[(algorithm, "vectorised", "full")].autograd
    tensors = {name: torch.tensor(value) for name, value in params.items()}
    np.testing.assert_array_equal(v.numpy(), eager(u_hat, tensors, config).numpy())
    assert compiled_frames() == frames


@needs_compiler
def test_self_attention_compiles_with_its_bias():
    """Under self-attention the compiled graph routes with digit.bias: loss and every gradient (the bias's
    included, at a non-zero bias) are the eager torch-vectorised's."""
    config = SMALL.replace(routing_algorithm="self-attention")
    params = livelier_parameters(config)
    params["digit.bias"] = np.random.default_rng(1).normal(scale=0.3, size=params["digit.bias"].shape)
    images, labels = synthetic_batch(config, 3)
    results = {}
    for name in ("torch-vectorised-compiled", "torch-vectorised"):
        impl = registry.create(name, config, params, "float64")
        loss = impl.forward_loss(impl.to_device(images, labels))
        impl.backward()
        results[name] = (float(loss), impl.gradients())
    (loss, gradients), (eager_loss, eager_gradients) = results.values()
    assert loss == pytest.approx(eager_loss, rel=1e-12)
    assert list(gradients) == list(eager_gradients) and "digit.bias" in gradients
    for name, expected in eager_gradients.items():
        np.testing.assert_allclose(gradients[name], expected, rtol=1e-9, atol=1e-13, err_msg=name)
