"""The hand-written backward of the NumPy/CuPy CapsNet, layer by layer: every layer against finite
differences (float64), the convolutions and the input gradient against torch.  The whole model is held to
the contract in test_contract.py."""

import contextlib
import tracemalloc

import numpy as np
import pytest
import torch

from harness import ranges, registry
from harness.contract import UnsupportedRoutingAlgorithmError, UnsupportedRoutingGradientError
from harness.data import synthetic_batch
from harness.params import init_parameters
from harness.routing_algorithms import DIGIT_BIAS
from harness.spec import SMALL
from implementations.numpy import capsnet as ac
from implementations.numpy import routing as nr

from gradcheck_util import livelier_parameters

EPS = 1e-8
STEP = 1e-6


def numeric_gradient(function, x, step=STEP):
    """Central differences of the scalar ``function`` at every entry of ``x``."""
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + step
        up = function(x)
        x[index] = saved - step
        down = function(x)
        x[index] = saved
        grad[index] = (up - down) / (2 * step)
    return grad


def assert_gradient(analytic, numeric, rtol=1e-6):
    scale = np.max(np.abs(numeric))
    assert scale > 0
    assert np.max(np.abs(analytic - numeric)) <= rtol * scale, np.max(np.abs(analytic - numeric)) / scale


@pytest.mark.parametrize("dim", [8, 16])
def test_squash_backward_is_the_full_vector_jacobian(rng, dim):
    s = rng.normal(size=(5, dim))
    s[0] *= 1e-3  # near zero
    s[1] *= 30  # long
    g = rng.normal(size=s.shape)
    numeric = numeric_gradient(lambda x: np.sum(g * nr.squash_forward(np, x, EPS)), s)
    assert_gradient(nr.squash_backward(np, s, g, EPS), numeric)
    # the diagonal-only (scalar) version, the bug of a public implementation, fails this check
    diagonal_only = nr.squash_forward(np, s, EPS) / np.where(s == 0, 1, s) * g
    assert np.max(np.abs(diagonal_only - numeric)) > 0.1 * np.max(np.abs(numeric))


def test_squash_gradient_at_zero_is_zero():
    """squash(s) = |s|^2/(1+|s|^2) s/sqrt(|s|^2+eps) is O(|s|^3) at 0: its Jacobian there is exactly 0."""
    grad = nr.squash_backward(np, np.zeros((1, 8)), np.ones((1, 8)), EPS)
    np.testing.assert_array_equal(grad, np.zeros((1, 8)))


def test_softmax_backward(rng):
    logits = rng.normal(size=(3, 4, 5))
    g = rng.normal(size=logits.shape)
    numeric = numeric_gradient(lambda x: np.sum(g * nr.softmax(np, x, axis=1)), logits)
    assert_gradient(nr.softmax_backward(nr.softmax(np, logits, axis=1), g, axis=1), numeric)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (2, 2)])
def test_convolution_matches_torch_and_its_backward_finite_differences(rng, kernel, stride):
    x = rng.normal(size=(2, 7, 7, 3))  # NHWC
    weight = rng.normal(size=(4, 3, kernel, kernel))  # canonical (O, C, kh, kw)
    bias = rng.normal(size=4)
    matrix = weight.transpose(0, 2, 3, 1).reshape(4, -1)
    out, cols = ac.conv_forward(np, x, matrix, bias, kernel, stride)
    expected = torch.nn.functional.conv2d(
        torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(weight), torch.tensor(bias), stride=stride
    ).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    g = rng.normal(size=out.shape)
    grad_w, grad_b, grad_x = ac.conv_backward(np, g, cols, matrix, x.shape, kernel, stride)
    loss = lambda xx=x, ww=matrix, bb=bias: np.sum(g * ac.conv_forward(np, xx, ww, bb, kernel, stride)[0])
    assert_gradient(grad_x, numeric_gradient(lambda xx: loss(xx=xx), x.copy()))
    assert_gradient(grad_w, numeric_gradient(lambda ww: loss(ww=ww), matrix.copy()))
    assert_gradient(grad_b, numeric_gradient(lambda bb: loss(bb=bb), bias.copy()))


