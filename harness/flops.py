"""Floating-point work of every phase of CapsNet, counted analytically from the config.

Conventions: a multiply-add is 2 FLOPs; every other addition, multiplication, division, exp and sqrt is 1;
comparisons (max, ReLU, argmax) and data movement are 0.  Counts are per image unless a name says per step.

Derivation, forward (per image; numbers for the paper network):

* Conv1: ``2 * H1^2 * C1 * k1^2 * Cin`` multiply-adds plus ``H1^2 * C1`` bias adds = 16.69 M.
* PrimaryCaps: ``2 * H2^2 * P * k2^2 * C1`` plus ``H2^2 * P`` bias adds = 382.21 M, 94 % of the forward.
* squash of a capsule of dimension d: d multiplies and d - 1 adds for |s|^2, 5 for the factor
  |s|^2 / ((1 + |s|^2) sqrt(|s|^2 + eps)) (2 adds, 1 multiply, 1 sqrt, 1 divide), d multiplies: 3d + 4.
* u_hat: ``2 * N * J * D * K`` = 2.95 M.
* routing, per iteration: softmax over J for each input capsule (J exp, J - 1 adds, J divides; the max
  subtraction J more), the weighted sum s (``2 * N * J * D``), squash of J capsules; and, for every
  iteration but the last, the agreement ``2 * N * J * D`` and its addition to b (N * J): 2.00 M for r = 3.
* lengths (2D per capsule), mask (J * D), decoder (``2 * in * out`` plus ``out`` per layer, 4 per sigmoid
  output), losses (about 8 per class and 3 per pixel): 2.83 M.

Backward: a layer ``y = f(x, w)`` that is linear in each operand costs one product of the forward's size
per operand that needs a gradient.  Conv1 needs only its weight gradient (1x), PrimaryCaps, u_hat, the
decoder and the routing products need both (2x); bias gradients are one add per output element;
elementwise layers (squash, softmax, sigmoid, lengths, losses) cost about twice their forward.  Training
adds Adam, 12 FLOPs per parameter per step (moments 7, update 5).  For the paper network this gives
406.7 M forward and 1.20 G per training step per image.
"""

from __future__ import annotations

from harness.params import count_parameters
from harness.spec import CapsNetConfig

ADAM_FLOPS_PER_PARAMETER = 12


def squash_flops(capsules: int, dim: int) -> int:
    return capsules * (3 * dim + 4)


def softmax_flops(rows: int, width: int) -> int:
    return rows * (4 * width - 1)


def routing_forward_flops(config: CapsNetConfig) -> int:
    n_in, n_out, dim = config.num_primary_caps, config.num_classes, config.digit_caps_dim
    per_iteration = softmax_flops(n_in, n_out) + 2 * n_in * n_out * dim + squash_flops(n_out, dim)
    agreement = 2 * n_in * n_out * dim + n_in * n_out
    return config.routing_iterations * per_iteration + (config.routing_iterations - 1) * agreement


def routing_backward_flops(config: CapsNetConfig) -> int:
    """The products of every iteration twice (one per operand), the elementwise parts twice."""
    n_in, n_out, dim = config.num_primary_caps, config.num_classes, config.digit_caps_dim
    products = (2 * config.routing_iterations - 1) * 2 * n_in * n_out * dim
    elementwise = config.routing_iterations * (softmax_flops(n_in, n_out) + squash_flops(n_out, dim))
    return 2 * products + 2 * elementwise + (config.routing_iterations - 1) * n_in * n_out


def forward_flops(config: CapsNetConfig) -> dict[str, int]:
    """FLOPs of each layer of the training forward pass, per image."""
    c = config
    conv1_out = c.conv1_size**2 * c.conv1_channels
    primary_out = c.primary_size**2 * c.primary_conv_channels
    sizes = c.decoder_sizes
    decoder = sum(2 * fan_in * fan_out + fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))
    decoder += 4 * c.image_pixels  # sigmoid: exp, add, divide, negate
    return {
        "conv1": 2 * conv1_out * c.conv1_kernel**2 * c.image_channels + conv1_out,
        "primary_caps": 2 * primary_out * c.primary_kernel**2 * c.conv1_channels + primary_out,
        "primary_squash": squash_flops(c.num_primary_caps, c.primary_caps_dim),
        "u_hat": 2 * c.num_primary_caps * c.num_classes * c.digit_caps_dim * c.primary_caps_dim,
        "routing": routing_forward_flops(c),
        "lengths": c.num_classes * 2 * c.digit_caps_dim,
        "decoder": decoder + c.decoder_input,  # the mask multiplies every input
        "losses": 8 * c.num_classes + 3 * c.image_pixels,
    }


def backward_flops(config: CapsNetConfig) -> dict[str, int]:
    """FLOPs of each layer's backward, per image (see the module docstring for the rules)."""
    c = config
    forward = forward_flops(c)
    conv1_out = c.conv1_size**2 * c.conv1_channels
    primary_out = c.primary_size**2 * c.primary_conv_channels
    sizes = c.decoder_sizes
    decoder_products = sum(2 * fan_in * fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))
    decoder_biases = sum(sizes[1:])
    return {
        "conv1": (forward["conv1"] - conv1_out) + conv1_out,  # weight gradient only, plus bias gradient
        "primary_caps": 2 * (forward["primary_caps"] - primary_out) + primary_out,
        "primary_squash": 2 * forward["primary_squash"],
        "u_hat": 2 * forward["u_hat"],
        "routing": routing_backward_flops(c),
        "lengths": 2 * forward["lengths"],
        "decoder": 2 * decoder_products + decoder_biases + 2 * 4 * c.image_pixels + c.decoder_input,
        "losses": 2 * forward["losses"],
    }


def adam_flops(config: CapsNetConfig) -> int:
    """FLOPs of one Adam step (per step, not per image)."""
    return ADAM_FLOPS_PER_PARAMETER * count_parameters(config)


def inference_flops(config: CapsNetConfig) -> int:
    """Per image: the forward pass without the losses."""
    forward = forward_flops(config)
    return sum(forward.values()) - forward["losses"]


def phase_flops(config: CapsNetConfig, batch_size: int) -> dict[str, int]:
    """FLOPs of each timed phase of the benchmark suite, for one call at ``batch_size``."""
    forward = sum(forward_flops(config).values()) * batch_size
    backward = sum(backward_flops(config).values()) * batch_size
    return {
        "forward": forward,
        "backward": backward,
        "train_step": forward + backward + adam_flops(config),
        "inference": inference_flops(config) * batch_size,
        "routing": routing_forward_flops(config) * batch_size,
        "routing_backward": (routing_forward_flops(config) + routing_backward_flops(config)) * batch_size,
    }
