"""``numpy-vectorised`` and ``numpy-looped``: CapsNet over an array module, with the backward written by hand.

All the mathematics of the NumPy implementation is here and in :mod:`implementations.numpy.routing`,
written against an array module ``xp`` (NumPy by default); :mod:`implementations.cupy.capsnet` subclasses
:class:`NumpyCapsNet` with ``xp = cupy``, so everything the CuPy implementation computes runs on the CPU
through NumPy in the tests.  Each layer is a pair of module-level functions (``*_forward`` keeping what its
``*_backward`` needs), so each can be checked against finite differences on its own.  The routing of each
algorithm (dynamic, self-attention), variant and routing gradient, and the squashes and softmax it is built
of, are in :mod:`implementations.numpy.routing` (its table ``ROUTING``); self-attention's bias ``digit.bias``
(J, N) is a parameter of the network like any other (gradient, Adam's moments), in the canonical layout.

Layouts (internal; :meth:`NumpyCapsNet.parameters` and :meth:`NumpyCapsNet.gradients` convert to the
canonical layout of :mod:`harness.params`):

* activations are NHWC, so a convolution is one im2col copy (a strided window view, no Python loop over
  pixels or channels) and one matrix product; its weight gradient is one product with the kept im2col
  matrix, its input gradient one product per kernel offset added into a strided window (col2im's work
  without its patch-gradient buffer);
* convolution weights are kept as (out, kh * kw * in) matrices, W as (N, K, J * D), so no weight is
  re-laid out on any step;
* u_hat is kept as (B, J, N, D): every sum of routing is then a batched product over contiguous (N, D)
  blocks; the routing's backward writes u_hat's gradient straight into the (N, B, J, D) order that the
  prediction vectors' backward reads (a strided output of its last product), so it is never transposed.

What the training forward pass keeps for backward: the im2col matrices of Conv1 and PrimaryCaps (the
weight gradients are products with them; kept rather than rebuilt, which would cost a full copy every
step); the Conv1 output (its sign is the ReLU mask); the PrimaryCaps pre-squash capsules and the squashed
capsules u; u_hat; per dynamic routing iteration the couplings c, the sums s and the outputs v (under
self-attention: t_j / sqrt(D), softmax_j(a) and s); the decoder's layer outputs; and the lengths.  The large
buffers live in a workspace that is allocated once per batch shape and reused on every step.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from harness import routing_algorithms
from harness.contract import (
    ROUTING_VARIANTS,
    Availability,
    Batch,
    Implementation,
    UnsupportedRoutingAlgorithmError,
    UnsupportedRoutingGradientError,
)
from harness.decoder import decoder_forward, decoder_layers
from harness.params import DECODER_PREFIX, DIGIT_WEIGHT, routing_parameter_shapes
from harness.ranges import ROUTING_LAYER, layer_range
from harness.registry import register
from harness.spec import ADAM, ROUTING_ALGORITHMS, ROUTING_GRADIENTS, CapsNetConfig, conv_output_size
from implementations.numpy.routing import (
    ROUTING,
    RoutingFunctions,
    matmul_into,
    squash_backward,
    squash_forward,
    takes_out,
)

CONV_LAYERS = {"conv1": ("conv1_kernel", "conv1_stride"), "primary": ("primary_kernel", "primary_stride")}
# the modules whose classes route by implementations.numpy.routing.ROUTING: their routing_algorithms and
# routing_gradients describe that table, not routing functions a subclass sets of its own
TABLE_CLAIMS = (__name__, "implementations.cupy.capsnet")
ADAM_CHUNK = 1 << 16  # values per chunk of the NumPy Adam update: its five arrays' chunks stay in a core's cache


# Convolution as im2col + matrix product ---------------------------------------------------------------


def conv_output_shape(shape: tuple, kernel: int, stride: int) -> tuple[int, int]:
    """Output (height, width) of a valid convolution of an NHWC input of ``shape``."""
    _, height, width, _ = shape
    return conv_output_size(height, kernel, stride), conv_output_size(width, kernel, stride)


def im2col(xp, x, kernel: int, stride: int, out=None):
    """NHWC input (B, H, W, C) -> (B * Ho * Wo, kh * kw * C) patch matrix, columns in (kh, kw, C) order."""
    batch, _, _, channels = x.shape
    out_h, out_w = conv_output_shape(x.shape, kernel, stride)
    s_b, s_h, s_w, s_c = x.strides
    windows = xp.lib.stride_tricks.as_strided(
        x, shape=(batch, out_h, out_w, kernel, kernel, channels),
        strides=(s_b, s_h * stride, s_w * stride, s_h, s_w, s_c),
    )
    if out is None:
        out = xp.empty((batch * out_h * out_w, kernel * kernel * channels), dtype=x.dtype)
    xp.copyto(out.reshape(windows.shape), windows)
    return out


def conv_input_gradient(xp, grad_rows, weight, input_shape: tuple, kernel: int, stride: int, out=None, product=None):
    """d loss / d input of a valid convolution (the adjoint of im2col applied to grad_out @ W), one kernel
    offset at a time: the input window of offset (i, j) receives grad_out @ W_ij.  The same products as one
    large product followed by col2im, without the patch-gradient matrix (B * Ho * Wo x kh * kw * C) ever
    being written.  ``out`` (the input's shape) and, with NumPy, ``product`` (B * Ho * Wo x C), if given,
    are kept buffers for the gradient and for each offset's product, so that a step allocates neither (a
    GPU array module's memory pool hands out the products' buffers cheaply)."""
    batch, _, _, channels = input_shape
    out_h, out_w = conv_output_shape(input_shape, kernel, stride)
    per_offset = weight.reshape(weight.shape[0], kernel, kernel, channels)
    if out is None:
        grad = xp.zeros(input_shape, dtype=grad_rows.dtype)
    else:
        grad = out
        grad.fill(0)
    into = product if xp is np else None
    for i in range(kernel):  # a loop over kernel offsets: each step is one product and one strided add
        for j in range(kernel):
            window = grad[:, i : i + stride * out_h : stride, j : j + stride * out_w : stride, :]
            contribution = (grad_rows @ per_offset[:, i, j, :] if into is None
                            else np.matmul(grad_rows, per_offset[:, i, j, :], out=into))
            window += contribution.reshape(batch, out_h, out_w, channels)
    return grad


def conv_forward(xp, x, weight, bias, kernel: int, stride: int, cols_out=None, out=None):
    """Valid convolution of NHWC ``x`` with a (O, kh*kw*C) weight matrix; returns (output NHWC, cols)."""
    batch = x.shape[0]
    out_h, out_w = conv_output_shape(x.shape, kernel, stride)
    cols = im2col(xp, x, kernel, stride, cols_out)
    result = xp.matmul(cols, weight.T, out=out)
    result += bias
    return result.reshape(batch, out_h, out_w, weight.shape[0]), cols


def conv_backward(xp, grad_out, cols, weight, input_shape: tuple, kernel: int, stride: int, need_input: bool = True,
                  input_out=None, product=None):
    """Gradients (weight, bias, input or None) of :func:`conv_forward` given d loss / d output (NHWC);
    ``input_out`` and ``product`` are :func:`conv_input_gradient` 's buffers."""
    grad_rows = grad_out.reshape(-1, weight.shape[0])
    grad_weight = grad_rows.T @ cols
    grad_bias = grad_rows.sum(axis=0)
    grad_input = (conv_input_gradient(xp, grad_rows, weight, input_shape, kernel, stride, input_out, product)
                  if need_input else None)
    return grad_weight, grad_bias, grad_input


