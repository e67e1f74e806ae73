"""The canonical parameter set: one seeded set of named NumPy arrays that every implementation loads.

Because every implementation starts from the same numbers and exports its parameters and gradients in
this layout, any two implementations can be compared entry by entry.

Layout (names in this order; shapes for the paper network):

=====================  =========================  =====================================================
name                   shape                      meaning
=====================  =========================  =====================================================
``conv1.weight``       (256, 1, 9, 9)             Conv1 kernels, (out, in, kh, kw) as in torch
``conv1.bias``         (256,)
``primary.weight``     (256, 256, 9, 9)           PrimaryCaps kernels; out channel = type * 8 + component
``primary.bias``       (256,)
``digit.weight``       (1152, 10, 16, 8)          W_ij: input capsule i, output capsule j, (16 x 8) matrix
``decoder.0.weight``   (512, 160)                 decoder layers, (out, in) as in torch.nn.Linear
``decoder.0.bias``     (512,)
``decoder.1.weight``   (1024, 512)
``decoder.1.bias``     (1024,)
``decoder.2.weight``   (784, 1024)
``decoder.2.bias``     (784,)
``digit.bias``         (10, 1152)                 self-attention routing only: b_ji (harness.spec)
=====================  =========================  =====================================================

The parameters a routing algorithm adds (:func:`harness.routing_algorithms.parameter_shapes`: ``digit.bias``
for self-attention, a plugin's own) come last, and exist only in a network that routes with that algorithm.

Initialisation (drawn in float64 from ``numpy.random.default_rng(seed)`` in the order above, then cast):
convolution and linear weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the bound of PyTorch's
default initialisation); ``digit.weight`` ~ N(0, digit_weight_std^2); a routing algorithm's parameters as
it says (``digit.bias`` starts at zero), drawn after all the others, so that every other parameter is the
same number under every routing algorithm.
"""

from __future__ import annotations

import math

import numpy as np

from harness import routing_algorithms
from harness.spec import CapsNetConfig

DEFAULT_SEED = 0
DECODER_PREFIX = "decoder."
DIGIT_WEIGHT = "digit.weight"


def parameter_shapes(config: CapsNetConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter tensor of the network ``config`` describes: name -> shape, in canonical order (the
    table above, for the paper network)."""
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (config.conv1_channels, config.image_channels, config.conv1_kernel, config.conv1_kernel),
        "conv1.bias": (config.conv1_channels,),
        "primary.weight": (
            config.primary_conv_channels,
            config.conv1_channels,
            config.primary_kernel,
            config.primary_kernel,
        ),
        "primary.bias": (config.primary_conv_channels,),
        DIGIT_WEIGHT: (config.num_primary_caps, config.num_classes, config.digit_caps_dim, config.primary_caps_dim),
    }
    sizes = config.decoder_sizes
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"{DECODER_PREFIX}{layer}.weight"] = (fan_out, fan_in)
        shapes[f"{DECODER_PREFIX}{layer}.bias"] = (fan_out,)
    return {**shapes, **routing_parameter_shapes(config)}


def routing_parameter_shapes(config: CapsNetConfig) -> dict[str, tuple[int, ...]]:
    """The parameters ``config``'s routing algorithm adds (name -> shape), the last of
    :func:`parameter_shapes`; empty for dynamic routing.  Raises
    :class:`harness.routing_algorithms.UnknownRoutingAlgorithmError` for an unknown algorithm."""
    return routing_algorithms.parameter_shapes(config)


def decoder_layer_count(config: CapsNetConfig) -> int:
    """How many linear layers the decoder of ``config`` has (``decoder.0`` to ``decoder.N-1``)."""
    return len(config.decoder_sizes) - 1


def count_parameters(config: CapsNetConfig, include_decoder: bool = True) -> int:
    """Number of trainable scalars of the network ``config`` describes, the decoder's counted where
    ``include_decoder`` (8,215,568 for the paper network; 6,804,224 without the decoder)."""
    return sum(
        math.prod(shape)
        for name, shape in parameter_shapes(config).items()
        if include_decoder or not name.startswith(DECODER_PREFIX)
    )


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
    if name.endswith(".bias"):
        raise ValueError("biases take the fan-in of their weight")
    return math.prod(shape[1:])


def init_parameters(config: CapsNetConfig, seed: int = DEFAULT_SEED, dtype=np.float32) -> dict[str, np.ndarray]:
    """The canonical parameter set of the network ``config`` describes, drawn from ``seed`` as the module
    docstring says: name -> C-contiguous NumPy array of ``dtype``, in canonical order.  The same ``config`` and
    ``seed`` give the same numbers in every process (float32 values are float64 draws, rounded)."""
    rng = np.random.default_rng(seed)
    shapes = parameter_shapes(config)
    routing = routing_parameter_shapes(config)
    algorithm = routing_algorithms.of(config)
    params: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name in routing:
            values = np.asarray(algorithm.initial(name, shape, rng), dtype=np.float64)
            if values.shape != shape:
                raise ValueError(f"routing algorithm {algorithm.name!r} drew {name} of shape {values.shape}, "
                                 f"expected {shape}")
        elif name == DIGIT_WEIGHT:
            values = rng.normal(0.0, config.digit_weight_std, size=shape)
        else:
            weight_name = name.replace(".bias", ".weight")
            bound = 1.0 / math.sqrt(_fan_in(weight_name, shapes[weight_name]))
            values = rng.uniform(-bound, bound, size=shape)
        params[name] = np.ascontiguousarray(values, dtype=dtype)
    return params


def validate_parameters(params: dict[str, np.ndarray], config: CapsNetConfig) -> None:
    """Check that ``params`` (name -> array) holds exactly the tensors of :func:`parameter_shapes` of
    ``config``, each of its shape (dtypes are not checked); return nothing.  Raises ValueError naming the missing
    and unexpected names, else the first tensor of another shape."""
    expected = parameter_shapes(config)
    missing = [name for name in expected if name not in params]
    extra = [name for name in params if name not in expected]
    if missing or extra:
        raise ValueError(f"parameter names differ from the canonical layout: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"parameter {name} has shape {tuple(params[name].shape)}, expected {shape}")

