"""The CapsNet decoder in NumPy: the one written-down copy of its forward maths.

:mod:`implementations.numpy.capsnet` runs its decoder through :func:`decoder_forward` (over its array
module, NumPy or CuPy), and :meth:`harness.contract.Implementation.decode`, the contract's default way to
decode a given capsule vector, runs it over the canonical parameters, so that the figures of
:mod:`harness.figures` can decode capsules no forward pass produced (the paper's perturbed dimensions)
with the decoder every implementation trained in the canonical layout.
"""

from __future__ import annotations

import numpy as np

from harness.params import DECODER_PREFIX, decoder_layer_count
from harness.spec import CapsNetConfig


def decoder_forward(xp, layers: list, x):
    """Linear layers (weight (out, in), bias (out,)), ReLU between them and a sigmoid at the end; returns
    every layer's output, the input first and the reconstruction last."""
    outputs = [x]
    for index, (weight, bias) in enumerate(layers):
        z = outputs[-1] @ weight.T
        z += bias
        if index < len(layers) - 1:
            outputs.append(xp.maximum(z, 0.0, out=z))
        else:
            outputs.append(1.0 / (1.0 + xp.exp(-z)))
    return outputs


def decoder_layers(params: dict[str, np.ndarray], config: CapsNetConfig) -> list:
    """The decoder's (weight, bias) pairs, first layer first, from a canonical parameter set."""
    return [(params[f"{DECODER_PREFIX}{i}.weight"], params[f"{DECODER_PREFIX}{i}.bias"])
            for i in range(decoder_layer_count(config))]


def mask_to_classes(capsules: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Class capsules (B, J, D) with every capsule but ``classes[b]``'s zeroed: the decoder's input mask."""
    capsules = np.asarray(capsules)
    keep = np.arange(capsules.shape[1])[None, :] == np.asarray(classes)[:, None]
    return capsules * keep[:, :, None]


def decode_capsules(params: dict[str, np.ndarray], config: CapsNetConfig, capsules: np.ndarray) -> np.ndarray:
    """Reconstructions (B, pixels) of already masked class capsules (B, J, D), through the decoder of the
    canonical parameters, in the parameters' dtype."""
    capsules = np.asarray(capsules)
    expected = (config.num_classes, config.digit_caps_dim)
    if capsules.ndim != 3 or capsules.shape[1:] != expected:
        raise ValueError(f"capsules must be (batch, {expected[0]}, {expected[1]}), got {capsules.shape}")
    layers = decoder_layers(params, config)
    inputs = capsules.reshape(len(capsules), -1).astype(layers[0][0].dtype, copy=True)
    return decoder_forward(np, layers, inputs)[-1]