def test_input_gradient_is_the_adjoint_of_im2col(rng):
    """<im2col(x) W^T, g> = <x, d/dx>: the input gradient is im2col's adjoint applied to g W."""
    x = rng.normal(size=(2, 9, 9, 3))
    weight = rng.normal(size=(4, 3 * 3 * 3))
    grad_rows = rng.normal(size=(2 * 4 * 4, 4))
    forward = np.sum((ac.im2col(np, x, 3, 2) @ weight.T) * grad_rows)
    adjoint = np.sum(x * ac.conv_input_gradient(np, grad_rows, weight, x.shape, 3, 2))
    assert forward == pytest.approx(adjoint, rel=1e-12)


def test_input_gradient_into_kept_buffers(rng):
    """The buffers are reset on every call: the second call into the same ones gives the same gradient."""
    x_shape = (2, 9, 9, 3)
    weight = rng.normal(size=(4, 3 * 3 * 3))
    grad_rows = rng.normal(size=(2 * 4 * 4, 4))
    expected = ac.conv_input_gradient(np, grad_rows, weight, x_shape, 3, 2)
    out, product = np.full(x_shape, np.nan), np.full((2 * 4 * 4, 3), np.nan)
    for _ in range(2):
        got = ac.conv_input_gradient(np, grad_rows, weight, x_shape, 3, 2, out=out, product=product)
        assert got is out
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)


def test_prediction_vectors_forward_and_backward(rng):
    u = rng.normal(size=(2, 5, 4))
    weight = rng.normal(size=(5, 4, 3 * 6))  # (N, K, J*D)
    u_hat = ac.prediction_vectors_forward(np, u, weight, n_out=3)
    expected = np.einsum("nkjd,bnk->bjnd", weight.reshape(5, 4, 3, 6), u)
    np.testing.assert_allclose(u_hat, expected, rtol=1e-12)
    g = rng.normal(size=u_hat.shape)
    grad_u, grad_w = ac.prediction_vectors_backward(np, u, weight, g)
    loss = lambda uu=u, ww=weight: np.sum(g * ac.prediction_vectors_forward(np, uu, ww, n_out=3))
    assert_gradient(grad_u, numeric_gradient(lambda uu: loss(uu=uu), u.copy()))
    assert_gradient(grad_w, numeric_gradient(lambda ww: loss(ww=ww), weight.copy()))


@pytest.mark.parametrize("variant", ["vectorised", "looped"])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_routing_backward_through_every_iteration(rng, variant, iterations):
    forward, backward = nr.ROUTING[("dynamic", variant, "full")]
    u_hat = rng.normal(scale=0.7, size=(2, 3, 6, 4))  # (B, J, N, D)
    g = rng.normal(size=(2, 3, 4))
    v, cache = forward(np, u_hat, iterations, EPS, {})
    numeric = numeric_gradient(lambda x: np.sum(g * forward(np, x, iterations, EPS, {})[0]), u_hat.copy())
    grad, param_grads = backward(np, u_hat, cache, g, EPS)
    assert_gradient(grad, numeric)
    assert param_grads == {}  # dynamic routing has no parameters


def test_routing_backward_writes_the_gradient_regrouped_by_input_capsule(rng):
    """With ``out`` a (B, J, N, D) view of an (N, B, J, D) buffer, the routing's backward writes the gradient
    there, and the prediction vectors' backward reads it without copying: same gradients as without."""
    u_hat = rng.normal(scale=0.7, size=(2, 3, 6, 4))  # (B, J, N, D)
    grad_v = rng.normal(size=(2, 3, 4))
    u, weight = rng.normal(size=(2, 6, 5)), rng.normal(size=(6, 5, 3 * 4))  # (B, N, K), (N, K, J*D)
    _, cache = nr.routing_vectorised_forward(np, u_hat, 3, EPS)
    expected, _ = nr.routing_vectorised_backward(np, u_hat, cache, grad_v, EPS)
    by_input = np.full((6, 2, 3, 4), np.nan)
    got, _ = nr.routing_vectorised_backward(np, u_hat, cache, grad_v, EPS, out=by_input.transpose(1, 2, 0, 3))
    assert got.base is by_input
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-15)
    for mine, theirs in zip(ac.prediction_vectors_backward(np, u, weight, got, by_input=by_input),
                            ac.prediction_vectors_backward(np, u, weight, expected)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-13, atol=1e-15)


