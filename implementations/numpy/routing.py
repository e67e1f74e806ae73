"""The routing of the NumPy implementation (and of the CuPy one, the same code over ``xp = cupy``): every
routing of the array module in one table, :data:`ROUTING`, keyed by (routing algorithm, routing variant,
routing gradient).

Dynamic routing (Procedure 1) and self-attention routing (harness.spec) on u_hat laid out (B, J, N, D), each
variant a forward pass keeping a cache and a backward from it, both written by hand
(:class:`RoutingFunctions`), with the capsule nonlinearities they are built of (the squashes and the
softmax; the dynamic squash is also the network's PrimaryCaps squash, see
:mod:`implementations.numpy.capsnet`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from harness.ranges import layer_range
from harness.routing_algorithms import DIGIT_BIAS

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


def matmul_into(xp, a, b, out):
    """a @ b written into ``out``, a strided view: NumPy's matmul writes into any view (no temporary);
    other array modules get a copy."""
    if xp is np:
        return np.matmul(a, b, out=out)
    out[...] = xp.matmul(a, b)
    return out


# Routing (Procedure 1) on u_hat laid out (B, J, N, D) ---------------------------------------------------


def routing_vectorised_forward(xp, u_hat, iterations: int, eps: float, params=None):
    """All input and output capsules at once; returns v (B, J, D) and the per-iteration (c, s, v).  Dynamic
    routing has no parameters of its own: ``params`` is not read."""
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
    """d loss / d u_hat through every iteration (through c and b as well as the weighted sums), and the
    gradients of the routing's parameters, none.

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
            return xp.matmul(left.transpose(0, 1, 3, 2), right), {}
        return matmul_into(xp, left.transpose(0, 1, 3, 2), right, out), {}


def routing_looped_forward(xp, u_hat, iterations: int, eps: float, params=None):
    """Procedure 1 transcribed line by line with Python loops over the output capsules j (``params`` not
    read)."""
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
    return grad_u_hat, {}


def routing_vectorised_final_backward(xp, u_hat, cache, grad_v, eps: float, out=None):
    """d loss / d u_hat under the routing gradient ``final`` (harness.spec): through the last iteration's
    weighted sum and squash alone, c_R being a constant: one rank-one term c_R (x) d s_R per (example,
    output capsule), against :func:`routing_vectorised_backward`'s 2R - 1; no earlier iteration is visited."""
    coupling, s, _ = cache[-1]
    with layer_range(f"routing_iteration_{len(cache)}", "backward"):
        grad_s = squash_backward(xp, s, grad_v, eps)
        return xp.multiply(coupling[..., None], grad_s[:, :, None, :], out=out), {}  # (B, J, N, D)


def routing_looped_final_backward(xp, u_hat, cache, grad_v, eps: float):
    """The backward of :func:`routing_looped_forward` under the routing gradient ``final``, with its loop
    over j: the last iteration's weighted sums alone (see :func:`routing_vectorised_final_backward`)."""
    coupling, s, _ = cache[-1]
    grad_u_hat = xp.empty_like(u_hat)
    with layer_range(f"routing_iteration_{len(cache)}", "backward"):
        for j in range(u_hat.shape[1]):
            grad_s_j = squash_backward(xp, s[j], grad_v[:, j], eps)
            grad_u_hat[:, j] = coupling[j][:, :, None] * grad_s_j[:, None, :]
    return grad_u_hat, {}


# Self-attention routing (harness.spec) on u_hat laid out (B, J, N, D) -----------------------------------

# u_hat's bytes per slice of examples that NumPy's self-attention reads at a time (example_chunks): a slice
# stays in a core's L2 cache between its reads (one example of the paper network is 0.74 MB in float32)
ATTENTION_CHUNK_BYTES = 1 << 20


def attention_squash_forward(xp, s, eps: float):
    """Efficient-CapsNet's squash, (1 - exp(-n)) s / n with n = sqrt(|s|^2 + eps), along the last axis."""
    norm = xp.sqrt((s * s).sum(axis=-1, keepdims=True) + eps)
    return s * (-xp.expm1(-norm) / norm)


