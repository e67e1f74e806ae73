"""The hand-written backward of the NumPy/CuPy CapsNet, layer by layer: every layer against finite
differences (float64), the convolutions and the input gradient against torch.  The whole model is held to
the contract in test_contract.py."""

import tracemalloc

import numpy as np
import pytest
import torch

from harness import registry
from harness.data import synthetic_batch
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