def test_routing_variants_agree_with_torch(rng):
    from implementations.torch.routing import routing_vectorised

    u_hat = rng.normal(size=(2, 3, 6, 4))  # (B, J, N, D)
    expected = routing_vectorised(torch.tensor(u_hat.transpose(0, 2, 1, 3)), 3, EPS).numpy()
    for variant in ("vectorised", "looped"):
        forward = nr.ROUTING[("dynamic", variant, "full")].forward
        np.testing.assert_allclose(forward(np, u_hat, 3, EPS, {})[0], expected, rtol=1e-12)


def test_lengths_backward_is_zero_at_a_zero_capsule(rng):
    v = rng.normal(size=(2, 3, 4))
    v[0, 1] = 0.0
    lengths = ac.lengths_forward(np, v)
    g = rng.normal(size=lengths.shape)
    grad = ac.lengths_backward(np, v, lengths, g)
    assert np.all(grad[0, 1] == 0.0)
    keep = v.copy()
    numeric = numeric_gradient(lambda x: np.sum(g * ac.lengths_forward(np, x)), keep)
    mask = np.ones_like(v, dtype=bool)
    mask[0, 1] = False
    np.testing.assert_allclose(grad[mask], numeric[mask], rtol=1e-6, atol=1e-9)


def test_losses_backward(rng):
    lengths = rng.uniform(0.0, 1.0, size=(4, 10))
    target = ac.one_hot(np, np.array([1, 5, 9, 0]), 10, np.float64)
    numeric = numeric_gradient(lambda x: ac.margin_loss_forward(np, x, target, SMALL), lengths.copy())
    assert_gradient(ac.margin_loss_backward(np, lengths, target, SMALL), numeric)
    recon, pixels = rng.uniform(size=(4, 9)), rng.uniform(size=(4, 9))
    numeric = numeric_gradient(lambda x: ac.reconstruction_loss_forward(x, pixels, SMALL), recon.copy())
    assert_gradient(ac.reconstruction_loss_backward(recon, pixels, SMALL), numeric)


def test_decoder_backward(rng):
    layers = [(rng.normal(size=(6, 5)), rng.normal(size=6)), (rng.normal(size=(3, 6)), rng.normal(size=3))]
    x = rng.normal(size=(4, 5))
    g = rng.normal(size=(4, 3))
    outputs = ac.decoder_forward(np, layers, x)
    grads, grad_x = ac.decoder_backward(layers, outputs, g)
    loss = lambda xx: np.sum(g * ac.decoder_forward(np, layers, xx)[-1])
    assert_gradient(grad_x, numeric_gradient(loss, x.copy()))
    weight = layers[0][0]
    numeric = numeric_gradient(lambda w: np.sum(g * ac.decoder_forward(np, [(w, layers[0][1]), layers[1]], x)[-1]),
                               weight.copy())
    assert_gradient(grads[0][0], numeric)


def test_input_gradient_against_finite_differences():
    config = SMALL.replace(reconstruction_weight=0.5)
    params = livelier_parameters(config)
    images, labels = synthetic_batch(config, 2, seed=5)
    images = images.astype(np.float64)
    impl = registry.create("numpy-vectorised", config, params, "float64")
    impl.forward_loss(impl.to_device(images, labels))
    impl.backward(with_input=True)
    analytic = impl.input_gradient
    rng = np.random.default_rng(0)
    for _ in range(6):
        index = (int(rng.integers(2)), 0, int(rng.integers(28)), int(rng.integers(28)))
        shifted = images.copy()
        values = []
        for sign in (1, -1):
            shifted[index] = images[index] + sign * 1e-5
            fresh = registry.create("numpy-vectorised", config, params, "float64")
            values.append(float(fresh.forward_loss(fresh.to_device(shifted, labels))))
        numeric = (values[0] - values[1]) / 2e-5
        assert abs(numeric - analytic[index]) <= 1e-6 * np.max(np.abs(analytic)), (index, numeric, analytic[index])
    # and every entry against torch autograd (the images are also the reconstruction target)
    reference = registry.create("torch-vectorised", config, params, "float64")
    batch = reference.to_device(images, labels)
    batch.images.requires_grad_(True)
    reference.forward_loss(batch)
    reference.backward()
    np.testing.assert_allclose(analytic, batch.images.grad.numpy(), rtol=0, atol=1e-12 * np.max(np.abs(analytic)))


