"""The routing of the JAX implementations: every routing in one table, :data:`ROUTING`, keyed by
(routing variant, routing gradient), with the squash it is built of (the network's PrimaryCaps use it too)."""

from __future__ import annotations

import functools

from harness.spec import ROUTING_GRADIENTS
from implementations.jax._setup import jax, jnp, lax


def squash(s, eps: float):
    """|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) along the capsule axis."""
    squared = jnp.sum(s * s, axis=-1, keepdims=True)
    return s * (squared / ((1.0 + squared) * jnp.sqrt(squared + eps)))



def routing_vectorised(u_hat, iterations: int, eps: float, gradient: str = "full"):
    """Procedure 1 over all input and output capsules at once: u_hat (B, N, J, D) -> v (B, J, D).  With
    ``gradient`` "final", the iterations before the last see u_hat through ``stop_gradient``, so the last
    couplings are constants and the gradient reaches u_hat through the last weighted sum and squash only."""
    batch, n_in, n_out, _ = u_hat.shape
    agreeing = lax.stop_gradient(u_hat) if gradient == "final" else u_hat
    logits = jnp.zeros((batch, n_in, n_out), u_hat.dtype)
    for iteration in range(iterations):
        with jax.named_scope(f"routing_iteration_{iteration + 1}"):
            last = iteration == iterations - 1
            if iteration == 0:  # softmax of b = 0: exactly 1 / J everywhere
                coupling = jnp.full((batch, n_in, n_out), 1.0 / n_out, u_hat.dtype)
            else:
                coupling = jax.nn.softmax(logits, axis=2)  # over the output capsules j, for each input i
            v = squash(jnp.einsum("bnj,bnjd->bjd", coupling, u_hat if last else agreeing), eps)
            if not last:
                logits = logits + jnp.einsum("bnjd,bjd->bnj", agreeing, v)  # b_ij += u_hat_j|i . v_j
    return v


def routing_looped(u_hat, iterations: int, eps: float, gradient: str = "full"):
    """Procedure 1 transcribed line by line, with Python loops over the output capsules j (unrolled by the
    trace: one small program per capsule, as the other looped variants launch one operation per capsule)."""
    batch, n_in, n_out, _ = u_hat.shape
    agreeing = lax.stop_gradient(u_hat) if gradient == "final" else u_hat
    logits = [jnp.zeros((batch, n_in), u_hat.dtype) for _ in range(n_out)]
    for iteration in range(iterations):
        with jax.named_scope(f"routing_iteration_{iteration + 1}"):
            last = iteration == iterations - 1
            source = u_hat if last else agreeing
            largest = logits[0]
            for j in range(1, n_out):
                largest = jnp.maximum(largest, logits[j])
            exps = [jnp.exp(logits[j] - largest) for j in range(n_out)]
            total = exps[0]
            for j in range(1, n_out):
                total = total + exps[j]
            v = [squash(jnp.sum((exps[j] / total)[:, :, None] * source[:, :, j], axis=1), eps) for j in range(n_out)]
            if not last:
                for j in range(n_out):
                    logits[j] = logits[j] + jnp.sum(agreeing[:, :, j] * v[j][:, None, :], axis=2)
    return jnp.stack(v, axis=1)


# Every JAX routing, by (routing variant, routing gradient) (harness.spec): u_hat (B, N, J, D), iterations,
# eps -> v (B, J, D), differentiable (the gradient "final" stops it through the iterations before the last).
ROUTING = {
    (variant, gradient): functools.partial(function, gradient=gradient)
    for variant, function in (("vectorised", routing_vectorised), ("looped", routing_looped))
    for gradient in ROUTING_GRADIENTS
}
