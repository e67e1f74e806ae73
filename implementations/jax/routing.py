"""The routing of the JAX implementations: every routing in one table, :data:`ROUTING`, keyed by (routing
algorithm, routing variant, routing gradient) (harness.spec), as every framework's table is; each entry
``routing(u_hat, params, config)``: u_hat (B, N, J, D) -> v (B, J, D), ``params`` the routing algorithm's own
parameters by canonical name (none for dynamic routing; self-attention's ``digit.bias``, (J, N)), ``config``
the :class:`~harness.spec.CapsNetConfig` (iterations, eps), differentiable by JAX in u_hat and ``params``.
Dynamic routing: :func:`routing_vectorised`, :func:`routing_looped` (the gradient "final" through
``lax.stop_gradient``); self-attention: :func:`self_attention_vectorised`, :func:`self_attention_looped`.
The squash of each is here too (:func:`squash`, which the network's PrimaryCaps use under every algorithm;
self-attention's :func:`attention_squash`)."""

from __future__ import annotations

from harness.routing_algorithms import dynamic_entry, self_attention_entry
from harness.spec import ROUTING_ALGORITHM_GRADIENTS
from implementations.jax._setup import jax, jnp, lax


def squash(s, eps: float):
    """|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) along the capsule axis."""
    squared = jnp.sum(s * s, axis=-1, keepdims=True)
    return s * (squared / ((1.0 + squared) * jnp.sqrt(squared + eps)))


# Dynamic routing (Procedure 1) ------------------------------------------------------------------------------


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


# Self-attention routing (harness.spec) ------------------------------------------------------------------------


def attention_squash(s, eps: float):
    """Efficient-CapsNet's squash, (1 - exp(-n)) s / n with n = sqrt(|s|^2 + eps), along the capsule axis."""
    norm = jnp.sqrt(jnp.sum(s * s, axis=-1, keepdims=True) + eps)
    return s * (-jnp.expm1(-norm) / norm)


def self_attention_vectorised(u_hat, bias, eps: float):
    """a_ij = u_hat_j|i . sum_k u_hat_j|k / sqrt(D), c = softmax_j(a) + b, v_j = squash(sum_i c_ij u_hat_j|i),
    over all input and output capsules at once: u_hat (B, N, J, D), ``bias`` (J, N) -> v (B, J, D)."""
    with jax.named_scope("attention"):
        total = jnp.sum(u_hat, axis=1)  # sum_k u_hat_j|k, (B, J, D)
        logits = jnp.einsum("bnjd,bjd->bnj", u_hat, total) / u_hat.shape[-1] ** 0.5  # a_ij, (B, N, J)
        coupling = jax.nn.softmax(logits, axis=2) + bias.T  # over the output capsules j, then b_ji
    with jax.named_scope("attention_sum"):
        return attention_squash(jnp.einsum("bnj,bnjd->bjd", coupling, u_hat), eps)


def self_attention_looped(u_hat, bias, eps: float):
    """Self-attention routing transcribed line by line, with Python loops over the output capsules j (as
    :func:`routing_looped` has for dynamic routing); ``bias`` (J, N); returns v (B, J, D)."""
    n_out, dim = u_hat.shape[2], u_hat.shape[3]
    predictions = [u_hat[:, :, j] for j in range(n_out)]  # u_hat_j|i for each output capsule j, (B, N, D) each
    with jax.named_scope("attention"):
        logits = []  # a_ij, one (B, N) array per j
        for j in range(n_out):
            total = jnp.sum(predictions[j], axis=1, keepdims=True)  # sum_k u_hat_j|k, (B, 1, D)
            logits.append(jnp.sum(predictions[j] * total, axis=2) / dim**0.5)
        largest = logits[0]
        for j in range(1, n_out):
            largest = jnp.maximum(largest, logits[j])
        exps = [jnp.exp(logits[j] - largest) for j in range(n_out)]
        total_exp = exps[0]
        for j in range(1, n_out):
            total_exp = total_exp + exps[j]
    with jax.named_scope("attention_sum"):
        v = []
        for j in range(n_out):
            coupling = exps[j] / total_exp + bias[j]  # c_ij = softmax_j(a_ij) + b_ji
            v.append(attention_squash(jnp.sum(coupling[:, :, None] * predictions[j], axis=1), eps))
    return jnp.stack(v, axis=1)


# The table --------------------------------------------------------------------------------------------------

ROUTING = {
    **{("dynamic", variant, gradient): dynamic_entry(function, gradient)
       for variant, function in (("vectorised", routing_vectorised), ("looped", routing_looped))
       for gradient in ROUTING_ALGORITHM_GRADIENTS["dynamic"]},
    **{("self-attention", variant, gradient): self_attention_entry(function)
       for variant, function in (("vectorised", self_attention_vectorised), ("looped", self_attention_looped))
       for gradient in ROUTING_ALGORITHM_GRADIENTS["self-attention"]},
}