def test_adam_update_chunk_by_chunk_is_the_whole_tensor_update(monkeypatch):
    params = livelier_parameters(SMALL)
    batches = [synthetic_batch(SMALL, 2, seed=seed) for seed in range(2)]
    results = []
    for chunk in (max(value.size for value in params.values()), 1000):  # every tensor whole; most in pieces
        monkeypatch.setattr(ac, "ADAM_CHUNK", chunk)
        impl = registry.create("numpy-vectorised", SMALL, params, "float64")
        for images, labels in batches:
            impl.train_step(impl.to_device(images, labels))
        results.append(impl.parameters())
    for name, value in results[0].items():
        np.testing.assert_array_equal(results[1][name], value, err_msg=name)


def test_backward_releases_the_previous_gradients_before_building_new_ones():
    """A second backward() holds one gradient set at its peak (torch frees the old ones with set_to_none):
    its growth over what was held before it is the first one's peak less a gradient set."""
    impl = registry.create("numpy-vectorised", SMALL, livelier_parameters(SMALL), "float64")
    impl.forward_loss(impl.to_device(*synthetic_batch(SMALL, 2)))
    gradient_bytes = sum(value.nbytes for value in impl.params.values())
    tracemalloc.start()
    try:
        impl.backward()
        held, first_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        impl.backward()
        second_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert second_peak - held < first_peak - gradient_bytes / 2, (first_peak, second_peak - held, gradient_bytes)


# Self-attention routing (harness.spec) ------------------------------------------------------------------

SELF_ATTENTION = SMALL.replace(routing_algorithm="self-attention")


def test_attention_squash_matches_torch_and_its_backward_finite_differences(rng):
    from implementations.torch.routing import attention_squash

    s = rng.normal(size=(5, 6))
    s[0] *= 1e-3  # near zero
    s[1] *= 30  # long
    np.testing.assert_allclose(nr.attention_squash_forward(np, s, EPS), attention_squash(torch.tensor(s), EPS).numpy(),
                               rtol=1e-13)
    g = rng.normal(size=s.shape)
    numeric = numeric_gradient(lambda x: np.sum(g * nr.attention_squash_forward(np, x, EPS)), s.copy())
    assert_gradient(nr.attention_squash_backward(np, s, g, EPS), numeric)


def self_attention_by_torch(u_hat, bias, grad_v):
    """v, d loss / d u_hat and d loss / d b of torch-vectorised's self-attention routing (float64 autograd),
    for u_hat (B, J, N, D) in NumPy's layout."""
    from implementations.torch.routing import self_attention_vectorised

    x = torch.tensor(u_hat.transpose(0, 2, 1, 3), requires_grad=True)  # the reference's (B, N, J, D)
    b = torch.tensor(bias, requires_grad=True)
    v = self_attention_vectorised(x, b, EPS)
    grad_x, grad_b = torch.autograd.grad(v, (x, b), torch.tensor(grad_v))
    return v.detach().numpy(), grad_x.numpy().transpose(0, 2, 1, 3), grad_b.numpy()