# Prediction vectors, lengths, decoder, losses --------------------------------------------------------------


def prediction_vectors_forward(xp, u, weight, n_out: int, out=None):
    """u (B, N, K) and W as (N, K, J*D) -> u_hat (B, J, N, D), W never tiled over the batch: for each
    output capsule j one batch of per-input-capsule products, written straight into u_hat[:, j]."""
    batch, n_in = u.shape[:2]
    dim = weight.shape[2] // n_out
    if out is None:
        out = xp.empty((batch, n_out, n_in, dim), dtype=u.dtype)
    by_input = u.transpose(1, 0, 2)  # (N, B, K)
    for j in range(n_out):
        matmul_into(xp, by_input, weight[:, :, j * dim : (j + 1) * dim], out[:, j].transpose(1, 0, 2))
    return out


def prediction_vectors_backward(xp, u, weight, grad_u_hat, by_input=None):
    """Gradients (u, W) of :func:`prediction_vectors_forward`.  ``by_input`` (N, B, J, D), if given, is
    the buffer for the gradient regrouped by input capsule: when ``grad_u_hat`` is already a view of it (the
    routing's backward wrote it there) nothing is copied; otherwise NumPy copies it one example at a time (a
    blocked transposition, which keeps both sides of each copy in cache)."""
    batch, n_out, n_in, dim = grad_u_hat.shape
    if by_input is None:
        by_input = xp.empty((n_in, batch, n_out, dim), dtype=grad_u_hat.dtype)
    if grad_u_hat.base is by_input:
        pass
    elif xp is np:
        for b in range(batch):
            np.copyto(by_input[:, b], grad_u_hat[b].transpose(1, 0, 2))
    else:  # a GPU transposes in one kernel; a loop would be B launches
        xp.copyto(by_input, grad_u_hat.transpose(2, 0, 1, 3))
    grad_rows = by_input.reshape(n_in, batch, n_out * dim)
    grad_weight = xp.matmul(u.transpose(1, 2, 0), grad_rows)  # (N, K, J*D)
    grad_u = xp.matmul(grad_rows, weight.transpose(0, 2, 1)).transpose(1, 0, 2)  # (B, N, K)
    return grad_u, grad_weight


