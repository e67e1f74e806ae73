"""The routing of the NumPy implementation (and of the CuPy one, the same code over ``xp = cupy``): every
routing of the array module in one table, :data:`ROUTING`, keyed by (routing variant, routing gradient).

Procedure 1 on u_hat laid out (B, J, N, D), each variant a forward pass keeping a cache and a backward from
it (:class:`RoutingFunctions`), with the capsule nonlinearities they are built of (the squash and the
softmax, which the network also uses; see :mod:`implementations.numpy.capsnet`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from harness.ranges import layer_range

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


def takes_out(function: Callable) -> bool:
    """Whether a routing backward takes ``out=``."""
    return "out" in inspect.signature(function).parameters


class RoutingFunctions(NamedTuple):
    """One routing variant over u_hat (B, J, N, D): ``forward(xp, u_hat, iterations, eps) -> (v, cache)``
    and ``backward(xp, u_hat, cache, grad_v, eps) -> grad_u_hat``; a backward that also takes ``out=`` (an
    array of u_hat's shape to write the gradient into, see :func:`routing_vectorised_backward`) is given
    the prediction vectors' regrouping buffer by the training backward."""

    forward: Callable
    backward: Callable


# Every routing of the array module, by (routing variant, routing gradient) (harness.spec): the forward
# passes of the two variants, each with the backward of either gradient.
ROUTING = {
    ("vectorised", "full"): RoutingFunctions(routing_vectorised_forward, routing_vectorised_backward),
    ("looped", "full"): RoutingFunctions(routing_looped_forward, routing_looped_backward),
    ("vectorised", "final"): RoutingFunctions(routing_vectorised_forward, routing_vectorised_final_backward),
    ("looped", "final"): RoutingFunctions(routing_looped_forward, routing_looped_final_backward),
}
