"""The spectral convolution (implementations/torch/_spectral.py): its transforms against torch.fft, its
three products against torch.nn.functional.conv2d and autograd, in float64 and in float32.  Its place in
torch-fused's plan (gradcheck through Convolution, the choice rule) is in test_torch_fused.py."""

import numpy as np
import pytest
import torch

from implementations.torch import _spectral as spectral
from implementations.torch import fused as tf


@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_one_frequency_of_every_conjugate_pair(n):
    classes = spectral.conjugate_classes(n)
    covered = [(u, v) for u, v, _ in classes] + [((-u) % n, (-v) % n) for u, v, size in classes if size == 2]
    assert sorted(covered) == sorted((u, v) for u in range(n) for v in range(n))  # each frequency once
    assert sum(size == 1 for *_, size in classes) == (4 if n % 2 == 0 else 1)


def test_the_transform_is_the_dft_at_the_kept_frequencies_and_the_inverse_undoes_it(rng):
    n = 6
    signal = rng.normal(size=(n, n))
    expected = np.fft.fft2(signal)
    spectrum = spectral.transform_matrix(n, n).numpy() @ signal.reshape(-1)
    for k, (u, v, _) in enumerate(spectral.conjugate_classes(n)):
        assert spectrum[2 * k] == pytest.approx(expected[u, v].real, abs=1e-12)
        assert spectrum[2 * k + 1] == pytest.approx(expected[u, v].imag, abs=1e-12)
    by_part = spectrum.reshape(-1, 2).T.reshape(-1)  # the inverse's columns are (part, frequency)
    np.testing.assert_allclose(spectral.inverse_matrix(n, n).numpy() @ by_part, signal.reshape(-1), atol=1e-12)
    corner = signal.copy()
    corner[3:, :] = corner[:, 3:] = 0  # a signal zero outside p, q < 3: the taps' transform
    np.testing.assert_allclose(spectral.transform_matrix(n, 3).numpy() @ corner[:3, :3].reshape(-1),
                               spectral.transform_matrix(n, n).numpy() @ corner.reshape(-1), atol=1e-12)


def products(x, weight, bias, kernel, stride, grad_rows, kept_from_forward=True):
    workspace = tf.Workspace(x.dtype, "cpu")
    out, kept = spectral.forward(x, weight, bias, kernel, stride, workspace, "c")
    kept = kept if kept_from_forward else {}
    grad_weight = spectral.weight_gradient(grad_rows, x, kept, weight, kernel, stride, workspace, "c")
    grad_x = spectral.input_gradient(grad_rows, x, kept, weight, kernel, stride, workspace, "c")
    return out.clone(), grad_weight, grad_x


def reference(x, weight, bias, stride, grad_rows):
    xx = x.permute(0, 3, 1, 2).double().clone().requires_grad_(True)
    ww = weight.double().clone().requires_grad_(True)
    out = torch.nn.functional.conv2d(xx, ww, bias.double(), stride=stride)
    out.backward(grad_rows.double().view(out.shape[0], out.shape[2], out.shape[3], -1).permute(0, 3, 1, 2))
    return out.detach().permute(0, 2, 3, 1).reshape(grad_rows.shape), ww.grad, xx.grad.permute(0, 2, 3, 1)


@pytest.mark.parametrize("size,kernel,stride", [(20, 9, 2), (7, 3, 2), (12, 5, 3), (9, 4, 1)])
@pytest.mark.parametrize("kept_from_forward", [True, False])
def test_the_three_products_are_conv2d_and_its_autograd_in_float64(rng, size, kernel, stride, kept_from_forward):
    batch, channels, out_channels = 2, 3, 4
    x = torch.tensor(rng.normal(size=(batch, size, size, channels)))
    weight = torch.tensor(rng.normal(size=(out_channels, channels, kernel, kernel)))
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.tensor(rng.normal(size=out_channels))
    outputs = (size - kernel) // stride + 1
    grad_rows = torch.tensor(rng.normal(size=(batch * outputs * outputs, out_channels)))
    got = products(x, weight, bias, kernel, stride, grad_rows, kept_from_forward)
    for value, expected in zip(got, reference(x, weight, bias, stride, grad_rows)):
        np.testing.assert_allclose(value.numpy(), expected.numpy(), rtol=1e-11, atol=1e-11)
    assert got[1].stride() == weight.stride()  # the gradient in the weight's channels-last layout


def test_float32_products_agree_with_float64_to_float32_rounding(rng):
    """PrimaryCaps' kernel and stride on a 20 x 20 input: errors of a few float32 units, relative to the
    largest value (the transforms are orthogonal up to scale, so nothing is amplified)."""
    batch, channels, out_channels, size, kernel, stride = 2, 16, 8, 20, 9, 2
    x = torch.tensor(rng.normal(size=(batch, size, size, channels)), dtype=torch.float32)
    weight = torch.tensor(rng.normal(size=(out_channels, channels, kernel, kernel)) * 0.05, dtype=torch.float32)
    bias = torch.tensor(rng.normal(size=out_channels), dtype=torch.float32)
    grad_rows = torch.tensor(rng.normal(size=(batch * 36, out_channels)), dtype=torch.float32)
    for value, expected in zip(products(x, weight, bias, kernel, stride, grad_rows),
                               reference(x, weight, bias, stride, grad_rows)):
        error = (value.double() - expected).abs().max() / expected.abs().max()
        assert 0 < error < 2e-6


def test_non_square_images_are_refused():
    with pytest.raises(ValueError, match="square images"):
        spectral.grid_of(torch.zeros(1, 6, 8, 2), 3, 1)
