"""What is particular to the JAX implementations (the contract test holds them to everything else): float64 is
computed in float64 without touching the process's x64 flag, the compilation cache is written where it is
configured, GPU preallocation is off before JAX is imported, the allocator statistics are mapped, the routing
gradient "final" is stopped where harness.spec says, and self-attention routing (its bias a parameter) matches
torch autograd in float64."""

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
from harness.routing_algorithms import DIGIT_BIAS  # noqa: E402
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
    assert SMALL.routing_iterations == 3 and SMALL.squash_eps == 1e-8
    with jax.enable_x64(True):
        u_hat = jnp.asarray(rng.normal(size=(2, 6, 3, 4)))
        grad_v = jnp.asarray(rng.normal(size=(2, 3, 4)))
        routing = jax_routing.ROUTING[("dynamic", variant, "final")]
        _, vjp = jax.vjp(lambda u: routing(u, {}, SMALL), u_hat)
        (grad,) = vjp(grad_v)
        logits = jnp.zeros((2, 6, 3))
        for _ in range(2):  # the couplings of the third iteration
            v = jax_routing.squash(jnp.einsum("bnj,bnjd->bjd", jax.nn.softmax(logits, axis=2), u_hat), 1e-8)
            logits = logits + jnp.einsum("bnjd,bjd->bnj", u_hat, v)
        coupling = jax.nn.softmax(logits, axis=2)
        s = jnp.einsum("bnj,bnjd->bjd", coupling, u_hat)
        grad_s = jax.vjp(lambda x: jax_routing.squash(x, 1e-8), s)[1](grad_v)[0]
        expected = coupling[..., None] * grad_s[:, None, :, :]
        full = jax.vjp(lambda u: jax_routing.ROUTING[("dynamic", variant, "full")](u, {}, SMALL), u_hat)[1](grad_v)[0]
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-12, atol=1e-14)
    assert np.max(np.abs(np.asarray(full) - np.asarray(expected))) > 1e-6  # "full" differs: the test can fail


# Self-attention routing (harness.spec), against torch autograd in float64 ---------------------------------------

ATTENTION = SMALL.replace(routing_algorithm="self-attention")


def torch_self_attention(u_hat: np.ndarray, bias: np.ndarray, grad_v: np.ndarray):
    """v and the gradients of u_hat and bias, by torch autograd on the float64 reference
    (implementations.torch.routing.self_attention_vectorised)."""
    torch = pytest.importorskip("torch")
    from implementations.torch.routing import self_attention_vectorised

    u = torch.tensor(u_hat, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    v = self_attention_vectorised(u, b, ATTENTION.squash_eps)
    grad_u, grad_b = torch.autograd.grad(v, (u, b), torch.tensor(grad_v))
    return v.detach().numpy(), grad_u.numpy(), grad_b.numpy()


@pytest.mark.parametrize("variant", ["vectorised", "looped"])
def test_self_attention_routing_and_its_gradients_match_torch_autograd(variant):
    """u_hat of order one (so the agreements spread the softmax far from uniform) and a bias drawn at random (so
    adding it before the softmax, or not at all, shows): v and the vjp in u_hat and in the bias."""
    rng = np.random.default_rng(1)
    u_hat, bias = rng.normal(size=(2, 5, 3, 4)), rng.normal(scale=0.5, size=(3, 5))
    grad_v = rng.normal(size=(2, 3, 4))
    expected_v, expected_u, expected_b = torch_self_attention(u_hat, bias, grad_v)
    routing = jax_routing.ROUTING[("self-attention", variant, "full")]
    with jax.enable_x64(True):
        v, vjp = jax.vjp(lambda u, b: routing(u, {DIGIT_BIAS: b}, ATTENTION), jax.numpy.asarray(u_hat),
                         jax.numpy.asarray(bias))
        grad_u, grad_b = vjp(jax.numpy.asarray(grad_v))
    assert v.dtype == np.float64
    for value, expected in ((v, expected_v), (grad_u, expected_u), (grad_b, expected_b)):
        np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-11, atol=1e-13)
    assert np.min(np.abs(expected_b)) > 0  # every bias entry has a gradient of its own


