"""``numpy-vectorised`` and ``numpy-looped``: CapsNet over an array module, with the backward written by hand.

All the mathematics of the NumPy implementation is here, written against an array module ``xp`` (NumPy
by default); :mod:`implementations.cupy.capsnet` subclasses :class:`NumpyCapsNet` with ``xp = cupy``, so
everything the CuPy implementation computes runs on the CPU through NumPy in the tests.  Each layer is a
pair of module-level functions (``*_forward`` keeping what its ``*_backward`` needs), so each can be
checked against finite differences on its own.  The routing of either variant is in the
``routing_vectorised_*`` and ``routing_looped_*`` functions.

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
capsules u; u_hat; per routing iteration the couplings c, the sums s and the outputs v; the decoder's layer
outputs; and the lengths.  The large buffers live in a workspace that is allocated once per batch shape
and reused on every step.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from harness.contract import ROUTING_VARIANTS, Availability, Batch, Implementation
from harness.decoder import decoder_forward, decoder_layers
from harness.params import DECODER_PREFIX, DIGIT_WEIGHT
from harness.ranges import ROUTING_LAYER, layer_range
from harness.registry import register
from harness.spec import ADAM, ROUTING_GRADIENTS, CapsNetConfig, conv_output_size

CONV_LAYERS = {"conv1": ("conv1_kernel", "conv1_stride"), "primary": ("primary_kernel", "primary_stride")}
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


# Capsule nonlinearities --------------------------------------------------------------------------------


def squash_forward(xp, s, eps: float):
    """|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) along the last axis."""
    squared = (s * s).sum(axis=-1, keepdims=True)
    return s * (squared / ((1.0 + squared) * xp.sqrt(squared + eps)))


def squash_backward(xp, s, grad_v, eps: float):
    """d loss / d s of the vector squash: the full Jacobian (f I + 2 f' s s^T), not its diagonal."""
    squared = (s * s).sum(axis=-1, keepdims=True)
    root = xp.sqrt(squared + eps)
    scale = squared / ((1.0 + squared) * root)  # f(|s|^2)
    slope = (1.0 / (1.0 + squared) - squared / (2.0 * (squared + eps))) / ((1.0 + squared) * root)  # f'
    along = (s * grad_v).sum(axis=-1, keepdims=True)
    return scale * grad_v + (2.0 * slope * along) * s


def softmax(xp, logits, axis: int):
    shifted = xp.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def softmax_backward(coupling, grad_coupling, axis: int):
    return coupling * (grad_coupling - (coupling * grad_coupling).sum(axis=axis, keepdims=True))


# Routing (Procedure 1) on u_hat laid out (B, J, N, D) ---------------------------------------------------


def routing_vectorised_forward(xp, u_hat, iterations: int, eps: float):
    """All input and output capsules at once; returns v (B, J, D) and the per-iteration (c, s, v)."""
    batch, n_out, n_in, _ = u_hat.shape
    logits = xp.zeros((batch, n_out, n_in), dtype=u_hat.dtype)
    cache = []
    for iteration in range(iterations):
        with layer_range(f"routing_iteration_{iteration + 1}", "forward"):
            if iteration == 0:  # softmax of b = 0: exactly 1 / J everywhere
                coupling = xp.full((batch, n_out, n_in), 1.0 / n_out, dtype=u_hat.dtype)
            else:
                coupling = softmax(xp, logits, axis=1)  # over the output capsules j, for each input capsule i
            s = xp.matmul(coupling[:, :, None, :], u_hat)[:, :, 0, :]  # s_j = sum_i c_ij u_hat_j|i
            v = squash_forward(xp, s, eps)
            cache.append((coupling, s, v))
            if iteration < iterations - 1:
                logits = logits + xp.matmul(u_hat, v[:, :, :, None])[..., 0]  # b_ij += u_hat_j|i . v_j
    return v, cache


def routing_vectorised_backward(xp, u_hat, cache, grad_v, eps: float, out=None):
    """d loss / d u_hat through every iteration (through c and b as well as the weighted sums).

    u_hat enters iteration r twice, in s_r = sum_i c_r u_hat and in b_{r+1} = b_r + u_hat . v_r, so its
    gradient is a sum of 2R - 1 rank-one terms per (example, output capsule): c_r (x) d s_r and
    d b_{r+1} (x) v_r.  The coefficients are gathered first and the (B, J, N, D) gradient is written
    once, by one batched product with an inner dimension of 2R - 1, instead of being accumulated term by
    term (each term a full pass over u_hat's memory).  That product is the last work of the backward pass,
    after iteration 1's own, and its profile range is iteration 1's.  ``out``, if given, is where it writes
    the gradient: an array of u_hat's shape, possibly a strided view (NumPy's matmul writes into one
    directly), which is how the training backward gets the gradient already regrouped by input capsule.
    """
    iterations = len(cache)
    batch, n_out, n_in, dim = u_hat.shape
    terms = 2 * iterations - 1
    left = xp.empty((batch, n_out, terms, n_in), dtype=u_hat.dtype)  # coefficients over the input capsules
    right = xp.empty((batch, n_out, terms, dim), dtype=u_hat.dtype)  # vectors over the capsule axis
    grad_logits_next = None  # d loss / d b_{r+1}
    for iteration in reversed(range(iterations)):
        with layer_range(f"routing_iteration_{iteration + 1}", "backward"):
            coupling, s, v = cache[iteration]
            if grad_logits_next is None:
                grad_v_r = grad_v
            else:  # b_{r+1} = b_r + u_hat . v_r
                grad_v_r = xp.matmul(grad_logits_next[:, :, None, :], u_hat)[:, :, 0, :]
                left[:, :, iterations + iteration, :] = grad_logits_next
                right[:, :, iterations + iteration, :] = v
            grad_s = squash_backward(xp, s, grad_v_r, eps)
            left[:, :, iteration, :] = coupling
            right[:, :, iteration, :] = grad_s
            if iteration == 0:
                break  # b_0 = 0 is a constant
            grad_coupling = xp.matmul(u_hat, grad_s[..., None])[..., 0]
            grad_logits = softmax_backward(coupling, grad_coupling, axis=1)
            if grad_logits_next is not None:
                grad_logits += grad_logits_next
            grad_logits_next = grad_logits
    with layer_range("routing_iteration_1", "backward"):
        if out is None:
            return xp.matmul(left.transpose(0, 1, 3, 2), right)
        return matmul_into(xp, left.transpose(0, 1, 3, 2), right, out)


def routing_looped_forward(xp, u_hat, iterations: int, eps: float):
    """Procedure 1 transcribed line by line with Python loops over the output capsules j."""
    batch, n_out, n_in, _ = u_hat.shape
    logits = [xp.zeros((batch, n_in), dtype=u_hat.dtype) for _ in range(n_out)]
    cache = []
    for iteration in range(iterations):
        with layer_range(f"routing_iteration_{iteration + 1}", "forward"):
            largest = logits[0]
            for j in range(1, n_out):
                largest = xp.maximum(largest, logits[j])
            exps = [xp.exp(logits[j] - largest) for j in range(n_out)]
            total = exps[0]
            for j in range(1, n_out):
                total = total + exps[j]
            coupling = [exps[j] / total for j in range(n_out)]
            s = [(coupling[j][:, :, None] * u_hat[:, j]).sum(axis=1) for j in range(n_out)]
            v = [squash_forward(xp, s[j], eps) for j in range(n_out)]
            cache.append((coupling, s, v))
            if iteration < iterations - 1:
                for j in range(n_out):
                    logits[j] = logits[j] + (u_hat[:, j] * v[j][:, None, :]).sum(axis=2)
            else:
                v = xp.stack(v, axis=1)
    return v, cache


def routing_looped_backward(xp, u_hat, cache, grad_v, eps: float):
    """The backward of :func:`routing_looped_forward`, with the same loops over j."""
    n_out = u_hat.shape[1]
    grad_u_hat = xp.zeros_like(u_hat)
    grad_logits_next = None
    for iteration in reversed(range(len(cache))):
        with layer_range(f"routing_iteration_{iteration + 1}", "backward"):
            coupling, s, v = cache[iteration]
            grad_coupling = []
            for j in range(n_out):
                if grad_logits_next is None:
                    grad_v_j = grad_v[:, j]
                else:
                    grad_v_j = (grad_logits_next[j][:, :, None] * u_hat[:, j]).sum(axis=1)
                    grad_u_hat[:, j] += grad_logits_next[j][:, :, None] * v[j][:, None, :]
                grad_s_j = squash_backward(xp, s[j], grad_v_j, eps)
                grad_u_hat[:, j] += coupling[j][:, :, None] * grad_s_j[:, None, :]
                grad_coupling.append((u_hat[:, j] * grad_s_j[:, None, :]).sum(axis=2))
            if iteration == 0:
                break
            weighted = coupling[0] * grad_coupling[0]
            for j in range(1, n_out):
                weighted = weighted + coupling[j] * grad_coupling[j]
            grad_logits = [coupling[j] * (grad_coupling[j] - weighted) for j in range(n_out)]
            if grad_logits_next is not None:
                grad_logits = [grad_logits[j] + grad_logits_next[j] for j in range(n_out)]
            grad_logits_next = grad_logits
    return grad_u_hat


def routing_vectorised_final_backward(xp, u_hat, cache, grad_v, eps: float, out=None):
    """d loss / d u_hat under the routing gradient ``final`` (harness.spec): through the last iteration's
    weighted sum and squash alone, c_R being a constant: one rank-one term c_R (x) d s_R per (example,
    output capsule), against :func:`routing_vectorised_backward`'s 2R - 1; no earlier iteration is visited."""
    coupling, s, _ = cache[-1]
    with layer_range(f"routing_iteration_{len(cache)}", "backward"):
        grad_s = squash_backward(xp, s, grad_v, eps)
        return xp.multiply(coupling[..., None], grad_s[:, :, None, :], out=out)  # (B, J, N, D)


def routing_looped_final_backward(xp, u_hat, cache, grad_v, eps: float):
    """The backward of :func:`routing_looped_forward` under the routing gradient ``final``, with its loop
    over j: the last iteration's weighted sums alone (see :func:`routing_vectorised_final_backward`)."""
    coupling, s, _ = cache[-1]
    grad_u_hat = xp.empty_like(u_hat)
    with layer_range(f"routing_iteration_{len(cache)}", "backward"):
        for j in range(u_hat.shape[1]):
            grad_s_j = squash_backward(xp, s[j], grad_v[:, j], eps)
            grad_u_hat[:, j] = coupling[j][:, :, None] * grad_s_j[:, None, :]
    return grad_u_hat


def _takes_out(function: Callable) -> bool:
    """Whether a routing backward takes ``out=``."""
    return "out" in inspect.signature(function).parameters


class RoutingFunctions(NamedTuple):
    """One routing variant over u_hat (B, J, N, D): ``forward(xp, u_hat, iterations, eps) -> (v, cache)``
    and ``backward(xp, u_hat, cache, grad_v, eps) -> grad_u_hat``; a backward that also takes ``out=`` (an
    array of u_hat's shape to write the gradient into, see :func:`routing_vectorised_backward`) is given
    the prediction vectors' regrouping buffer by the training backward."""

    forward: Callable
    backward: Callable


ROUTING = {
    "vectorised": RoutingFunctions(routing_vectorised_forward, routing_vectorised_backward),
    "looped": RoutingFunctions(routing_looped_forward, routing_looped_backward),
}
# The same forward passes with the backward of the routing gradient ``final`` (harness.spec).
ROUTING_FINAL = {
    "vectorised": RoutingFunctions(routing_vectorised_forward, routing_vectorised_final_backward),
    "looped": RoutingFunctions(routing_looped_forward, routing_looped_final_backward),
}
ROUTING_BY_GRADIENT = {"full": ROUTING, "final": ROUTING_FINAL}


# Prediction vectors, lengths, decoder, losses --------------------------------------------------------------


def matmul_into(xp, a, b, out):
    """a @ b written into ``out``, a strided view: NumPy's matmul writes into any view (no temporary);
    other array modules get a copy."""
    if xp is np:
        return np.matmul(a, b, out=out)
    out[...] = xp.matmul(a, b)
    return out


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
    the routing of its variant and routing gradient from :data:`ROUTING_BY_GRADIENT` (a subclass may set
    ``routing_functions`` instead, and then declares the ``routing_gradients`` they compute)."""

    framework = "numpy"
    u_hat_layout = "BJND"
    routing_gradients = ROUTING_GRADIENTS

    @classmethod
    def array_module(cls):
        return np

    def __init__(self, config, params, dtype="float32", device="cpu", routing_variant="vectorised"):
        super().__init__(config, params, dtype, device, routing_variant)
        self.xp = self.array_module()
        self._dtype = getattr(self.xp, dtype)
        self.routing_functions: RoutingFunctions = ROUTING_BY_GRADIENT[config.routing_gradient][routing_variant]
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
                                                              config.squash_eps)
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
        into = {"out": by_input.transpose(1, 2, 0, 3)} if _takes_out(self.routing_functions.backward) else {}
        with self._routing_range("backward"):
            grad_u_hat = self.routing_functions.backward(xp, cache["u_hat"], cache["routing"], grad_v,
                                                         config.squash_eps, **into)
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
        v, _ = self.routing_functions.forward(self.xp, u_hat, self.config.routing_iterations, self.config.squash_eps)
        return v

    def routing_backward(self, u_hat, grad_v):
        xp, eps = self.xp, self.config.squash_eps
        _, cache = self.routing_functions.forward(xp, u_hat, self.config.routing_iterations, eps)
        return self.routing_functions.backward(xp, u_hat, cache, grad_v, eps)


for _variant in ROUTING_VARIANTS:
    register(f"numpy-{_variant}", NumpyCapsNet, routing_variant=_variant)
