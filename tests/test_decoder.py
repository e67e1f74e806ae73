"""The canonical NumPy decoder (harness.decoder): torch's linear layers as the independent reference, the
inference mask, and a clear error for capsules of another network."""

import numpy as np
import pytest
import torch

from harness.decoder import decode_capsules, mask_to_classes
from harness.params import init_parameters
from harness.spec import SMALL


def test_decode_is_relu_linear_layers_and_a_sigmoid_as_torch_computes_them(rng):
    params = init_parameters(SMALL, seed=3, dtype=np.float64)
    capsules = rng.normal(size=(4, SMALL.num_classes, SMALL.digit_caps_dim))
    hidden = torch.from_numpy(capsules.reshape(4, -1))
    for layer in range(3):
        hidden = torch.nn.functional.linear(hidden, torch.from_numpy(params[f"decoder.{layer}.weight"]),
                                            torch.from_numpy(params[f"decoder.{layer}.bias"]))
        hidden = torch.relu(hidden) if layer < 2 else torch.sigmoid(hidden)
    decoded = decode_capsules(params, SMALL, capsules)
    assert decoded.shape == (4, SMALL.image_pixels) and decoded.dtype == np.float64
    np.testing.assert_allclose(decoded, hidden.numpy(), rtol=1e-12)


def test_the_mask_keeps_only_the_chosen_class_capsule(rng):
    capsules = rng.normal(size=(2, 3, 4))
    masked = mask_to_classes(capsules, np.array([2, 0]))
    np.testing.assert_array_equal(masked[0], [np.zeros(4), np.zeros(4), capsules[0, 2]])
    np.testing.assert_array_equal(masked[1], [capsules[1, 0], np.zeros(4), np.zeros(4)])


def test_capsules_of_another_network_are_refused():
    params = init_parameters(SMALL)
    with pytest.raises(ValueError, match=r"capsules must be \(batch, 10, 8\)"):
        decode_capsules(params, SMALL, np.zeros((1, 10, 16)))