def lengths_forward(xp, v):
    return xp.sqrt((v * v).sum(axis=-1))


def lengths_backward(xp, v, lengths, grad_lengths):
    """d |v| / d v = v / |v|, taken as 0 where |v| = 0."""
    safe = xp.where(lengths > 0, lengths, 1.0)
    return xp.where(lengths[..., None] > 0, v * (grad_lengths / safe)[..., None], 0.0)


def one_hot(xp, labels, classes: int, dtype):
    return (labels[:, None] == xp.arange(classes)[None, :]).astype(dtype)


def margin_loss_forward(xp, lengths, target, config: CapsNetConfig):
    present = xp.maximum(config.margin_positive - lengths, 0.0)
    absent = xp.maximum(lengths - config.margin_negative, 0.0)
    per_class = target * present**2 + config.margin_down_weight * (1.0 - target) * absent**2
    return per_class.sum() / lengths.shape[0]


def margin_loss_backward(xp, lengths, target, config: CapsNetConfig):
    present = xp.maximum(config.margin_positive - lengths, 0.0)
    absent = xp.maximum(lengths - config.margin_negative, 0.0)
    return (-2.0 * target * present + 2.0 * config.margin_down_weight * (1.0 - target) * absent) / lengths.shape[0]


def reconstruction_loss_forward(reconstructions, pixels, config: CapsNetConfig):
    errors = reconstructions - pixels
    return config.reconstruction_weight * (errors * errors).sum() / pixels.shape[0]


def reconstruction_loss_backward(reconstructions, pixels, config: CapsNetConfig):
    return (2.0 * config.reconstruction_weight / pixels.shape[0]) * (reconstructions - pixels)


def decoder_backward(layers: list, outputs: list, grad_reconstruction):
    """Gradients of every layer's (weight, bias), and d loss / d decoder input."""
    reconstruction = outputs[-1]
    grad = grad_reconstruction * reconstruction * (1.0 - reconstruction)
    grads = [None] * len(layers)
    for index in reversed(range(len(layers))):
        weight, _ = layers[index]
        grads[index] = (grad.T @ outputs[index], grad.sum(axis=0))
        grad = grad @ weight
        if index > 0:
            grad = grad * (outputs[index] > 0)
    return grads, grad