def self_attention_inputs(rng, shape=(3, 4, 7, 5)):
    """u_hat (B, J, N, D) of order one, a bias b (J, N) far from zero (a zero bias hides its gradient's
    mistakes in the couplings) and a gradient for v."""
    batch, n_out, n_in, dim = shape
    return rng.normal(size=shape), rng.normal(scale=0.5, size=(n_out, n_in)), rng.normal(size=(batch, n_out, dim))


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 2 * 4 * 7 * 5 * 8, 1])  # one slice; 2 examples then 1; 1 by 1
def test_self_attention_vectorised_against_torch_autograd(rng, monkeypatch, chunk_bytes):
    monkeypatch.setattr(nr, "ATTENTION_CHUNK_BYTES", chunk_bytes)
    u_hat, bias, grad_v = self_attention_inputs(rng)
    expected_v, expected_grad, expected_bias_grad = self_attention_by_torch(u_hat, bias, grad_v)
    forward, backward = nr.ROUTING[("self-attention", "vectorised", "full")]
    v, cache = forward(np, u_hat, 3, EPS, {DIGIT_BIAS: bias})
    np.testing.assert_allclose(v, expected_v, rtol=1e-12, atol=1e-14)
    grad, param_grads = backward(np, u_hat, cache, grad_v, EPS)
    assert set(param_grads) == {DIGIT_BIAS}
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(param_grads[DIGIT_BIAS], expected_bias_grad, rtol=1e-11, atol=1e-13)
    # into a (B, J, N, D) view of an (N, B, J, D) buffer, as the training backward asks
    by_input = np.full((7, 3, 4, 5), np.nan)
    got, _ = backward(np, u_hat, cache, grad_v, EPS, out=by_input.transpose(1, 2, 0, 3))
    assert got.base is by_input
    np.testing.assert_allclose(got, expected_grad, rtol=1e-11, atol=1e-13)


def test_self_attention_looped_against_torch_autograd(rng):
    u_hat, bias, grad_v = self_attention_inputs(rng)
    expected_v, expected_grad, expected_bias_grad = self_attention_by_torch(u_hat, bias, grad_v)
    forward, backward = nr.ROUTING[("self-attention", "looped", "full")]
    v, cache = forward(np, u_hat, 3, EPS, {DIGIT_BIAS: bias})
    np.testing.assert_allclose(v, expected_v, rtol=1e-12, atol=1e-14)
    grad, param_grads = backward(np, u_hat, cache, grad_v, EPS)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(param_grads[DIGIT_BIAS], expected_bias_grad, rtol=1e-11, atol=1e-13)


def test_self_attention_gradient_against_finite_differences(rng):
    """Independent of torch: the vectorised backward's u_hat and bias gradients by central differences."""
    u_hat, bias, grad_v = self_attention_inputs(rng, shape=(2, 3, 4, 3))
    forward, backward = nr.ROUTING[("self-attention", "vectorised", "full")]
    _, cache = forward(np, u_hat, 1, EPS, {DIGIT_BIAS: bias})
    grad, param_grads = backward(np, u_hat, cache, grad_v, EPS)
    loss = lambda x, b: np.sum(grad_v * forward(np, x, 1, EPS, {DIGIT_BIAS: b})[0])
    assert_gradient(grad, numeric_gradient(lambda x: loss(x, bias), u_hat.copy()))
    assert_gradient(param_grads[DIGIT_BIAS], numeric_gradient(lambda b: loss(u_hat, b), bias.copy()))


def test_example_chunks_cover_the_batch_in_order(monkeypatch):
    u_hat = np.zeros((5, 2, 3, 4))  # 192 bytes per example
    monkeypatch.setattr(nr, "ATTENTION_CHUNK_BYTES", 2 * 192 + 100)
    assert nr.example_chunks(np, u_hat) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    monkeypatch.setattr(nr, "ATTENTION_CHUNK_BYTES", 1)
    assert nr.example_chunks(np, u_hat) == [slice(b, b + 1) for b in range(5)]
    monkeypatch.setattr(nr, "ATTENTION_CHUNK_BYTES", 1 << 20)
    assert nr.example_chunks(np, u_hat) == [slice(0, 5)]
    assert nr.example_chunks(object(), u_hat) == [slice(0, 5)]  # another array module: the whole batch


