"""cupy-fused: on the CPU, the driver of the fused routing run on NumPy versions of its kernels against the
NumPy routing, the launch geometry, the kernel source (compiled by NVRTC where the library is found) and
the availability message; on a GPU, each CUDA kernel against its NumPy version and the whole fused routing
against routing_vectorised_forward/backward on random inputs, in float32 and float64."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest

from harness import ranges, registry
from harness.params import init_parameters
from harness.spec import SMALL
from harness.tolerances import TOLERANCES
from implementations.cupy import fused as cf
from implementations.cupy import routing as cr
from implementations.numpy import routing as nr

FUSED = registry.get("cupy-fused").availability()
needs_gpu = pytest.mark.skipif(not FUSED, reason=f"cupy-fused unavailable here: {FUSED.reason}")
EPS = SMALL.squash_eps
SHAPES = [(2, 3, 7, 4), (3, 10, 37, 8), (2, 10, 1152, 16)]  # (B, J, N, D): odd sizes, and the paper's J, N, D


class NumpyKernels:
    """What each CUDA kernel computes, in NumPy: the same arguments, outputs written in place."""

    def sum_squash(self, coupling, u_hat, s_out, v_out, eps):
        s_out[...] = np.einsum("bji,bjid->bjd", coupling, u_hat)
        v_out[...] = nr.squash_forward(np, s_out, eps)

    def agree_softmax(self, u_hat, v, logits, coupling_out, accumulate):
        agreement = np.einsum("bjid,bjd->bji", u_hat, v)
        logits[...] = logits + agreement if accumulate else agreement
        coupling_out[...] = nr.softmax(np, logits, axis=1)

    def sum_squash_backward(self, weights, u_hat, grad_v, s, grad_s_out, eps):
        g = grad_v if weights is None else np.einsum("bji,bjid->bjd", weights, u_hat)
        grad_s_out[...] = nr.squash_backward(np, s, g, eps)

    def softmax_backward(self, u_hat, grad_s, coupling, grad_logits_next, grad_logits_out):
        grad_coupling = np.einsum("bjid,bjd->bji", u_hat, grad_s)
        grad_logits_out[...] = nr.softmax_backward(coupling, grad_coupling, axis=1)
        if grad_logits_next is not None:
            grad_logits_out += grad_logits_next

    def grad_u_hat(self, coupling, grad_s, grad_logits, v, out):
        out[...] = np.einsum("rbji,rbjd->bjid", coupling, grad_s)
        if len(coupling) > 1:
            out += np.einsum("rbji,rbjd->bjid", grad_logits[1:], v[:-1])


def random_routing_inputs(xp, shape, dtype, seed=0):
    """u_hat scaled so that the couplings move away from uniform, and a gradient with respect to v."""
    rng = np.random.default_rng(seed)
    batch, n_out, _, dim = shape
    u_hat = rng.normal(scale=0.5, size=shape).astype(dtype)
    grad_v = rng.normal(size=(batch, n_out, dim)).astype(dtype)
    return xp.asarray(u_hat), xp.asarray(grad_v)


def assert_close(value, reference, dtype, kind="output", what=""):
    """Normwise relative error within harness.check's tolerance for the dtype and kind of quantity."""
    value, reference = np.asarray(value, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    error = np.max(np.abs(value - reference))
    assert error <= TOLERANCES[dtype][kind] * np.max(np.abs(reference)), f"{what}: error {error:.3e}"


# On the CPU ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_driver_on_numpy_kernels_is_the_vectorised_routing(shape, iterations, dtype):
    """The launch sequence (iteration order, which iteration's arrays each kernel gets, the first
    iteration's 1/J, the last one's grad_v) gives routing_vectorised_forward/backward's v and gradient."""
    u_hat, grad_v = random_routing_inputs(np, shape, dtype)
    routing = cr.FusedRouting(NumpyKernels())
    v, cache = routing.forward(np, u_hat, iterations, EPS)
    expected_v, expected_cache = nr.routing_vectorised_forward(np, u_hat, iterations, EPS)
    assert_close(v, expected_v, dtype)
    for r, (coupling, s, v_r) in enumerate(expected_cache):
        assert_close(cache.coupling[r], coupling, dtype)
        assert_close(cache.s[r], s, dtype)
        assert_close(cache.v[r], v_r, dtype)
    assert np.all(cache.coupling[0] == np.asarray(1.0 / shape[1], dtype=dtype))
    grad, param_grads = routing.backward(np, u_hat, cache, grad_v, EPS)
    assert grad.shape == u_hat.shape and grad.dtype == u_hat.dtype and param_grads == {}
    assert_close(grad, nr.routing_vectorised_backward(np, u_hat, expected_cache, grad_v, EPS)[0], dtype, "gradient")


class RangeLog:
    """A recorder that writes down each range it is asked to open, in order."""

    def __init__(self):
        self.opened = []

    def range(self, layer, phase):
        self.opened.append((phase, layer))
        return contextlib.nullcontext()


def test_fused_routing_opens_the_routing_ranges_of_the_vectorised_routing():
    """cupy-fused's profile has routing rows: the same (phase, layer) ranges as the NumPy routing opens."""
    u_hat, grad_v = random_routing_inputs(np, SHAPES[0], "float32")
    opened = {}
    fused = cr.FusedRouting(NumpyKernels())
    for name, forward, backward in [("fused", fused.forward, fused.backward),
                                    ("numpy", nr.routing_vectorised_forward, nr.routing_vectorised_backward)]:
        with ranges.recording(RangeLog()) as log:
            _, cache = forward(np, u_hat, 3, EPS)
            backward(np, u_hat, cache, grad_v, EPS)
        opened[name] = sorted(set(log.opened))
    assert opened["fused"] == opened["numpy"]
    assert {("forward", "routing_iteration_3"), ("backward", "routing_iteration_1")} <= set(opened["fused"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_driver_final_gradient_on_numpy_kernels_is_the_numpy_final_backward(iterations, dtype):
    """The routing gradient final: the last iteration's sum-squash backward and the gradient kernel over that
    iteration alone give routing_vectorised_final_backward's gradient, which differs from the full one."""
    u_hat, grad_v = random_routing_inputs(np, SHAPES[0], dtype)
    routing = cr.FusedRouting(NumpyKernels())
    _, cache = routing.forward(np, u_hat, iterations, EPS)
    _, expected_cache = nr.routing_vectorised_forward(np, u_hat, iterations, EPS)
    grad, _ = routing.backward_final(np, u_hat, cache, grad_v, EPS)
    expected, _ = nr.routing_vectorised_final_backward(np, u_hat, expected_cache, grad_v, EPS)
    assert grad.shape == u_hat.shape and grad.dtype == u_hat.dtype
    assert_close(grad, expected, dtype, "gradient")
    full, _ = nr.routing_vectorised_backward(np, u_hat, expected_cache, grad_v, EPS)
    assert (iterations == 1) == np.allclose(grad, full, rtol=1e-4, atol=1e-6)


def test_launch_geometry():
    assert [cr.sum_block_threads(dim) for dim in (1, 8, 10, 16, 300, 1024)] == [256, 256, 250, 256, 300, 1024]
    for dim in (0, 1025):
        with pytest.raises(ValueError, match="capsule dimension"):
            cr.sum_block_threads(dim)
    assert [cr.blocks(count) for count in (0, 1, 256, 257, 512 * 1152)] == [1, 1, 1, 2, 2304]
    assert cr.blocks(2**45) == cr.MAX_BLOCKS


def test_source_per_dtype_names_every_kernel():
    for dtype, real in (("float32", "float"), (np.float64, "double")):
        source = cr.routing_source(dtype)
        assert source.startswith(f"typedef {real} T;")
        declared = re.findall(r'extern "C" __global__ void (\w+)\(', source)
        assert sorted(declared) == sorted(cr.KERNEL_NAMES)
    with pytest.raises(TypeError, match="float16"):
        cr.routing_source("float16")


def nvrtc_found() -> bool:
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not nvrtc_found(), reason="NVRTC (libnvrtc) not found: pip install nvidia-cuda-nvrtc-cu12")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernels_compile_with_nvrtc(dtype):
    """NVRTC compiles without a GPU: the source compiles, warning-free, with every kernel in the PTX (and no
    double-precision instruction in the float kernels)."""
    from cupy.cuda import nvrtc

    program = nvrtc.createProgram(cr.routing_source(dtype), "capsbench_routing.cu", [], [])
    nvrtc.compileProgram(program, ["-arch=compute_80"])
    assert nvrtc.getProgramLog(program).strip("\x00 \n") == ""
    ptx = nvrtc.getPTX(program)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert all(name in ptx for name in cr.KERNEL_NAMES)
    assert dtype == "float64" or ".f64" not in ptx


def test_layout_is_checked_not_copied():
    u_hat, _ = random_routing_inputs(np, SHAPES[0], "float64")
    with pytest.raises(ValueError, match="C-contiguous"):
        cr.FusedRouting(NumpyKernels()).forward(np, u_hat.transpose(0, 2, 1, 3), 3, EPS)


def test_on_numpy_the_numpy_routing_stays():
    on_numpy = type("OnNumpy", (cf.CupyFusedCapsNet,), {"array_module": classmethod(lambda cls: np)})
    impl = on_numpy(SMALL, init_parameters(SMALL), "float64", "cpu")
    assert impl.routing_functions is nr.ROUTING[("dynamic", "vectorised", "full")]
    with pytest.raises(ValueError, match="vectorised"):
        on_numpy(SMALL, init_parameters(SMALL), "float64", "cpu", routing_variant="looped")
    # the kernels are dynamic routing's: self-attention is refused, not computed by the NumPy routing instead
    attention = SMALL.replace(routing_algorithm="self-attention")
    with pytest.raises(registry.UnsupportedRoutingAlgorithmError, match="not 'self-attention'"):
        on_numpy(attention, init_parameters(attention), "float64", "cpu")
    assert registry.get("cupy-fused").routing_algorithms() == ["dynamic"]


def test_registered_with_the_reason_it_cannot_run():
    info = registry.get("cupy-fused")
    assert (info.device, info.routing_variant, info.framework) == ("cuda", "vectorised", "cupy")
    if FUSED:
        pytest.skip("CuPy and a CUDA device are present")
    assert FUSED.reason.startswith(("cupy not installed", "no CUDA device", "cupy cannot be imported"))
    assert "cupy-fused" not in registry.available()


# On a GPU --------------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_each_kernel_against_its_numpy_version(shape, dtype):
    import cupy

    u_hat, grad_v = random_routing_inputs(np, shape, dtype)
    batch, n_out, n_in, dim = shape
    rng = np.random.default_rng(1)
    arrays = {"coupling": nr.softmax(np, rng.normal(size=(batch, n_out, n_in)), axis=1).astype(dtype),
              "weights": rng.normal(size=(batch, n_out, n_in)).astype(dtype),
              "v": rng.normal(size=(batch, n_out, dim)).astype(dtype),
              "s": rng.normal(size=(batch, n_out, dim)).astype(dtype),
              "logits": rng.normal(size=(batch, n_out, n_in)).astype(dtype),
              "next": rng.normal(size=(batch, n_out, n_in)).astype(dtype)}
    on_gpu = {key: cupy.asarray(value) for key, value in arrays.items()}
    gpu_u_hat, gpu_grad_v = cupy.asarray(u_hat), cupy.asarray(grad_v)
    calls = {
        "sum_squash": lambda k, a, u, g, out: k.sum_squash(a["coupling"], u, out[0], out[1], EPS),
        "agree_softmax (first)": lambda k, a, u, g, out: k.agree_softmax(u, a["v"], out[2], out[3], False),
        "agree_softmax": lambda k, a, u, g, out: k.agree_softmax(u, a["v"], out[2], out[3], True),
        "sum_squash_backward (last)": lambda k, a, u, g, out: k.sum_squash_backward(None, u, g, a["s"], out[0], EPS),
        "sum_squash_backward": lambda k, a, u, g, out: k.sum_squash_backward(a["weights"], u, None, a["s"], out[0],
                                                                             EPS),
        "softmax_backward (last)": lambda k, a, u, g, out: k.softmax_backward(u, a["s"], a["coupling"], None, out[2]),
        "softmax_backward": lambda k, a, u, g, out: k.softmax_backward(u, a["s"], a["coupling"], a["next"], out[2]),
    }
    for what, call in calls.items():
        expected = [np.zeros((batch, n_out, dim), dtype), np.zeros((batch, n_out, dim), dtype),
                    arrays["logits"].copy(), np.zeros((batch, n_out, n_in), dtype)]
        got = [cupy.asarray(array) for array in expected]
        call(NumpyKernels(), arrays, u_hat, grad_v, expected)
        call(cr.CupyKernels(), on_gpu, gpu_u_hat, gpu_grad_v, got)
        for index, (value, reference) in enumerate(zip(got, expected)):
            assert_close(cupy.asnumpy(value), reference, dtype, what=f"{what}, output {index}")
    stacked = {key: np.stack([arrays[key]] * 3) for key in ("coupling", "s", "next", "v")}
    expected = np.empty_like(u_hat)
    got = cupy.empty_like(gpu_u_hat)
    NumpyKernels().grad_u_hat(stacked["coupling"], stacked["s"], stacked["next"], stacked["v"], expected)
    cr.CupyKernels().grad_u_hat(*(cupy.asarray(stacked[key]) for key in ("coupling", "s", "next", "v")), got)
    assert_close(cupy.asnumpy(got), expected, dtype, what="grad_u_hat")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("iterations", [1, 3, 5])
@pytest.mark.parametrize("shape", SHAPES)
def test_gpu_fused_routing_is_the_vectorised_routing(shape, iterations, dtype):
    import cupy

    u_hat, grad_v = random_routing_inputs(cupy, shape, dtype)
    v, cache = cr.FusedRouting(cr.CupyKernels()).forward(cupy, u_hat, iterations, EPS)
    expected_v, expected_cache = nr.routing_vectorised_forward(cupy, u_hat, iterations, EPS)
    assert_close(cupy.asnumpy(v), cupy.asnumpy(expected_v), dtype)
    grad, _ = cr.FusedRouting(cr.CupyKernels()).backward(cupy, u_hat, cache, grad_v, EPS)
    expected, _ = nr.routing_vectorised_backward(cupy, u_hat, expected_cache, grad_v, EPS)
    assert_close(cupy.asnumpy(grad), cupy.asnumpy(expected), dtype, "gradient")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_gpu_fused_final_gradient_is_the_numpy_final_backward(iterations, dtype):
    import cupy

    u_hat, grad_v = random_routing_inputs(cupy, SHAPES[0], dtype)
    routing = cr.ROUTING[("dynamic", "vectorised", "final")]  # the table's entry: the kernels on the GPU
    _, cache = routing.forward(cupy, u_hat, iterations, EPS)
    _, expected_cache = nr.routing_vectorised_forward(cupy, u_hat, iterations, EPS)
    grad, _ = routing.backward(cupy, u_hat, cache, grad_v, EPS)
    expected, _ = nr.routing_vectorised_final_backward(cupy, u_hat, expected_cache, grad_v, EPS)
    assert_close(cupy.asnumpy(grad), cupy.asnumpy(expected), dtype, "gradient")


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_on_a_gpu_the_routing_runs_the_fused_kernels(dtype):
    """What runs is the CUDA kernels (parity on a GPU is tests/test_contract.py's, over every available
    implementation)."""
    impl = registry.create("cupy-fused", SMALL, init_parameters(SMALL, dtype=dtype), dtype)
    assert isinstance(impl.routing_functions.forward.__self__.kernels, cr.CupyKernels)