def attention_squash_backward(xp, s, grad_v, eps: float):
    """d loss / d s of :func:`attention_squash_forward`: its full Jacobian f I + (f'(n) / n) s s^T applied to
    grad_v, with f(n) = (1 - exp(-n)) / n and f'(n) = (n exp(-n) - (1 - exp(-n))) / n^2."""
    norm = xp.sqrt((s * s).sum(axis=-1, keepdims=True) + eps)
    rest = -xp.expm1(-norm)  # 1 - exp(-n), exact near n = 0
    scale = rest / norm  # f
    slope = (norm * (1.0 - rest) - rest) / (norm * norm * norm)  # f'(n) / n
    along = (s * grad_v).sum(axis=-1, keepdims=True)
    return scale * grad_v + (slope * along) * s


def example_chunks(xp, u_hat) -> list[slice]:
    """The batch of u_hat (B, J, N, D) in consecutive slices of examples, each at most
    :data:`ATTENTION_CHUNK_BYTES` of u_hat (one example at least), on NumPy; one slice of the whole batch on
    any other array module (a GPU would pay a launch per operation per slice)."""
    batch = u_hat.shape[0]
    if xp is not np:
        return [slice(0, batch)]
    size = max(1, ATTENTION_CHUNK_BYTES // max(1, u_hat[:1].nbytes))
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def self_attention_vectorised_forward(xp, u_hat, iterations: int, eps: float, params):
    """Self-attention routing of every input and output capsule at once, as batched matrix products over
    each (example, output capsule)'s contiguous (N, D) block of u_hat:

        t_j = sum_k u_hat_j|k;  a_ij = u_hat_j|i . t_j / sqrt(D);  c_ij = softmax_j(a_ij) + b_ji;
        s_j = sum_i c_ij u_hat_j|i;  v_j = attention_squash(s_j)

    ``params[DIGIT_BIAS]`` is b (J, N); ``iterations`` is not read (one pass).  Returns v (B, J, D) and the
    cache (b, t / sqrt(D), softmax_j(a), s): c is softmax_j(a) + b again where backward needs it.  u_hat is
    read three times (t as 1 @ u_hat, a product that NumPy's sum over the middle axis is several times
    slower than; a; s), a slice of examples at a time (:func:`example_chunks`), so that the second and third
    reads of a slice find it in cache."""
    bias = params[DIGIT_BIAS]
    batch, n_out, n_in, dim = u_hat.shape
    chunks = example_chunks(xp, u_hat)
    total = xp.empty((batch, n_out, dim), dtype=u_hat.dtype)  # t_j / sqrt(D)
    probs = xp.empty((batch, n_out, n_in), dtype=u_hat.dtype)  # softmax_j(a_ij)
    s = xp.empty_like(total)
    scaled_ones = xp.full(n_in, 1.0 / math.sqrt(dim), dtype=u_hat.dtype)
    couplings = xp.empty((max(chunk.stop - chunk.start for chunk in chunks), n_out, n_in), dtype=u_hat.dtype)
    for chunk in chunks:
        u, coupling = u_hat[chunk], couplings[: chunk.stop - chunk.start]
        with layer_range("attention", "forward"):
            t = matmul_into(xp, scaled_ones, u, total[chunk])  # t_j / sqrt(D), (b, J, D)
            logits = xp.matmul(u, t[..., None])[..., 0]  # a_ij, (b, J, N)
            logits -= logits.max(axis=1, keepdims=True)  # softmax over the output capsules j, for each i
            xp.exp(logits, out=logits)
            xp.divide(logits, logits.sum(axis=1, keepdims=True), out=probs[chunk])
            xp.add(probs[chunk], bias, out=coupling)  # c_ij = softmax_j(a_ij) + b_ji
        with layer_range("attention_sum", "forward"):
            matmul_into(xp, coupling[:, :, None, :], u, s[chunk][:, :, None, :])  # s_j = sum_i c_ij u_hat_j|i
    with layer_range("attention_sum", "forward"):
        v = attention_squash_forward(xp, s, eps)
    return v, (bias, total, probs, s)


def self_attention_vectorised_backward(xp, u_hat, cache, grad_v, eps: float, out=None):
    """d loss / d u_hat and d loss / d b of :func:`self_attention_vectorised_forward`.

    With g_j = d loss / d s_j, e_ij = d loss / d c_ij = u_hat_j|i . g_j (also d loss / d b_ji, summed over the
    examples) and f_ij = d loss / d a_ij (e through the softmax over j), u_hat_j|m enters s_j, a_mj and every
    a_ij through t_j, so its gradient is three rank-one terms per (example, output capsule):

        c_mj g_j + f_mj t_j / sqrt(D) + (1 / sqrt(D)) sum_i f_ij u_hat_j|i

    gathered as (N x 3) @ (3 x D) and written once by one batched product (into ``out``, a strided view of
    u_hat's shape, if given: see :func:`routing_vectorised_backward`).  u_hat is read twice more (for e,
    and for the sum over i of the last term), a slice of examples at a time as in the forward pass."""
    bias, total, probs, s = cache
    batch, n_out, n_in, dim = u_hat.shape
    chunks = example_chunks(xp, u_hat)
    grad_u_hat = xp.empty_like(u_hat) if out is None else out
    with layer_range("attention_sum", "backward"):
        grad_s = attention_squash_backward(xp, s, grad_v, eps)
        grad_bias = xp.zeros((n_out, n_in), dtype=u_hat.dtype)
    with layer_range("attention", "backward"):
        left = xp.empty((max(chunk.stop - chunk.start for chunk in chunks), n_out, 3, n_in), dtype=u_hat.dtype)
        left[:, :, 2] = 1.0 / math.sqrt(dim)  # coefficients over the input capsules: [c, f, 1 / sqrt(D)]
        right = xp.empty((batch, n_out, 3, dim), dtype=u_hat.dtype)  # vectors: [g, t / sqrt(D), sum_i f u_hat]
        right[:, :, 0] = grad_s
        right[:, :, 1] = total
    for chunk in chunks:
        u, coefficients, vectors = u_hat[chunk], left[: chunk.stop - chunk.start], right[chunk]
        with layer_range("attention_sum", "backward"):
            grad_coupling = xp.matmul(u, grad_s[chunk][..., None])[..., 0]  # e_ij, (b, J, N)
            grad_bias += grad_coupling.sum(axis=0)  # b_ji is shared by the examples
        with layer_range("attention", "backward"):
            chunk_probs = probs[chunk]
            xp.add(chunk_probs, bias, out=coefficients[:, :, 0])  # c_ij
            grad_coupling -= (chunk_probs * grad_coupling).sum(axis=1, keepdims=True)  # through the softmax
            xp.multiply(chunk_probs, grad_coupling, out=coefficients[:, :, 1])  # f_ij
            matmul_into(xp, coefficients[:, :, 1:2], u, vectors[:, :, 2:3])  # sum_i f_ij u_hat_j|i
            matmul_into(xp, coefficients.transpose(0, 1, 3, 2), vectors, grad_u_hat[chunk])
    return grad_u_hat, {DIGIT_BIAS: grad_bias}


def self_attention_looped_forward(xp, u_hat, iterations: int, eps: float, params):
    """Self-attention routing transcribed line by line with Python loops over the output capsules j, as
    :func:`routing_looped_forward` has for dynamic routing; ``params[DIGIT_BIAS]`` is b (J, N)."""
    bias = params[DIGIT_BIAS]
    n_out, dim = u_hat.shape[1], u_hat.shape[3]
    scale = 1.0 / math.sqrt(dim)
    with layer_range("attention", "forward"):
        totals = [u_hat[:, j].sum(axis=1) for j in range(n_out)]  # t_j = sum_k u_hat_j|k, (B, D) each
        logits = [(u_hat[:, j] * totals[j][:, None, :]).sum(axis=2) * scale for j in range(n_out)]  # a_ij
        largest = logits[0]
        for j in range(1, n_out):
            largest = xp.maximum(largest, logits[j])
        exps = [xp.exp(logits[j] - largest) for j in range(n_out)]
        total_exp = exps[0]
        for j in range(1, n_out):
            total_exp = total_exp + exps[j]
        probs = [exps[j] / total_exp for j in range(n_out)]  # softmax over j
        coupling = [probs[j] + bias[j] for j in range(n_out)]  # c_ij = softmax_j(a_ij) + b_ji
    with layer_range("attention_sum", "forward"):
        s = [(coupling[j][:, :, None] * u_hat[:, j]).sum(axis=1) for j in range(n_out)]
        v = xp.stack([attention_squash_forward(xp, s[j], eps) for j in range(n_out)], axis=1)
    return v, (totals, probs, coupling, s)


def self_attention_looped_backward(xp, u_hat, cache, grad_v, eps: float):
    """The backward of :func:`self_attention_looped_forward`, with the same loops over j: d loss / d u_hat
    and d loss / d b (the terms of :func:`self_attention_vectorised_backward`)."""
    totals, probs, coupling, s = cache
    n_out, dim = u_hat.shape[1], u_hat.shape[3]
    scale = 1.0 / math.sqrt(dim)
    with layer_range("attention_sum", "backward"):
        grad_s = [attention_squash_backward(xp, s[j], grad_v[:, j], eps) for j in range(n_out)]
        grad_coupling = [(u_hat[:, j] * grad_s[j][:, None, :]).sum(axis=2) for j in range(n_out)]  # (B, N)
        grad_bias = xp.stack([grad_coupling[j].sum(axis=0) for j in range(n_out)])  # (J, N)
    with layer_range("attention", "backward"):
        weighted = probs[0] * grad_coupling[0]
        for j in range(1, n_out):
            weighted = weighted + probs[j] * grad_coupling[j]
        grad_u_hat = xp.empty_like(u_hat)
        for j in range(n_out):
            grad_logits = probs[j] * (grad_coupling[j] - weighted) * scale  # d loss / d a_ij, over sqrt(D)
            grad_total = (grad_logits[:, :, None] * u_hat[:, j]).sum(axis=1)  # through t_j, (B, D)
            grad_u_hat[:, j] = (coupling[j][:, :, None] * grad_s[j][:, None, :]
                                + grad_logits[:, :, None] * totals[j][:, None, :]
                                + grad_total[:, None, :])
    return grad_u_hat, {DIGIT_BIAS: grad_bias}


def takes_out(function: Callable) -> bool:
    """Whether a routing backward takes ``out=``."""
    return "out" in inspect.signature(function).parameters


class RoutingFunctions(NamedTuple):
    """One routing over u_hat (B, J, N, D): ``forward(xp, u_hat, iterations, eps, params) -> (v, cache)``
    and ``backward(xp, u_hat, cache, grad_v, eps) -> (grad_u_hat, param_grads)``.  ``params`` maps the
    canonical names of the routing algorithm's own parameters (:func:`harness.params.routing_parameter_shapes`:
    none for dynamic routing, ``digit.bias`` (J, N) for self-attention) to the network's arrays, and
    ``param_grads`` gives their gradients by the same names (summed over the batch).  A backward that also
    takes ``out=`` (an array of u_hat's shape to write the gradient into, see
    :func:`routing_vectorised_backward`) is given the prediction vectors' regrouping buffer by the training
    backward."""

    forward: Callable
    backward: Callable


# Every routing of the array module, by (routing algorithm, routing variant, routing gradient) (harness.spec):
# dynamic routing's two variants, each with the backward of either gradient; self-attention's two variants,
# under the one gradient it has.
ROUTING = {
    ("dynamic", "vectorised", "full"): RoutingFunctions(routing_vectorised_forward, routing_vectorised_backward),
    ("dynamic", "looped", "full"): RoutingFunctions(routing_looped_forward, routing_looped_backward),
    ("dynamic", "vectorised", "final"): RoutingFunctions(routing_vectorised_forward,
                                                         routing_vectorised_final_backward),
    ("dynamic", "looped", "final"): RoutingFunctions(routing_looped_forward, routing_looped_final_backward),
    ("self-attention", "vectorised", "full"): RoutingFunctions(self_attention_vectorised_forward,
                                                               self_attention_vectorised_backward),
    ("self-attention", "looped", "full"): RoutingFunctions(self_attention_looped_forward,
                                                           self_attention_looped_backward),
}
