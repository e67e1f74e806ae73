"""The memory a training step needs, counted analytically from the config, to set beside what is measured.

Two parts, in bytes for a dtype of ``itemsize`` bytes:

* **parameter state**: the parameters, their gradients and Adam's two moment estimates (4 copies of the
  8,215,568 parameters of the paper network: 131 MB in float32), held for the whole run;
* **activations kept for backward**: what the backward pass of the network needs from its forward pass,
  the least any implementation must keep: the Conv1 output (its ReLU mask and the PrimaryCaps input), the
  PrimaryCaps pre-squash and squashed capsules, u_hat, per routing iteration the couplings c and the
  outputs s and v (self-attention routing, one pass: the couplings c, from which the softmax's output is
  c - b, the sum over k of u_hat_j|k, s and v), the capsule lengths, the decoder's layer outputs, and the
  images.  For the paper network in float32 under dynamic routing that is 1.38 MB per image, 176 MB at batch
  128, of which u_hat (1152 x 10 x 16 values per image) and the Conv1 output (256 x 20 x 20) are 83 %.

An implementation keeps more than this minimum when it trades memory for speed: the NumPy/CuPy
implementation keeps the im2col matrices of both convolutions (3.12 MB per image, 399 MB at batch 128;
PrimaryCaps has 20,736 values per output position) so that the weight gradients are single matrix
products; autograd keeps the inputs of every differentiable operation it recorded.
"""

from __future__ import annotations

from harness.params import count_parameters
from harness.spec import CapsNetConfig

PARAMETER_COPIES = 4  # parameters, gradients, Adam's first and second moments


def parameter_state_bytes(config: CapsNetConfig, itemsize: int = 4) -> int:
    return PARAMETER_COPIES * count_parameters(config) * itemsize


def kept_activations(config: CapsNetConfig, batch_size: int, itemsize: int = 4) -> dict[str, int]:
    """Bytes of each activation the backward pass needs, for one training step at ``batch_size``."""
    c = config
    per_image = {
        "images": c.image_pixels,
        "conv1_output": c.conv1_size**2 * c.conv1_channels,
        "primary_capsules": 2 * c.num_primary_caps * c.primary_caps_dim,  # before and after squash
        "u_hat": c.num_primary_caps * c.num_classes * c.digit_caps_dim,
        "routing": routing_activations(c),
        "lengths": c.num_classes,
        "decoder": c.decoder_input + sum(c.decoder_sizes[1:]),
    }
    return {name: count * batch_size * itemsize for name, count in per_image.items()}


def routing_activations(config: CapsNetConfig) -> int:
    """Values per image the routing keeps for its backward: per dynamic routing iteration c (N x J), s and v
    (J x D each); self-attention's one pass c, the sum over k, s and v; 0 for an algorithm without a count
    (a plugin's)."""
    c = config
    couplings, capsules = c.num_primary_caps * c.num_classes, c.num_classes * c.digit_caps_dim
    algorithm = getattr(c, "routing_algorithm", "dynamic")
    if algorithm == "dynamic":
        return c.routing_iterations * (couplings + 2 * capsules)
    if algorithm == "self-attention":
        return couplings + 3 * capsules
    return 0


def im2col_bytes(config: CapsNetConfig, batch_size: int, itemsize: int = 4) -> int:
    """The two patch matrices the NumPy/CuPy implementation keeps for its weight gradients."""
    c = config
    conv1 = c.conv1_size**2 * c.conv1_kernel**2 * c.image_channels
    primary = c.primary_size**2 * c.primary_kernel**2 * c.conv1_channels
    return (conv1 + primary) * batch_size * itemsize


def expected_step_bytes(config: CapsNetConfig, batch_size: int, itemsize: int = 4) -> int:
    """The least memory a training step needs beyond the program itself: parameter state plus activations."""
    return parameter_state_bytes(config, itemsize) + sum(kept_activations(config, batch_size, itemsize).values())