def adam_update(xp, param, grad, first, second, scratch, step_size: float, root_correction: float) -> None:
    """One Adam update of ``param`` and its moments, in place, with ``scratch`` (their shape) for temporaries:
    m <- m + (1 - beta1) (g - m); v <- beta2 v + (1 - beta2) g^2; p <- p - step_size m / (sqrt(v) /
    root_correction + eps)."""
    xp.subtract(grad, first, out=scratch)
    scratch *= 1.0 - ADAM.beta1
    first += scratch
    second *= ADAM.beta2
    xp.multiply(grad, grad, out=scratch)
    scratch *= 1.0 - ADAM.beta2
    second += scratch
    xp.sqrt(second, out=scratch)
    scratch /= root_correction
    scratch += ADAM.eps
    xp.divide(first, scratch, out=scratch)
    scratch *= step_size
    param -= scratch


# The implementation ---------------------------------------------------------------------------------


class NumpyCapsNet(Implementation):
    """The whole CapsNet over an array module (NumPy here; a subclass overrides :meth:`array_module`), with
    the routing of its algorithm, variant and routing gradient from
    :data:`implementations.numpy.routing.ROUTING`, and the routing algorithm's own parameters (self-attention's
    ``digit.bias``) among the network's, with their gradients and Adam's moments.

    A subclass may route with ``routing_functions`` of its own instead (a class attribute, or set on the
    instance after this ``__init__``): it then computes the routing algorithms and gradients it declares
    itself (``routing_algorithms``, ``routing_gradients``), ``dynamic`` and ``full`` alone unless it does
    (see :meth:`__init_subclass__`), never this class's claims by inheritance."""

    framework = "numpy"
    u_hat_layout = "BJND"
    routing_gradients = ROUTING_GRADIENTS
    routing_algorithms = ROUTING_ALGORITHMS

    def __init_subclass__(cls, **kwargs):
        """A subclass that defines ``routing_functions`` in its class body computes its own routing: it claims
        the routing gradients and algorithms it declares itself, ``full`` and ``dynamic`` alone unless it does
        (as :class:`implementations.torch.autograd.TorchCapsNet` holds a subclass overriding ``route``).  One
        that sets ``routing_functions`` on the instance instead is held to the same at build (the property's
        setter, :meth:`_own_routing_claims`)."""
        super().__init_subclass__(**kwargs)
        if "routing_functions" in vars(cls):
            if "routing_gradients" not in vars(cls):
                cls.routing_gradients = ("full",)
            if "routing_algorithms" not in vars(cls):
                cls.routing_algorithms = ("dynamic",)

    @classmethod
    def array_module(cls):
        return np

    def __init__(self, config, params, dtype="float32", device="cpu", routing_variant="vectorised"):
        super().__init__(config, params, dtype, device, routing_variant)
        self.xp = self.array_module()
        self._dtype = getattr(self.xp, dtype)
        if type(self).routing_functions is NumpyCapsNet.routing_functions:  # no class-level routing of its own
            key = (routing_algorithms.of(config).name, routing_variant, config.routing_gradient)
            self._routing_functions = ROUTING.get(key)  # None: a subclass's algorithm, its routing set next
        self._routing_parameters = tuple(routing_parameter_shapes(config))  # names, in canonical order
        self.params = {name: self._to_internal(name, value) for name, value in params.items()}
        self.grads: dict = {}
        self._moments = {name: (self.xp.zeros_like(p), self.xp.zeros_like(p)) for name, p in self.params.items()}
        self._adam_steps = 0
        self._workspace: dict = {}
        self._cache: dict | None = None
        self.input_gradient = None

    # canonical <-> internal layouts
    def _to_internal(self, name: str, value: np.ndarray):
        value = np.asarray(value)
        if name.split(".")[0] in CONV_LAYERS and name.endswith(".weight"):
            value = value.transpose(0, 2, 3, 1).reshape(value.shape[0], -1)  # (O, kh*kw*C)
        elif name == DIGIT_WEIGHT:
            n_in, n_out, dim_out, dim_in = value.shape
            value = value.transpose(0, 3, 1, 2).reshape(n_in, dim_in, n_out * dim_out)  # (N, K, J*D)
        return self.xp.array(np.ascontiguousarray(value), dtype=self._dtype)

    def _to_canonical(self, name: str, value) -> np.ndarray:
        value = self.to_numpy(value)
        config = self.config
        if name == "conv1.weight":
            k = config.conv1_kernel
            return value.reshape(-1, k, k, config.image_channels).transpose(0, 3, 1, 2).copy()
        if name == "primary.weight":
            k = config.primary_kernel
            return value.reshape(-1, k, k, config.conv1_channels).transpose(0, 3, 1, 2).copy()
        if name == DIGIT_WEIGHT:
            n_in, dim_in, _ = value.shape
            return value.reshape(n_in, dim_in, config.num_classes, config.digit_caps_dim).transpose(0, 2, 3, 1).copy()
        return value.copy()

    def _buffer(self, key: str, shape: tuple):
        """A workspace array reused across steps; reallocated only when the batch shape changes."""
        buffer = self._workspace.get(key)
        if buffer is None or buffer.shape != shape:
            buffer = self._workspace[key] = self.xp.empty(shape, dtype=self._dtype)
        return buffer

    # data
    @classmethod
    def availability(cls, device: str) -> Availability:
        return Availability.ok()

    def from_numpy(self, array):
        return self.xp.ascontiguousarray(self.xp.asarray(array, dtype=self._dtype))

    def to_device(self, images, labels=None) -> Batch:
        images = self.from_numpy(images)
        if labels is not None:
            labels = self.xp.asarray(labels, dtype=self.xp.int64)
        return Batch(images, labels)

    def to_numpy(self, array) -> np.ndarray:
        return getattr(self.xp, "asnumpy", np.asarray)(array)

    # forward
    def _features(self, images, keep: bool):
        """Conv1 -> PrimaryCaps -> squash -> u_hat (B, J, N, D), in the workspace buffers; fills the cache for
        backward when ``keep``, and otherwise ends any pending backward (its buffers are being reused)."""
        xp, config, p = self.xp, self.config, self.params
        batch = images.shape[0]
        x = images.transpose(0, 2, 3, 1)
        if config.image_channels > 1:
            x = xp.ascontiguousarray(x)
        k1, s1, k2, s2 = config.conv1_kernel, config.conv1_stride, config.primary_kernel, config.primary_stride
        size1, size2 = config.conv1_size, config.primary_size
        rows1, rows2 = batch * size1 * size1, batch * size2 * size2
        with layer_range("conv1"):
            hidden, cols1 = conv_forward(
                xp, x, p["conv1.weight"], p["conv1.bias"], k1, s1,
                cols_out=self._buffer("cols1", (rows1, k1 * k1 * config.image_channels)),
                out=self._buffer("hidden", (rows1, config.conv1_channels)),
            )
            xp.maximum(hidden, 0.0, out=hidden)
        with layer_range("primary_caps"):
            primary, cols2 = conv_forward(
                xp, hidden, p["primary.weight"], p["primary.bias"], k2, s2,
                cols_out=self._buffer("cols2", (rows2, k2 * k2 * config.conv1_channels)),
            )
        with layer_range("primary_squash"):
            types, dim = config.primary_caps_channels, config.primary_caps_dim
            s_primary = xp.ascontiguousarray(
                primary.reshape(batch, size2, size2, types, dim).transpose(0, 3, 1, 2, 4)
            ).reshape(batch, config.num_primary_caps, dim)
            u = squash_forward(xp, s_primary, config.squash_eps)
        with layer_range("u_hat"):
            u_hat = prediction_vectors_forward(
                xp, u, p[DIGIT_WEIGHT], config.num_classes,
                out=self._buffer("u_hat", (batch, config.num_classes, config.num_primary_caps, config.digit_caps_dim)),
            )
        self._cache = {"x_shape": x.shape, "cols1": cols1, "hidden": hidden, "cols2": cols2,
                       "s_primary": s_primary, "u": u, "u_hat": u_hat} if keep else None
        return u_hat

    # routing
    @property
    def routing_functions(self) -> RoutingFunctions:
        """The :class:`~implementations.numpy.routing.RoutingFunctions` the network routes with."""
        return self._routing_functions

    @routing_functions.setter
    def routing_functions(self, functions: RoutingFunctions) -> None:
        if not any(functions is built_in for built_in in ROUTING.values()):
            algorithms, gradients = self._own_routing_claims()
            algorithm = routing_algorithms.of(self.config).name
            if algorithm not in algorithms:
                raise UnsupportedRoutingAlgorithmError(
                    f"{type(self).__name__} routes with routing_functions of its own, which compute "
                    f"{' and '.join(algorithms)} only, not {algorithm!r} (a class declares more in "
                    f"routing_algorithms)")
            if self.config.routing_gradient not in gradients:
                raise UnsupportedRoutingGradientError(
                    f"{type(self).__name__} routes with routing_functions of its own, which compute the routing "
                    f"gradient {' and '.join(gradients)} only, not {self.config.routing_gradient!r} (a class "
                    f"declares more in routing_gradients)")
        self._routing_functions = functions

    @classmethod
    def _own_routing_claims(cls) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The routing algorithms and gradients that routing functions set on an instance compute: what the
        class declares, where a class below this one and the CuPy one declares it (their claims describe
        :data:`~implementations.numpy.routing.ROUTING`, not another routing); ``dynamic`` and ``full``
        otherwise."""
        def declared(attribute: str, default: tuple[str, ...]) -> tuple[str, ...]:
            for klass in cls.__mro__:
                if attribute in vars(klass):
                    return default if klass.__module__ in TABLE_CLAIMS else tuple(vars(klass)[attribute])
            return default

        return declared("routing_algorithms", ("dynamic",)), declared("routing_gradients", ("full",))

    def _routing_params(self) -> dict:
        """The routing algorithm's own parameters (none for dynamic routing), by canonical name."""
        return {name: self.params[name] for name in self._routing_parameters}

    def _routing_range(self, phase: str):
        """The range of the whole routing around a plugin's ``routing_functions`` (harness.ranges.ROUTING_LAYER):
        a profile attributes its time without the plugin opening a range.  The built-in routing opens one
        range per iteration itself: nothing here."""
        if any(self.routing_functions is built_in for built_in in ROUTING.values()):
            return contextlib.nullcontext()
        return layer_range(ROUTING_LAYER, phase)

    def _decoder_layers(self) -> list:
        return decoder_layers(self.params, self.config)  # the decoder's weights are kept in the canonical layout

    def _forward(self, batch: Batch, train: bool, keep: bool):
        xp, config = self.xp, self.config
        u_hat = self._features(batch.images, keep)
        with self._routing_range("forward"):
            v, routing_cache = self.routing_functions.forward(xp, u_hat, config.routing_iterations,
                                                              config.squash_eps, self._routing_params())
        with layer_range("lengths_mask"):
            lengths = lengths_forward(xp, v)
            if train:
                if batch.labels is None:
                    raise ValueError("a training forward pass needs labels (the decoder is masked to the true class)")
                selected = batch.labels
            else:
                selected = lengths.argmax(axis=1)
            mask = one_hot(xp, selected, config.num_classes, self._dtype)
            masked = (v * mask[:, :, None]).reshape(v.shape[0], -1)
        with layer_range("decoder"):
            outputs = decoder_forward(xp, self._decoder_layers(), masked)
        if keep:
            self._cache.update(routing=routing_cache, v=v, lengths=lengths, mask=mask, decoder=outputs)
        return lengths, outputs[-1]

    def forward(self, batch: Batch, train: bool = True):
        return self._forward(batch, train, keep=False)

    def forward_loss(self, batch: Batch):
        xp, config = self.xp, self.config
        lengths, reconstructions = self._forward(batch, train=True, keep=True)
        with layer_range("losses"):
            target = one_hot(xp, batch.labels, config.num_classes, self._dtype)
            pixels = batch.images.reshape(batch.images.shape[0], -1)
            self._cache.update(target=target, pixels=pixels)
            return margin_loss_forward(xp, lengths, target, config) + reconstruction_loss_forward(
                reconstructions, pixels, config
            )

    # backward
    def backward(self, with_input: bool = False) -> None:
        """Parameter gradients of the last forward_loss (and d loss / d images if ``with_input``)."""
        if self._cache is None:
            raise RuntimeError("backward() needs a forward_loss() first (and no forward() since: it reuses "
                               "the buffers)")
        xp, config, p, cache = self.xp, self.config, self.params, self._cache
        self.grads = {}  # the previous gradients go before the new ones are built: one set held at a time
        grads = {}
        with layer_range("losses", "backward"):
            grad_reconstruction = reconstruction_loss_backward(cache["decoder"][-1], cache["pixels"], config)
            grad_lengths = margin_loss_backward(xp, cache["lengths"], cache["target"], config)
        with layer_range("decoder", "backward"):
            layer_grads, grad_masked = decoder_backward(self._decoder_layers(), cache["decoder"], grad_reconstruction)
            for index, (grad_weight, grad_bias) in enumerate(layer_grads):
                grads[f"{DECODER_PREFIX}{index}.weight"] = grad_weight
                grads[f"{DECODER_PREFIX}{index}.bias"] = grad_bias
        with layer_range("lengths_mask", "backward"):
            v = cache["v"]
            grad_v = grad_masked.reshape(v.shape) * cache["mask"][:, :, None]
            grad_v += lengths_backward(xp, v, cache["lengths"], grad_lengths)
        batch, n_out, n_in, dim = cache["u_hat"].shape
        by_input = self._buffer("grad_u_hat_by_input", (n_in, batch, n_out, dim))
        into = {"out": by_input.transpose(1, 2, 0, 3)} if takes_out(self.routing_functions.backward) else {}
        with self._routing_range("backward"):
            grad_u_hat, routing_grads = self.routing_functions.backward(xp, cache["u_hat"], cache["routing"],
                                                                        grad_v, config.squash_eps, **into)
            grads.update(routing_grads)
        with layer_range("u_hat", "backward"):
            grad_u, grads[DIGIT_WEIGHT] = prediction_vectors_backward(xp, cache["u"], p[DIGIT_WEIGHT], grad_u_hat,
                                                                      by_input=by_input)
        with layer_range("primary_squash", "backward"):
            grad_s = squash_backward(xp, cache["s_primary"], grad_u, config.squash_eps)
            size2 = config.primary_size  # capsules -> NHWC channels (type * dim + component)
            grad_primary = xp.ascontiguousarray(
                grad_s.reshape(batch, config.primary_caps_channels, size2, size2, config.primary_caps_dim)
                .transpose(0, 2, 3, 1, 4)
            )
        hidden = cache["hidden"]
        hidden_shape = (batch, config.conv1_size, config.conv1_size, config.conv1_channels)
        with layer_range("primary_caps", "backward"):
            grads["primary.weight"], grads["primary.bias"], grad_hidden = conv_backward(
                xp, grad_primary, cache["cols2"], p["primary.weight"], hidden_shape,
                config.primary_kernel, config.primary_stride, input_out=self._buffer("grad_hidden", hidden_shape),
                product=self._buffer("grad_hidden_window", (batch * config.primary_size**2, hidden_shape[3])),
            )
        with layer_range("conv1", "backward"):
            grad_hidden *= hidden.reshape(hidden_shape) > 0
            grads["conv1.weight"], grads["conv1.bias"], grad_x = conv_backward(
                xp, grad_hidden, cache["cols1"], p["conv1.weight"], cache["x_shape"],
                config.conv1_kernel, config.conv1_stride, need_input=with_input,
            )
        if with_input:  # the images are also the reconstruction target
            target_term = -grad_reconstruction.reshape(batch, *config.input_shape)
            self.input_gradient = grad_x.transpose(0, 3, 1, 2) + target_term
        else:
            self.input_gradient = None
        self.grads = {name: grads[name] for name in self.params}

    def gradients(self) -> dict[str, np.ndarray]:
        return {name: self._to_canonical(name, grad) for name, grad in self.grads.items()}

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: self._to_canonical(name, value) for name, value in self.params.items()}

    def _next_adam_step(self) -> tuple[float, float]:
        """Count one more Adam step t; its step size lr_t / (1 - beta1^t), lr_t from the schedule, and its
        root correction sqrt(1 - beta2^t)."""
        rate = self.schedule.rate(self._adam_steps)
        self._adam_steps += 1
        step = self._adam_steps
        return rate / (1.0 - ADAM.beta1**step), math.sqrt(1.0 - ADAM.beta2**step)

    def adam_step(self) -> None:
        """torch.optim.Adam's update, in place: m, v moments with bias correction, eps outside the root.
        Its scratch buffer is kept, so a step allocates nothing; on NumPy the update goes through each tensor
        a chunk of :data:`ADAM_CHUNK` values at a time, so that its dozen passes run over chunks in cache
        rather than over whole tensors in memory."""
        with layer_range("optimizer", "update"):
            self._adam_update()

    def _adam_update(self) -> None:
        xp = self.xp
        step_size, root_correction = self._next_adam_step()
        for name, param in self.params.items():
            first, second = self._moments[name]
            if xp is np:
                scratch = self._buffer("adam:chunk", (ADAM_CHUNK,))
                flat = [array.reshape(-1) for array in (param, self.grads[name], first, second)]
                for start in range(0, param.size, ADAM_CHUNK):
                    part = [array[start : start + ADAM_CHUNK] for array in flat]
                    adam_update(xp, *part, scratch[: part[0].size], step_size, root_correction)
            else:  # one pass per operation over the whole tensor (a chunk loop would be launches on a GPU)
                adam_update(xp, param, self.grads[name], first, second, self._buffer(f"adam:{name}", param.shape),
                            step_size, root_correction)

    def adam_state(self) -> dict[str, np.ndarray]:
        state = {"step": np.asarray(self._adam_steps)}
        for name, (first, second) in self._moments.items():
            state[f"first/{name}"] = self._to_canonical(name, first)
            state[f"second/{name}"] = self._to_canonical(name, second)
        return state

    def load_adam_state(self, state: dict[str, np.ndarray]) -> None:
        self._adam_steps = int(state["step"])
        self._moments = {name: (self._to_internal(name, state[f"first/{name}"]),
                                self._to_internal(name, state[f"second/{name}"])) for name in self.params}

    # routing alone, on u_hat in the (B, J, N, D) layout the routing functions consume
    def prediction_vectors(self, batch: Batch):
        return self._features(batch.images, keep=False).copy()  # a copy: the workspace buffer is reused

    def routing_forward(self, u_hat):
        v, _ = self.routing_functions.forward(self.xp, u_hat, self.config.routing_iterations, self.config.squash_eps,
                                              self._routing_params())
        return v

    def routing_backward(self, u_hat, grad_v):
        """The gradient of u_hat, written (by a backward that takes ``out=``) into a workspace buffer that the
        next call reuses, as the training backward writes into its regrouping buffer: a fresh u_hat-sized
        array every call would cost its pages' first touch, about as much as the write itself on NumPy."""
        xp, eps = self.xp, self.config.squash_eps
        _, cache = self.routing_functions.forward(xp, u_hat, self.config.routing_iterations, eps,
                                                  self._routing_params())
        into = {"out": self._buffer("routing_grad_u_hat", u_hat.shape)} if takes_out(
            self.routing_functions.backward) else {}
        grad_u_hat, _ = self.routing_functions.backward(xp, u_hat, cache, grad_v, eps, **into)
        return grad_u_hat


for _variant in ROUTING_VARIANTS:
    register(f"numpy-{_variant}", NumpyCapsNet, routing_variant=_variant)
