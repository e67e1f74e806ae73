"""Floating-point work of every layer and phase of CapsNet, counted analytically from the config.

Conventions: a multiply-add is 2 FLOPs; every other addition, multiplication, division, exp and sqrt is 1;
comparisons (max, ReLU, argmax) and data movement are 0.  Only what runs is counted: the first routing
iteration's couplings are exactly 1/J (softmax of zero logits), so it has no softmax and no softmax
gradient.  :func:`layer_flops` is the one table, per image, with the layers named as the profiler names
them (:data:`LAYERS`); every other figure here is a sum over it.  Per-image figures do not include Adam
(it works per step, not per image); :func:`phase_flops`'s ``train_step`` does.

Forward, per image:

* conv1 (Conv1 + ReLU): ``2 * H1^2 * C1 * k1^2 * Cin`` multiply-adds plus ``H1^2 * C1`` bias adds.
* primary_caps: ``2 * H2^2 * P * k2^2 * C1`` plus ``H2^2 * P`` bias adds (most of the network's work).
* primary_squash (squash + capsule regrouping): a squash of a capsule of dimension d is d multiplies and
  d - 1 adds for |s|^2, 5 for the factor |s|^2 / ((1 + |s|^2) sqrt(|s|^2 + eps)), d multiplies: 3d + 4.
* u_hat: ``2 * N * J * D * K``.
* routing_iteration_r (dynamic routing): the softmax over J for each input capsule (J exp, J - 1 adds, J
  divides, J subtractions of the max; not in iteration 1), the weighted sum s (``2 * N * J * D``), the
  squash of J capsules; and, in every iteration but the last, the agreement ``2 * N * J * D`` and its
  addition to the logits (N * J).
* self-attention routing (harness.spec) in two layers, one pass:

  - attention: the sum over k of u_hat_j|k (``N * J * D`` adds, J * D sums of N), the agreements
    a_ij = u_hat_j|i . sum (``2 * N * J * D``), their scaling by 1 / sqrt(D) (N * J), the softmax over J for
    each input capsule (as above, N * (4J - 1)) and the bias b_ji added (N * J);
  - attention_sum: the weighted sum s (``2 * N * J * D``) and the squash (1 - exp(-n)) s / n of J capsules
    (|s|^2 2D - 1, + eps, sqrt, negate, exp, 1 - , divide: 5, and D multiplies: 3D + 5 each).
* lengths_mask: lengths (2D per capsule) and the mask (J * D).
* decoder: ``2 * in * out + out`` per layer, 4 per sigmoid output.  losses: about 8 per class, 3 per pixel.

Backward: a layer ``y = f(x, w)`` that is linear in each operand costs one product of the forward's size
per operand that needs a gradient.  Conv1 needs only its weight gradient (its input is the image), the
others both; bias gradients are one add per output element; elementwise layers (squash, softmax, sigmoid,
lengths, losses) cost about twice their forward; in routing, the logits' gradient of iteration r + 1 is
added to iteration r's for 1 < r < R.  Self-attention's backward: attention_sum, both operands of s
(``4 * N * J * D``) and twice the squash; attention, the softmax twice, the scaling (N * J), the bias
gradient (one add per coupling, N * J), both operands of the agreements (``4 * N * J * D``: the gradient
of u_hat_j|i and of the sum) and the sum's gradient added to every u_hat_j|k (``N * J * D``).  The update
(Adam) is 12 FLOPs per parameter per step (moments 7, update 5).

A routing algorithm this module has no count of (a plugin's) is one layer, ``routing`` (the range the base
classes open around it, :data:`harness.ranges.ROUTING_LAYER`), whose FLOPs are unknown: NaN, and so is every
sum over them.
"""

from __future__ import annotations

import math

from harness.params import count_parameters
from harness.ranges import ROUTING_LAYER
from harness.spec import CapsNetConfig

