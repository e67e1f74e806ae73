"""The CuPy implementation: its availability message and its pool-peak counting on the CPU, its GPU-only
parts where a GPU exists.  Its mathematics (the NumPy code) is held to the contract on the CPU through a
NumPy stand-in in test_contract.py."""

import numpy as np
import pytest

from harness import registry
from harness.contract import AllocatorPeaks
from harness.data import synthetic_batch
from harness.params import init_parameters
from harness.routing_algorithms import DIGIT_BIAS
from harness.spec import SMALL
from implementations.cupy.capsnet import CupyCapsNet, PeakCounter
from implementations.numpy import routing as nr

CUPY = registry.get("cupy-vectorised").availability()
needs_gpu = pytest.mark.skipif(not CUPY, reason=f"cupy-vectorised unavailable here: {CUPY.reason}")


def test_unavailability_names_the_reason():
    if CUPY:
        pytest.skip("CuPy and a CUDA device are present")
    assert CUPY.reason.startswith(("cupy not installed", "no CUDA device", "cupy cannot be imported"))
    assert "cupy-vectorised" in registry.names() and "cupy-looped" in registry.names()
    assert "cupy-vectorised" not in registry.available()


@pytest.mark.parametrize("variant", ["vectorised", "looped"])
def test_on_numpy_self_attention_is_the_numpy_implementations(variant):
    """cupy-vectorised and cupy-looped declare both routing algorithms and run NumPy's routing table: their
    class on NumPy computes self-attention's loss and gradients (digit.bias included) as numpy-VARIANT does."""
    assert registry.get(f"cupy-{variant}").routing_algorithms() == ["dynamic", "self-attention"]
    on_numpy = type("OnNumpy", (CupyCapsNet,), {"array_module": classmethod(lambda cls: np)})
    config = SMALL.replace(routing_algorithm="self-attention")
    params = init_parameters(config, dtype=np.float64)
    params[DIGIT_BIAS] = np.random.default_rng(0).normal(scale=0.3, size=params[DIGIT_BIAS].shape)
    images, labels = synthetic_batch(config, 2)
    results = []
    for impl in (on_numpy(config, params, "float64", "cpu", variant),
                 registry.create(f"numpy-{variant}", config, params, "float64")):
        assert impl.routing_functions is nr.ROUTING[("self-attention", variant, "full")]
        loss = impl.forward_loss(impl.to_device(images, labels))
        impl.backward()
        results.append((float(loss), impl.gradients()))
    (loss, grads), (expected_loss, expected) = results
    assert loss == expected_loss and list(grads) == list(expected) and DIGIT_BIAS in grads
    for name, value in expected.items():
        np.testing.assert_array_equal(grads[name], value, err_msg=name)


def test_peak_counter_follows_live_and_reserved_bytes():
    """Blocks handed out and taken back by the pool, the pool growing: peaks by hand."""
    counter = PeakCounter(live=100, reserved=1000)
    counter.allocated(300)  # live 400
    counter.reserved(1500)
    counter.freed(200)  # live 200
    counter.allocated(150)  # live 350: below the earlier 400
    counter.reserved(1200)  # the pool shrank: the peak stays
    assert counter.peaks() == AllocatorPeaks(live=400, reserved=1500)
    assert counter.live == 350


@needs_gpu
def test_fused_adam_equals_the_generic_update():
    import cupy

    params = init_parameters(SMALL)
    fused = registry.create("cupy-vectorised", SMALL, params, "float64")
    generic = registry.create("cupy-vectorised", SMALL, params, "float64")
    generic._adam_kernel = None
    for impl in (fused, generic):
        for seed in range(3):
            impl.train_step(impl.to_device(*synthetic_batch(SMALL, 4, seed=seed)))
    for name, value in fused.parameters().items():
        np.testing.assert_allclose(value, generic.parameters()[name], rtol=1e-12, atol=1e-15)
    assert isinstance(fused.params[name], cupy.ndarray)


@needs_gpu
def test_allocator_peaks_count_a_step_allocation():
    """The live peak rises by at least an array allocated inside the region and freed before its end."""
    import cupy

    impl = registry.create("cupy-vectorised", SMALL, init_parameters(SMALL), "float32")
    impl.train_step(impl.to_device(*synthetic_batch(SMALL, 8)))
    impl.reset_peak_memory()
    before = cupy.get_default_memory_pool().used_bytes()
    block = cupy.ones(64 * 2**20 // 4, dtype=cupy.float32)  # 64 MiB, freed again
    del block
    peaks = impl.allocator_peaks()
    assert peaks.live >= before + 64 * 2**20
    assert peaks.reserved >= peaks.live
    assert impl.pci_bus_id().count(":") == 2
