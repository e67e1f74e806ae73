"""What is particular to the JAX implementations (the contract test holds them to everything else): float64 is
computed in float64 without touching the process's x64 flag, the compilation cache is written where it is
configured, GPU preallocation is off before JAX is imported, and the allocator statistics are mapped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from harness import registry  # noqa: E402
from harness.data import synthetic_batch  # noqa: E402
from harness.params import init_parameters  # noqa: E402
from harness.registry import AllocatorPeaks  # noqa: E402
from harness.spec import SMALL  # noqa: E402
from harness.threads import thread_facts  # noqa: E402
from implementations.jax import _setup  # noqa: E402
from implementations.jax import capsnet as jax_capsnet  # noqa: E402
from implementations.jax import routing as jax_routing  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def built(dtype: str, name: str = "jax-vectorised"):
    impl = registry.create(name, SMALL, init_parameters(SMALL, dtype=dtype), dtype)
    return impl, impl.to_device(*synthetic_batch(SMALL, 2))


def test_float64_is_computed_in_float64_and_the_process_flag_stays_off():
    assert not jax.config.jax_enable_x64
    impl, batch = built("float64")
    loss = impl.forward_loss(batch)
    reference = registry.create("torch-vectorised", SMALL, init_parameters(SMALL, dtype="float64"), "float64")
    expected = float(reference.forward_loss(reference.to_device(*synthetic_batch(SMALL, 2))))
    assert loss.dtype == np.float64 and impl.params["digit.weight"].dtype == np.float64
    assert abs(float(loss) - expected) < 1e-13 * abs(expected)  # float32 rounding would show at ~1e-7
    assert not jax.config.jax_enable_x64
    assert jax.numpy.asarray(1.0).dtype == np.float32


def test_float32_stays_float32_where_the_process_turned_x64_on():
    with jax.enable_x64(True):
        impl, batch = built("float32")
        lengths, reconstructions = impl.forward(batch, train=False)
    assert lengths.dtype == np.float32 and reconstructions.dtype == np.float32


def test_the_compilation_cache_is_written_to_the_configured_folder(tmp_path):
    script = ("from harness import registry; from harness.spec import SMALL;"
              "from harness.params import init_parameters; from harness.data import synthetic_batch;"
              "impl = registry.create('jax-vectorised', SMALL, init_parameters(SMALL), 'float32');"
              "impl.forward(impl.to_device(*synthetic_batch(SMALL, 2)), train=False); impl.synchronize()")
    env = dict(os.environ, CAPSBENCH_JAX_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=ROOT, timeout=300)
    assert any(path.is_file() for path in (tmp_path / "cache").rglob("*"))


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(jax_capsnet.CACHE_ENV, str(tmp_path))
    assert jax_capsnet.cache_folder() == tmp_path
    monkeypatch.delenv(jax_capsnet.CACHE_ENV)
    assert jax_capsnet.cache_folder() == ROOT / "runs" / "jax-cache"


def test_preallocation_is_off_when_jax_is_first_imported():
    """A finder that records XLA_PYTHON_CLIENT_PREALLOCATE at the moment ``import jax`` first runs."""
    script = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "jax" and not seen:
            seen.append(os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
        return None
sys.meta_path.insert(0, Watch())
import implementations.jax.capsnet
print(seen)
"""
    env = {key: value for key, value in os.environ.items() if key != _setup.PREALLOCATE_ENV}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.strip() == "['false']"


def test_configure_environment_keeps_a_users_choice():
    environ = {}
    _setup.configure_environment(environ)
    assert environ == {_setup.PREALLOCATE_ENV: "false"}
    chosen = {_setup.PREALLOCATE_ENV: "true"}
    _setup.configure_environment(chosen)
    assert chosen[_setup.PREALLOCATE_ENV] == "true"


def test_memory_stats_map_to_allocator_peaks():
    stats = {"bytes_in_use": 10, "peak_bytes_in_use": 100, "pool_bytes": 200, "peak_pool_bytes": 300}
    assert jax_capsnet.allocator_peaks_from_stats(stats) == AllocatorPeaks(live=100, reserved=300)
    assert jax_capsnet.allocator_peaks_from_stats({"peak_bytes_in_use": 100, "peak_bytes_reserved": 150}) == \
        AllocatorPeaks(live=100, reserved=150)
    assert jax_capsnet.allocator_peaks_from_stats({"peak_bytes_in_use": 100}) == AllocatorPeaks(100, 100)
    assert jax_capsnet.allocator_peaks_from_stats(None) is None


def test_a_cuda_instance_reads_its_devices_memory_stats():
    class FakeDevice:
        def memory_stats(self):
            return {"peak_bytes_in_use": 7, "peak_pool_bytes": 9}

    impl, _ = built("float32")
    assert impl.allocator_peaks() is None  # the CPU has no device allocator
    impl.device, impl._device = "cuda", FakeDevice()
    assert impl.allocator_peaks() == AllocatorPeaks(live=7, reserved=9)


def test_availability_says_why(monkeypatch):
    if not jax_capsnet.JaxCapsNet.availability("cuda"):
        assert "no CUDA device" in jax_capsnet.JaxCapsNet.availability("cuda").reason
    monkeypatch.setattr(jax_capsnet, "jax", None)
    monkeypatch.setattr(jax_capsnet, "_IMPORT_ERROR", "jax is not installed (No module named 'jax'); ...")
    status = jax_capsnet.JaxCapsNet.availability("cpu")
    assert not status and "jax is not installed" in status.reason


def test_thread_facts_record_the_xla_pool():
    assert thread_facts()[jax_capsnet.XLA_CPU_POOL] >= 1


@pytest.mark.parametrize("variant", ["vectorised", "looped"])
def test_final_routing_gradient_reaches_u_hat_through_the_last_weighted_sum_only(variant):
    """With "final", d v / d u_hat is that of v = squash(sum_i c_i u_hat_i) with the last couplings c held
    constant: c (x) d s, d s the squash's vector-Jacobian product (computed here independently)."""
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        u_hat = jnp.asarray(rng.normal(size=(2, 6, 3, 4)))
        grad_v = jnp.asarray(rng.normal(size=(2, 3, 4)))
        routing = jax_routing.ROUTING[(variant, "final")]
        _, vjp = jax.vjp(lambda u: routing(u, 3, 1e-8), u_hat)
        (grad,) = vjp(grad_v)
        logits = jnp.zeros((2, 6, 3))
        for _ in range(2):  # the couplings of the third iteration
            v = jax_routing.squash(jnp.einsum("bnj,bnjd->bjd", jax.nn.softmax(logits, axis=2), u_hat), 1e-8)
            logits = logits + jnp.einsum("bnjd,bjd->bnj", u_hat, v)
        coupling = jax.nn.softmax(logits, axis=2)
        s = jnp.einsum("bnj,bnjd->bjd", coupling, u_hat)
        grad_s = jax.vjp(lambda x: jax_routing.squash(x, 1e-8), s)[1](grad_v)[0]
        expected = coupling[..., None] * grad_s[:, None, :, :]
        full = jax.vjp(lambda u: jax_routing.ROUTING[(variant, "full")](u, 3, 1e-8), u_hat)[1](grad_v)[0]
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-12, atol=1e-14)
    assert np.max(np.abs(np.asarray(full) - np.asarray(expected))) > 1e-6  # "full" differs: the test can fail