ADAM_FLOPS_PER_PARAMETER = 12
PHASES = ("forward", "backward", "update")
OPTIMIZER = "optimizer"
ATTENTION_LAYERS = ("attention", "attention_sum")  # self-attention routing's two ranges, in forward order
DYNAMIC_LAYER_PREFIX = "routing_iteration_"


def routing_layers(config: CapsNetConfig) -> list[str]:
    """The layers of ``config``'s routing, as every profile names them: ``routing_iteration_1`` ..
    ``routing_iteration_R`` for dynamic routing, ``attention`` and ``attention_sum`` for self-attention,
    ``routing`` (the whole routing, FLOPs unknown) for an algorithm this module does not count."""
    algorithm = getattr(config, "routing_algorithm", "dynamic")
    if algorithm == "dynamic":
        return [f"{DYNAMIC_LAYER_PREFIX}{r}" for r in range(1, config.routing_iterations + 1)]
    if algorithm == "self-attention":
        return list(ATTENTION_LAYERS)
    return [ROUTING_LAYER]


def is_builtin_routing_layer(layer: str) -> bool:
    """Whether ``layer`` is one of the ranges the built-in routing algorithms open (an iteration of dynamic
    routing, a layer of self-attention), as opposed to the whole-routing range around a plugin's."""
    return layer.startswith(DYNAMIC_LAYER_PREFIX) or layer in ATTENTION_LAYERS


def layers(config: CapsNetConfig) -> list[str]:
    """The layers of the network in forward order, as every profile names them."""
    return ["conv1", "primary_caps", "primary_squash", "u_hat", *routing_layers(config), "lengths_mask",
            "decoder", "losses"]


def squash_flops(capsules: int, dim: int) -> int:
    return capsules * (3 * dim + 4)


def softmax_flops(rows: int, width: int) -> int:
    return rows * (4 * width - 1)


def attention_squash_flops(capsules: int, dim: int) -> int:
    """Self-attention's squash (1 - exp(-n)) s / n, n = sqrt(|s|^2 + eps), of ``capsules`` of ``dim``."""
    return capsules * (3 * dim + 5)


def _self_attention(config: CapsNetConfig) -> dict[str, tuple[int, int]]:
    """(forward, backward) FLOPs per image of self-attention's layers (the module docstring's counts)."""
    n_in, n_out, dim = config.num_primary_caps, config.num_classes, config.digit_caps_dim
    couplings = n_in * n_out
    product = 2 * couplings * dim
    total = couplings * dim  # sum over k of u_hat_j|k
    softmax = softmax_flops(n_in, n_out)
    squash = attention_squash_flops(n_out, dim)
    return {
        "attention": (total + product + couplings + softmax + couplings,
                      total + 2 * product + couplings + 2 * softmax + couplings),
        "attention_sum": (product + squash, 2 * product + 2 * squash),
    }