def test_the_two_routing_algorithms_compile_apart_and_each_routes_its_own_way():
    """One process, one u_hat, dynamic then self-attention then dynamic again through the jitted routing
    alone: each matches its own reference (a program keyed without the algorithm would give the first's v
    to the second), and routing_backward gives u_hat's gradient under self-attention."""
    torch = pytest.importorskip("torch")
    from implementations.torch.routing import routing_vectorised

    rng = np.random.default_rng(2)
    u_hat = rng.normal(size=(2, SMALL.num_primary_caps, SMALL.num_classes, SMALL.digit_caps_dim))
    grad_v = rng.normal(size=(2, SMALL.num_classes, SMALL.digit_caps_dim))
    params = init_parameters(ATTENTION, dtype="float64")
    params[DIGIT_BIAS] = rng.normal(scale=0.1, size=params[DIGIT_BIAS].shape)
    expected_v, expected_u, _ = torch_self_attention(u_hat, params[DIGIT_BIAS], grad_v)
    expected_dynamic = routing_vectorised(torch.tensor(u_hat), SMALL.routing_iterations, SMALL.squash_eps).numpy()
    dynamic = registry.create("jax-vectorised", SMALL, init_parameters(SMALL, dtype="float64"), "float64")
    attention = registry.create("jax-vectorised", ATTENTION, params, "float64")
    for impl, expected in ((dynamic, expected_dynamic), (attention, expected_v), (dynamic, expected_dynamic)):
        v = impl.to_numpy(impl.routing_forward(impl.from_numpy(u_hat)))
        np.testing.assert_allclose(v, expected, rtol=1e-11, atol=1e-13)
    grad_u = attention.to_numpy(attention.routing_backward(attention.from_numpy(u_hat), attention.from_numpy(grad_v)))
    np.testing.assert_allclose(grad_u, expected_u, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", ["jax-vectorised", "jax-looped"])
def test_self_attention_network_gradients_and_adam_step_match_torch_vectorised(name):
    """The whole network at SMALL under self-attention, a non-zero bias: the loss, every parameter's gradient
    (digit.bias among them) and the parameters after one Adam step, against torch-vectorised in float64."""
    params = init_parameters(ATTENTION, dtype="float64")
    assert list(params)[-1] == DIGIT_BIAS
    params[DIGIT_BIAS] = np.random.default_rng(3).normal(scale=0.1, size=params[DIGIT_BIAS].shape)
    results = []
    for implementation in ("torch-vectorised", name):
        impl = registry.create(implementation, ATTENTION, {key: value.copy() for key, value in params.items()},
                               "float64")
        loss = float(impl.forward_loss(impl.to_device(*synthetic_batch(ATTENTION, 2))))
        impl.backward()
        gradients = impl.gradients()
        impl.adam_step()
        results.append((loss, gradients, impl.parameters(), impl.adam_state()))
    (expected_loss, expected_grads, expected_params, _), (loss, grads, updated, state) = results
    assert abs(loss - expected_loss) < 1e-12 * abs(expected_loss)
    assert list(grads) == list(expected_grads) == list(params)
    for key in params:
        np.testing.assert_allclose(grads[key], expected_grads[key], rtol=1e-10, atol=1e-13 * np.max(np.abs(
            expected_grads[key])), err_msg=key)
        np.testing.assert_allclose(updated[key], expected_params[key], rtol=1e-12, atol=1e-14, err_msg=key)
    assert np.max(np.abs(grads[DIGIT_BIAS])) > 0 and not np.array_equal(updated[DIGIT_BIAS], params[DIGIT_BIAS])
    np.testing.assert_allclose(state[f"first/{DIGIT_BIAS}"], 0.1 * grads[DIGIT_BIAS], rtol=1e-12)
