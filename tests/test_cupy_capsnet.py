"""The CuPy implementation: its glue on the CPU (through NumPy), its GPU-only parts where a GPU exists."""

import numpy as np
import pytest

from harness import registry
from harness.check import check_implementation
from harness.data import synthetic_batch
from harness.params import init_parameters
from harness.spec import SMALL
from implementations import cupy_capsnet
from implementations.cupy_capsnet import CupyCapsNet

CUPY = registry.get("cupy-vectorised").availability()
needs_gpu = pytest.mark.skipif(not CUPY, reason=f"cupy-vectorised unavailable here: {CUPY.reason}")


class CupyClassOnNumpy(CupyCapsNet):
    """The CuPy implementation's own class with NumPy as its array module, so it runs on the CPU."""

    @classmethod
    def array_module(cls):
        return np

    @classmethod
    def availability(cls, device):
        return registry.Availability.ok()


def test_unavailability_names_the_reason():
    if CUPY:
        pytest.skip("CuPy and a CUDA device are present")
    assert CUPY.reason.startswith(("cupy not installed", "no CUDA device", "cupy cannot be imported"))
    assert "cupy-vectorised" in registry.names() and "cupy-looped" in registry.names()
    assert "cupy-vectorised" not in registry.available()


@pytest.mark.parametrize("routing", ["vectorised", "looped"])
def test_the_cupy_class_on_numpy_matches_the_reference(monkeypatch, routing):
    info = registry.ImplementationInfo(f"cupy-on-numpy-{routing}", CupyClassOnNumpy, "cpu", routing)
    monkeypatch.setitem(registry._REGISTRY.entries, info.name, info)
    impl = info.create(SMALL, init_parameters(SMALL))
    assert impl._adam_kernel is None and impl.allocator_peak_bytes() is None
    for dtype in ("float32", "float64"):
        rows = check_implementation(info.name, SMALL, dtype)
        assert all(row.passed for row in rows), [row for row in rows if not row.passed]


@needs_gpu
@pytest.mark.parametrize("name", ["cupy-vectorised", "cupy-looped"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_parity(name, dtype):
    rows = check_implementation(name, SMALL, dtype)
    assert all(row.passed for row in rows), [row for row in rows if not row.passed]


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
def test_allocator_peak_is_reported():
    impl = registry.create("cupy-vectorised", SMALL, init_parameters(SMALL), "float32")
    impl.reset_peak_memory()
    impl.train_step(impl.to_device(*synthetic_batch(SMALL, 8)))
    assert impl.allocator_peak_bytes() > 0
    assert cupy_capsnet.cupy is not None