def _routing_iteration(config: CapsNetConfig, r: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of routing iteration r (1-based), per image."""
    n_in, n_out, dim = config.num_primary_caps, config.num_classes, config.digit_caps_dim
    last = config.routing_iterations
    product = 2 * n_in * n_out * dim
    softmax = softmax_flops(n_in, n_out) if r > 1 else 0
    squash = squash_flops(n_out, dim)
    agreement = product + n_in * n_out if r < last else 0
    forward = softmax + product + squash + agreement
    backward = 2 * product + 2 * squash + 2 * softmax
    if r < last:
        backward += 2 * product  # the agreement's gradient with respect to u_hat and to v
    if 1 < r < last:
        backward += n_in * n_out  # d b_r gets d b_{r+1} added
    return forward, backward


def layer_flops(config: CapsNetConfig) -> dict[tuple[str, str], int]:
    """FLOPs per image of each (phase, layer) of a training step, forward and backward (not the update), for
    ``config``'s routing algorithm (NaN for the routing of an algorithm without a count)."""
    c = config
    conv1_out = c.conv1_size**2 * c.conv1_channels
    primary_out = c.primary_size**2 * c.primary_conv_channels
    conv1 = 2 * conv1_out * c.conv1_kernel**2 * c.image_channels
    primary = 2 * primary_out * c.primary_kernel**2 * c.conv1_channels
    squash = squash_flops(c.num_primary_caps, c.primary_caps_dim)
    u_hat = 2 * c.num_primary_caps * c.num_classes * c.digit_caps_dim * c.primary_caps_dim
    lengths, mask = c.num_classes * 2 * c.digit_caps_dim, c.decoder_input
    sizes = c.decoder_sizes
    decoder_products = sum(2 * fan_in * fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))
    decoder_biases = sum(sizes[1:])
    sigmoid = 4 * c.image_pixels  # exp, add, divide, negate
    losses = 8 * c.num_classes + 3 * c.image_pixels
    forward = {"conv1": conv1 + conv1_out, "primary_caps": primary + primary_out, "primary_squash": squash,
               "u_hat": u_hat, "lengths_mask": lengths + mask, "decoder": decoder_products + decoder_biases + sigmoid,
               "losses": losses}
    backward = {"conv1": conv1 + conv1_out, "primary_caps": 2 * primary + primary_out, "primary_squash": 2 * squash,
                "u_hat": 2 * u_hat, "lengths_mask": 2 * lengths + mask,
                "decoder": 2 * decoder_products + decoder_biases + 2 * sigmoid, "losses": 2 * losses}
    algorithm = getattr(c, "routing_algorithm", "dynamic")
    if algorithm == "dynamic":
        for r, name in enumerate(routing_layers(c), start=1):
            forward[name], backward[name] = _routing_iteration(c, r)
    elif algorithm == "self-attention":
        for name, (forward_count, backward_count) in _self_attention(c).items():
            forward[name], backward[name] = forward_count, backward_count
    else:  # a plugin's algorithm: no count
        forward[ROUTING_LAYER] = backward[ROUTING_LAYER] = math.nan
    return {**{("forward", layer): forward[layer] for layer in layers(c)},
            **{("backward", layer): backward[layer] for layer in layers(c)}}


def forward_flops(config: CapsNetConfig) -> dict[str, int]:
    """FLOPs of each layer of the training forward pass, per image."""
    return {layer: flops for (phase, layer), flops in layer_flops(config).items() if phase == "forward"}


def backward_flops(config: CapsNetConfig) -> dict[str, int]:
    """FLOPs of each layer's backward, per image."""
    return {layer: flops for (phase, layer), flops in layer_flops(config).items() if phase == "backward"}


def routing_forward_flops(config: CapsNetConfig) -> int:
    return sum(forward_flops(config)[layer] for layer in routing_layers(config))


def routing_backward_flops(config: CapsNetConfig) -> int:
    return sum(backward_flops(config)[layer] for layer in routing_layers(config))


def adam_flops(config: CapsNetConfig) -> int:
    """FLOPs of one Adam step (per step, not per image)."""
    return ADAM_FLOPS_PER_PARAMETER * count_parameters(config)


def step_layer_flops(config: CapsNetConfig, batch_size: int) -> dict[tuple[str, str], int]:
    """FLOPs of each (phase, layer) of one training step at ``batch_size``, the update included."""
    table = {key: flops * batch_size for key, flops in layer_flops(config).items()}
    table[("update", OPTIMIZER)] = adam_flops(config)
    return table


def inference_flops(config: CapsNetConfig) -> int:
    """Per image: the forward pass without the losses."""
    forward = forward_flops(config)
    return sum(forward.values()) - forward["losses"]


def phase_flops(config: CapsNetConfig, batch_size: int) -> dict[str, int]:
    """FLOPs of each timed phase of the benchmark suite, for one call at ``batch_size``: ``train_step`` is
    forward + backward + the Adam update; ``routing_backward`` is routing forward and backward together."""
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