def self_attention_parameters(seed: int = 0) -> dict:
    """SMALL's livelier float64 parameters under self-attention, with a bias far from zero."""
    params = livelier_parameters(SELF_ATTENTION, seed)
    params[DIGIT_BIAS] = np.random.default_rng(seed).normal(scale=0.3, size=params[DIGIT_BIAS].shape)
    return params


def network_gradients(name: str, params: dict, images, labels):
    impl = registry.create(name, SELF_ATTENTION, params, "float64")
    loss = float(impl.forward_loss(impl.to_device(images, labels)))
    impl.backward()
    return loss, impl.gradients()


def test_self_attention_network_gradients_match_torch_and_agree():
    """numpy-vectorised and numpy-looped at SMALL with self-attention: loss and every parameter's gradient
    (digit.bias included) against torch-vectorised float64, and against each other."""
    params = self_attention_parameters()
    images, labels = synthetic_batch(SELF_ATTENTION, 3, seed=2)
    expected_loss, expected = network_gradients("torch-vectorised", params, images, labels)
    got = {}
    for name in ("numpy-vectorised", "numpy-looped"):
        loss, got[name] = network_gradients(name, params, images, labels)
        assert loss == pytest.approx(expected_loss, rel=1e-12)
        assert list(got[name]) == list(expected)  # digit.bias last, as in harness.params
        for parameter, reference in expected.items():
            scale = np.max(np.abs(reference))
            assert scale > 0, parameter
            np.testing.assert_allclose(got[name][parameter], reference, rtol=0, atol=1e-10 * scale,
                                       err_msg=f"{name} {parameter}")
    for parameter, value in got["numpy-vectorised"].items():
        np.testing.assert_allclose(got["numpy-looped"][parameter], value, rtol=0,
                                   atol=1e-12 * np.max(np.abs(value)), err_msg=parameter)


@pytest.mark.parametrize("name", ["numpy-vectorised", "numpy-looped"])
def test_self_attention_adam_moves_the_bias_as_torch_does(name):
    """Two training steps: every parameter, digit.bias included, and Adam's moments of digit.bias as torch's."""
    params = self_attention_parameters(1)
    impls = [registry.create(impl, SELF_ATTENTION, params, "float64") for impl in ("torch-vectorised", name)]
    for seed in range(2):
        images, labels = synthetic_batch(SELF_ATTENTION, 2, seed=seed)
        for impl in impls:
            impl.train_step(impl.to_device(images, labels))
    reference, impl = impls
    after = impl.parameters()
    assert np.max(np.abs(after[DIGIT_BIAS] - params[DIGIT_BIAS])) > 1e-4  # it moved
    for parameter, value in reference.parameters().items():
        np.testing.assert_allclose(after[parameter], value, rtol=1e-9, atol=1e-12, err_msg=parameter)
    state, expected_state = impl.adam_state(), reference.adam_state()
    for key in (f"first/{DIGIT_BIAS}", f"second/{DIGIT_BIAS}"):
        np.testing.assert_allclose(state[key], expected_state[key], rtol=1e-9, atol=1e-15, err_msg=key)
    fresh = registry.create(name, SELF_ATTENTION, impl.parameters(), "float64")
    fresh.load_adam_state(state)
    for key, value in fresh.adam_state().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


@pytest.mark.parametrize("name", ["numpy-vectorised", "numpy-looped"])
def test_self_attention_routing_alone_is_torchs(name, rng):
    """routing_forward and routing_backward (the routing alone, u_hat in NumPy's (B, J, N, D)) against
    torch-vectorised's, which reads u_hat (B, N, J, D); both with the network's digit.bias."""
    params = self_attention_parameters()
    impl = registry.create(name, SELF_ATTENTION, params, "float64")
    reference = registry.create("torch-vectorised", SELF_ATTENTION, params, "float64")
    shape = (2, SELF_ATTENTION.num_classes, SELF_ATTENTION.num_primary_caps, SELF_ATTENTION.digit_caps_dim)
    u_hat, grad_v = rng.normal(size=shape), rng.normal(size=(2, shape[1], shape[3]))
    canonical = reference.from_numpy(u_hat.transpose(0, 2, 1, 3).copy())
    np.testing.assert_allclose(impl.routing_forward(u_hat), reference.routing_forward(canonical).numpy(),
                               rtol=1e-12, atol=1e-14)
    expected = reference.routing_backward(canonical, reference.from_numpy(grad_v)).numpy().transpose(0, 2, 1, 3)
    np.testing.assert_allclose(impl.routing_backward(u_hat, grad_v), expected, rtol=1e-11, atol=1e-13)


class RangeLog:
    def __init__(self):
        self.opened = []

    def range(self, layer, phase):
        self.opened.append((phase, layer))
        return contextlib.nullcontext()


@pytest.mark.parametrize("name", ["numpy-vectorised", "numpy-looped"])
def test_self_attention_opens_its_two_ranges_in_each_phase(name):
    impl = registry.create(name, SELF_ATTENTION, self_attention_parameters(), "float32")
    with ranges.recording(RangeLog()) as log:
        impl.forward_loss(impl.to_device(*synthetic_batch(SELF_ATTENTION, 2)))
        impl.backward()
    routing = {(phase, layer) for phase, layer in log.opened if "attention" in layer or "routing" in layer}
    assert routing == {(phase, layer) for phase in ("forward", "backward") for layer in ("attention", "attention_sum")}


# A subclass's own routing functions compute dynamic routing under the full gradient unless it says more


def test_a_subclass_with_class_level_routing_functions_claims_dynamic_and_full_alone():
    class OwnRouting(ac.NumpyCapsNet):
        routing_functions = nr.ROUTING[("dynamic", "vectorised", "full")]

    class Declares(ac.NumpyCapsNet):
        routing_functions = nr.ROUTING[("dynamic", "vectorised", "full")]
        routing_algorithms = ("dynamic", "self-attention")

    assert (OwnRouting.routing_algorithms, OwnRouting.routing_gradients) == (("dynamic",), ("full",))
    assert Declares.routing_algorithms == ("dynamic", "self-attention")
    with pytest.raises(UnsupportedRoutingAlgorithmError, match="not 'self-attention'"):
        OwnRouting(SELF_ATTENTION, init_parameters(SELF_ATTENTION))
    impl = OwnRouting(SMALL, init_parameters(SMALL))
    assert impl.routing_functions is nr.ROUTING[("dynamic", "vectorised", "full")]  # its own, not the table's
    with registry.registered("own-routing", OwnRouting) as info:
        assert info.routing_algorithms() == ["dynamic"] and not info.supports("final")


def test_a_subclass_setting_routing_functions_on_the_instance_is_held_to_dynamic_and_full():
    own = nr.RoutingFunctions(lambda *args: nr.routing_vectorised_forward(*args),
                              lambda *args, **kwargs: nr.routing_vectorised_backward(*args, **kwargs))

    class SetsItsOwn(ac.NumpyCapsNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.routing_functions = own

    class DeclaresBoth(SetsItsOwn):
        routing_algorithms = ("dynamic", "self-attention")

    assert SetsItsOwn(SMALL, init_parameters(SMALL)).routing_functions is own
    with pytest.raises(UnsupportedRoutingAlgorithmError, match="its own.*not 'self-attention'"):
        SetsItsOwn(SELF_ATTENTION, init_parameters(SELF_ATTENTION))
    final = SMALL.replace(routing_gradient="final")
    with pytest.raises(UnsupportedRoutingGradientError, match="its own.*not 'final'"):
        SetsItsOwn(final, init_parameters(final))
    assert DeclaresBoth(SELF_ATTENTION, init_parameters(SELF_ATTENTION)).routing_functions is own
    # the built-in routing set again is no routing of its own
    class SetsTheTable(ac.NumpyCapsNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.routing_functions = nr.ROUTING[("self-attention", "vectorised", "full")]

    assert SetsTheTable(SELF_ATTENTION, init_parameters(SELF_ATTENTION)).routing_functions is nr.ROUTING[
        ("self-attention", "vectorised", "full")]
