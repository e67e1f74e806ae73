"""Every routing of the PyTorch implementations in one table, :data:`ROUTING`, keyed by (routing algorithm,
routing variant, routing gradient) (harness.spec); each entry a :class:`TorchRouting`, the ways torch
computes that routing:

* ``autograd``: ``routing(u_hat, params, config)``, u_hat (B, N, J, D) -> v (B, J, D), ``params`` the
  network's tensors by canonical name (a routing reads its own: self-attention's ``digit.bias``), ``config``
  the :class:`~harness.spec.CapsNetConfig` (iterations, eps, sizes); differentiated by autograd: the routing
  of ``torch-vectorised`` and ``torch-looped`` (the reference) and of the compiled and CUDA-graph variants
  (dynamic: :func:`routing_vectorised`, :func:`routing_looped`, the gradient ``final`` detaching u_hat in
  the iterations before the last, :func:`routed_predictions`; self-attention:
  :func:`self_attention_vectorised`, :func:`self_attention_looped`);
* ``hand_written``: a ``torch.autograd.Function`` on u_hat laid out (B, J, N, D), ``apply(u_hat,
  *arguments(params, config), workspace)`` (its static ``arguments`` gives what it takes: dynamic routing
  the iterations and eps, self-attention the bias and eps), with the backward written by hand
  (:class:`Routing`, :class:`FinalGradientRouting`, :class:`SelfAttentionRouting`): ``torch-fused``'s
  routing; None for a variant that has none (looped).

The squash of each (:func:`squash` for autograd; :func:`squash_forward` and :func:`squash_backward` by
hand; self-attention's :func:`attention_squash` and :func:`attention_squash_backward`) is here too, and the
networks' PrimaryCaps use the same dynamic squash under every algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from harness.ranges import layer_range
from harness.routing_algorithms import DIGIT_BIAS, dynamic_entry, self_attention_entry
from harness.spec import ROUTING_ALGORITHM_GRADIENTS

try:
    import torch
except Exception:  # implementations.torch.autograd says why torch is unavailable; nothing here runs then
    torch = None

_Function = torch.autograd.Function if torch is not None else object


# Differentiated by autograd: u_hat (B, N, J, D) -------------------------------------------------------------


def squash(s, eps: float):
    """|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps), along the last axis."""
    squared_norm = (s * s).sum(dim=-1, keepdim=True)
    return s * (squared_norm / (1.0 + squared_norm) / torch.sqrt(squared_norm + eps))


def routed_predictions(u_hat, iteration: int, iterations: int, gradient: str):
    """The u_hat that iteration ``iteration`` (from 0) reads under routing gradient ``gradient`` (see
    harness.spec): u_hat itself, or under ``final`` before the last iteration u_hat with its gradient
    stopped (XifengGuo's ``x_hat_detached``)."""
    if gradient == "final" and iteration < iterations - 1:
        return u_hat.detach()
    return u_hat


def routing_vectorised(u_hat, iterations: int, eps: float, gradient: str = "full"):
    """Procedure 1 as batched matrix products over all input and output capsules; returns v (B, J, D)."""
    attached = u_hat.transpose(1, 2)  # (B, J, N, D), contiguous when u_hat comes from prediction_vectors
    logits = attached.new_zeros(attached.shape[:3])  # b_ij stored (B, J, N)
    for iteration in range(iterations):
        u = routed_predictions(attached, iteration, iterations, gradient)
        with layer_range(f"routing_iteration_{iteration + 1}"):
            if iteration == 0:  # softmax of b = 0: exactly 1 / J everywhere
                coupling = torch.full_like(logits, 1.0 / logits.shape[1])
            else:
                coupling = torch.softmax(logits, dim=1)  # over the output capsules j, for each input capsule i
            v = squash(torch.matmul(coupling.unsqueeze(2), u).squeeze(2), eps)  # s_j = sum_i c_ij u_hat_j|i
            if iteration < iterations - 1:
                logits = logits + torch.matmul(u, v.unsqueeze(-1)).squeeze(-1)  # b_ij += u_hat_j|i . v_j
    return v


def routing_looped(u_hat, iterations: int, eps: float, gradient: str = "full"):
    """Procedure 1 transcribed line by line, with Python loops over the output capsules j."""
    batch, n_in, n_out, _ = u_hat.shape
    logits = [u_hat.new_zeros(batch, n_in) for _ in range(n_out)]  # b_ij, one (B, N) tensor per j
    for iteration in range(iterations):
        # u_hat_j|i for each output capsule j, (B, N, D) each
        predictions = routed_predictions(u_hat, iteration, iterations, gradient).unbind(dim=2)
        with layer_range(f"routing_iteration_{iteration + 1}"):
            # c_i = softmax(b_i) over j, written out
            largest = logits[0]
            for j in range(1, n_out):
                largest = torch.maximum(largest, logits[j])
            exps = [torch.exp(logits[j] - largest) for j in range(n_out)]
            total = exps[0]
            for j in range(1, n_out):
                total = total + exps[j]
            # s_j = sum_i c_ij u_hat_j|i ; v_j = squash(s_j)
            v = []
            for j in range(n_out):
                s_j = ((exps[j] / total).unsqueeze(-1) * predictions[j]).sum(dim=1)
                v.append(squash(s_j, eps))
            # b_ij <- b_ij + u_hat_j|i . v_j
            if iteration < iterations - 1:
                for j in range(n_out):
                    logits[j] = logits[j] + (predictions[j] * v[j].unsqueeze(1)).sum(dim=2)
            else:
                v = torch.stack(v, dim=1)
    return v

# Self-attention routing (harness.spec), differentiated by autograd: u_hat (B, N, J, D) -----------------------


def attention_squash(s, eps: float):
    """Efficient-CapsNet's squash, (1 - exp(-n)) s / n with n = sqrt(|s|^2 + eps), along the last axis."""
    norm = torch.sqrt((s * s).sum(dim=-1, keepdim=True) + eps)
    return s * (-torch.expm1(-norm) / norm)


def self_attention_vectorised(u_hat, bias, eps: float):
    """a_ij = u_hat_j|i . sum_k u_hat_j|k / sqrt(D), c = softmax_j(a) + b, v_j = squash(sum_i c_ij u_hat_j|i),
    as batched matrix products; ``bias`` (J, N); returns v (B, J, D)."""
    by_output = u_hat.transpose(1, 2)  # (B, J, N, D)
    with layer_range("attention"):
        total = by_output.sum(dim=2, keepdim=True)  # sum_k u_hat_j|k, (B, J, 1, D)
        logits = torch.matmul(by_output, total.transpose(2, 3)).squeeze(-1) / by_output.shape[-1] ** 0.5  # (B, J, N)
        coupling = torch.softmax(logits, dim=1) + bias  # over the output capsules j, then b_ji
    with layer_range("attention_sum"):
        return attention_squash(torch.matmul(coupling.unsqueeze(2), by_output).squeeze(2), eps)


def self_attention_looped(u_hat, bias, eps: float):
    """Self-attention routing transcribed line by line, with Python loops over the output capsules j (as
    :func:`routing_looped` has for dynamic routing); ``bias`` (J, N); returns v (B, J, D)."""
    n_out, dim = u_hat.shape[2], u_hat.shape[3]
    predictions = u_hat.unbind(dim=2)  # u_hat_j|i for each output capsule j, (B, N, D) each
    with layer_range("attention"):
        logits = []  # a_ij, one (B, N) tensor per j
        for j in range(n_out):
            total = predictions[j].sum(dim=1, keepdim=True)  # sum_k u_hat_j|k, (B, 1, D)
            logits.append((predictions[j] * total).sum(dim=2) / dim ** 0.5)
        largest = logits[0]
        for j in range(1, n_out):
            largest = torch.maximum(largest, logits[j])
        exps = [torch.exp(logits[j] - largest) for j in range(n_out)]
        total_exp = exps[0]
        for j in range(1, n_out):
            total_exp = total_exp + exps[j]
    with layer_range("attention_sum"):
        v = []
        for j in range(n_out):
            coupling = exps[j] / total_exp + bias[j]  # c_ij = softmax_j(a_ij) + b_ji
            v.append(attention_squash((coupling.unsqueeze(-1) * predictions[j]).sum(dim=1), eps))
    return torch.stack(v, dim=1)


# Backward written by hand (torch-fused): u_hat (B, J, N, D) ----------------------------------------------------


def squash_forward(s, eps: float, out=None):
    """|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) along the last axis."""
    squared = (s * s).sum(dim=-1, keepdim=True)
    return torch.mul(s, squared / ((1.0 + squared) * torch.sqrt(squared + eps)), out=out)


def squash_backward(s, grad_v, eps: float):
    """d loss / d s of the vector squash: the full Jacobian f I + 2 f' s s^T applied to grad_v."""
    squared = (s * s).sum(dim=-1, keepdim=True)
    one_plus = 1.0 + squared
    root = torch.sqrt(squared + eps)
    scale = squared / (one_plus * root)  # f(|s|^2)
    slope = (1.0 / one_plus - squared / (2.0 * (squared + eps))) / (one_plus * root)  # f'
    along = (s * grad_v).sum(dim=-1, keepdim=True)
    return torch.addcmul(scale * grad_v, s, 2.0 * slope * along)


def weighted_sum(coefficients, u_hat):
    """sum_i coefficients[b, j, i] u_hat[b, j, i]: (B, J, N) and (B, J, N, D) -> (B, J, D)."""
    return torch.matmul(coefficients.unsqueeze(2), u_hat).squeeze(2)


def agreement(u_hat, vectors):
    """u_hat[b, j, i] . vectors[b, j]: (B, J, N, D) and (B, J, D) -> (B, J, N), as the product
    (1 x D) @ (D x N) per (b, j): with u_hat as the left operand, (N x D) @ (D x 1), the BLAS's kernel for a
    tall matrix of short rows measured far slower than one pass over u_hat's memory."""
    batch, n_out, n_in, dim = u_hat.shape
    rows = u_hat.reshape(batch * n_out, n_in, dim).transpose(1, 2)
    return torch.bmm(vectors.reshape(batch * n_out, 1, dim), rows).view(batch, n_out, n_in)


def dynamic_arguments(params: dict, config) -> tuple:
    """What :class:`Routing` and :class:`FinalGradientRouting` take between u_hat and the workspace."""
    return config.routing_iterations, config.squash_eps


def routing_iterations(u_hat, iterations: int, eps: float) -> list:
    """Procedure 1's forward on u_hat (B, J, N, D): [c, s, v] of every iteration in turn, v (B, J, D) last."""
    batch, n_out, n_in, _ = u_hat.shape
    logits, cache = None, []
    for iteration in range(iterations):
        with layer_range(f"routing_iteration_{iteration + 1}", "forward"):
            if iteration == 0:  # softmax of b = 0: exactly 1 / J everywhere
                coupling = u_hat.new_full((batch, n_out, n_in), 1.0 / n_out)
            else:
                coupling = torch.softmax(logits, dim=1)  # over the output capsules j, for each input capsule i
            s = weighted_sum(coupling, u_hat)  # s_j = sum_i c_ij u_hat_j|i
            v = squash_forward(s, eps)
            cache += [coupling, s, v]
            if iteration < iterations - 1:
                agreed = agreement(u_hat, v)  # u_hat_j|i . v_j
                logits = agreed if logits is None else logits.add_(agreed)
    return cache


class Routing(_Function):
    """Procedure 1 on u_hat (B, J, N, D) -> v (B, J, D), with the backward of
    :func:`implementations.numpy.routing.routing_vectorised_backward`: through c and b of every iteration,
    the gradient of u_hat (2R - 1 rank-one terms per example and output capsule) written once by a batched
    product of the gathered coefficients; that product's range is iteration 1's."""

    arguments = staticmethod(dynamic_arguments)

    @staticmethod
    def forward(ctx, u_hat, iterations: int, eps: float, workspace):
        cache = routing_iterations(u_hat, iterations, eps)
        ctx.setup = (iterations, eps, workspace)
        ctx.save_for_backward(u_hat, *cache)
        return cache[-1]

    @staticmethod
    def backward(ctx, grad_v):
        iterations, eps, workspace = ctx.setup
        u_hat, *cache = ctx.saved_tensors
        batch, n_out, n_in, dim = u_hat.shape
        terms = 2 * iterations - 1
        left = workspace.get("routing:left", (batch, n_out, terms, n_in))  # coefficients over the input capsules
        right = workspace.get("routing:right", (batch, n_out, terms, dim))  # vectors over the capsule axis
        grad_logits_next = None  # d loss / d b_{r+1}
        for iteration in reversed(range(iterations)):
            with layer_range(f"routing_iteration_{iteration + 1}", "backward"):
                coupling, s, v = cache[3 * iteration : 3 * iteration + 3]
                if grad_logits_next is None:
                    grad_v_r = grad_v
                else:  # b_{r+1} = b_r + u_hat . v_r
                    grad_v_r = weighted_sum(grad_logits_next, u_hat)
                    left[:, :, iterations + iteration].copy_(grad_logits_next)
                    right[:, :, iterations + iteration].copy_(v)
                grad_s = squash_backward(s, grad_v_r, eps)
                left[:, :, iteration].copy_(coupling)
                right[:, :, iteration].copy_(grad_s)
                if iteration == 0:
                    break  # b_0 = 0 is a constant
                grad_coupling = agreement(u_hat, grad_s)
                grad_logits = coupling * (grad_coupling - (coupling * grad_coupling).sum(dim=1, keepdim=True))
                if grad_logits_next is not None:
                    grad_logits += grad_logits_next
                grad_logits_next = grad_logits
        with layer_range("routing_iteration_1", "backward"):
            grad_u_hat = workspace.get("routing:grad_u_hat", u_hat.shape)
            torch.bmm(left.view(batch * n_out, terms, n_in).transpose(1, 2), right.view(batch * n_out, terms, dim),
                      out=grad_u_hat.view(batch * n_out, n_in, dim))
        return grad_u_hat, None, None, None


class FinalGradientRouting(_Function):
    """Procedure 1 on u_hat (B, J, N, D) -> v (B, J, D) with the backward of the routing gradient ``final``
    (harness.spec): the last iteration's couplings are constants, so d loss / d u_hat_j|i = c_R,ij d loss /
    d s_R,j, one rank-one term per example and output capsule written by one broadcast product, with no
    earlier iteration visited (:func:`implementations.numpy.routing.routing_vectorised_final_backward`).
    Only c_R and s_R are kept for backward, not u_hat nor the earlier iterations."""

    arguments = staticmethod(dynamic_arguments)

    @staticmethod
    def forward(ctx, u_hat, iterations: int, eps: float, workspace):
        coupling, s, v = routing_iterations(u_hat, iterations, eps)[-3:]
        ctx.setup = (iterations, eps, workspace, u_hat.shape)
        ctx.save_for_backward(coupling, s)
        return v

    @staticmethod
    def backward(ctx, grad_v):
        iterations, eps, workspace, shape = ctx.setup
        coupling, s = ctx.saved_tensors
        with layer_range(f"routing_iteration_{iterations}", "backward"):
            grad_s = squash_backward(s, grad_v, eps)
            grad_u_hat = workspace.get("routing:grad_u_hat", shape)
            torch.mul(coupling.unsqueeze(-1), grad_s.unsqueeze(2), out=grad_u_hat)
        return grad_u_hat, None, None, None


def attention_squash_backward(s, grad_v, eps: float):
    """d loss / d s of :func:`attention_squash`: with f(n) = (1 - exp(-n)) / n, the Jacobian
    f I + (f'(n) / n) s s^T applied to grad_v, f'(n) = (n exp(-n) - (1 - exp(-n))) / n^2."""
    norm = torch.sqrt((s * s).sum(dim=-1, keepdim=True) + eps)
    rising = -torch.expm1(-norm)  # 1 - exp(-n)
    scale = rising / norm  # f(n)
    slope = (norm * torch.exp(-norm) - rising) / (norm * norm * norm)  # f'(n) / n
    along = (s * grad_v).sum(dim=-1, keepdim=True)
    return torch.addcmul(scale * grad_v, s, slope * along)


# u_hat's bytes in a block of examples that torch-fused's self-attention forward takes through all its steps at
# once on a single-threaded CPU, so that the block's second and third reads come from the cache (about half of
# a 2 MiB L2), not from memory
ATTENTION_BLOCK_BYTES = 1 << 20


def attention_blocks(u_hat) -> list[slice]:
    """The blocks of examples (slices of u_hat's batch axis) of :class:`SelfAttentionRouting`'s forward: on a
    CPU with one torch thread each about :data:`ATTENTION_BLOCK_BYTES` of u_hat (at least one example);
    otherwise the whole batch.  With more threads every operation is a parallel region whose end waits for
    its slowest thread, and on a loaded machine a thread waits for a core: blocks of four examples (six
    operations each) measured four times slower than the whole batch at 2 threads beside other work, and a
    fifth faster on an idle machine; one thread has no such wait, and its blocks measured a third faster."""
    batch = u_hat.shape[0]
    size = batch
    if u_hat.device.type == "cpu" and torch.get_num_threads() == 1:
        size = max(1, ATTENTION_BLOCK_BYTES // max(1, u_hat[0].numel() * u_hat.element_size()))
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


class SelfAttentionRouting(_Function):
    """Self-attention routing (harness.spec) on u_hat (B, J, N, D) and the bias b (J, N) -> v (B, J, D),
    ``apply(u_hat, bias, eps, workspace)``, with the backward written by hand.  Per example and output
    capsule j, with U the (N, D) block of u_hat_j|i, T = sum_k u_hat_j|k and p = softmax_j(a):

    * forward: T, a = U T / sqrt(D) (a batched product), c = p + b, s = c^T U (a batched product),
      v = squash(s).  The three read u_hat, and nothing couples the examples: so on a single-threaded CPU
      the forward runs block by block of about a MiB (:func:`attention_blocks`), each block's second and
      third reads from the cache;
    * backward: g_s from the squash, g_c = U g_s (a batched product; g_b = sum over the batch of g_c),
      g_a = p (g_c - sum_j p g_c), and, since a_ij = u_ij . T_j / sqrt(D) reads u_hat twice (directly and
      through T), d loss / d u_ij = c_ij g_s_j + g_a_ij T_j / sqrt(D) + G_j with G_j = sum_i g_a_ij u_ij /
      sqrt(D) the gradient of T_j, which reaches every input i: three rank-one terms per example and output
      capsule, written once by one batched product of inner dimension 3 (as :class:`Routing` gathers its
      2R - 1).  It reads u_hat twice and writes its gradient once, over the whole batch: in blocks it
      measured no faster (its first read, the agreement's product, costs about as much from the cache)."""

    @staticmethod
    def arguments(params: dict, config) -> tuple:
        """What ``apply`` takes between u_hat and the workspace."""
        return params[DIGIT_BIAS], config.squash_eps

    @staticmethod
    def forward(ctx, u_hat, bias, eps: float, workspace):
        batch, n_out, n_in, dim = u_hat.shape
        scale = dim ** -0.5
        total = workspace.get("attention:total", (batch, n_out, dim))  # T_j / sqrt(D)
        probabilities = []  # p = softmax_j(a), block by block
        coupling = workspace.get("attention:coupling", (batch, n_out, n_in))
        s = workspace.get("attention:s", (batch, n_out, dim))
        for rows in attention_blocks(u_hat):
            u = u_hat[rows]
            pairs = u.shape[0] * n_out
            with layer_range("attention", "forward"):
                t = torch.sum(u, dim=2, out=total[rows]).mul_(scale)  # sum_k u_hat_j|k / sqrt(D), (b, J, D)
                logits = agreement(u, t)  # a_ij = u_hat_j|i . T_j / sqrt(D), (b, J, N)
                p = torch.softmax(logits, dim=1)  # over the output capsules j, for each input capsule i
                probabilities.append(p)
                c = torch.add(p, bias, out=coupling[rows])  # c_ij = p_ij + b_ji
            with layer_range("attention_sum", "forward"):
                torch.bmm(c.view(pairs, 1, n_in), u.reshape(pairs, n_in, dim),
                          out=s[rows].view(pairs, 1, dim))  # s_j = sum_i c_ij u_hat_j|i
        with layer_range("attention_sum", "forward"):
            v = attention_squash(s, eps)
        probabilities = probabilities[0] if len(probabilities) == 1 else torch.cat(probabilities)
        ctx.setup = (eps, workspace)
        ctx.save_for_backward(u_hat, total, probabilities, coupling, s)
        return v

    @staticmethod
    def backward(ctx, grad_v):
        eps, workspace = ctx.setup
        u_hat, total, probabilities, coupling, s = ctx.saved_tensors
        batch, n_out, n_in, dim = u_hat.shape
        grad_u_hat = grad_bias = None
        with layer_range("attention_sum", "backward"):
            grad_s = attention_squash_backward(s, grad_v, eps)
            grad_coupling = agreement(u_hat, grad_s)  # u_hat_j|i . g_s_j, (B, J, N)
            if ctx.needs_input_grad[1]:
                grad_bias = grad_coupling.sum(dim=0)
        if not ctx.needs_input_grad[0]:
            return grad_u_hat, grad_bias, None, None
        with layer_range("attention", "backward"):
            left = workspace.get("attention:left", (batch, n_out, 3, n_in))  # c, g_a, 1 over the input capsules
            right = workspace.get("attention:right", (batch, n_out, 3, dim))  # g_s, T / sqrt(D), G over the axis
            weighted = grad_coupling.mul_(probabilities)  # p g_c
            grad_logits = torch.addcmul(weighted, probabilities, weighted.sum(dim=1, keepdim=True), value=-1.0,
                                        out=left[:, :, 1])  # g_a = p g_c - p sum_j p g_c
            left[:, :, 0].copy_(coupling)
            left[:, :, 2].fill_(1.0)
            right[:, :, 0].copy_(grad_s)
            right[:, :, 1].copy_(total)
            torch.mul(weighted_sum(grad_logits, u_hat), dim ** -0.5, out=right[:, :, 2])  # G_j = d loss / d T_j
            grad_u_hat = workspace.get("routing:grad_u_hat", u_hat.shape)
            torch.bmm(left.view(batch * n_out, 3, n_in).transpose(1, 2), right.view(batch * n_out, 3, dim),
                      out=grad_u_hat.view(batch * n_out, n_in, dim))
        return grad_u_hat, grad_bias, None, None


# The table --------------------------------------------------------------------------------------------------


class TorchRouting(NamedTuple):
    """The routing of one (routing algorithm, routing variant, routing gradient): by autograd, and with a
    hand-written backward where there is one."""

    autograd: Callable
    hand_written: type | None




HAND_WRITTEN = {("dynamic", "vectorised", "full"): Routing, ("dynamic", "vectorised", "final"): FinalGradientRouting,
                ("self-attention", "vectorised", "full"): SelfAttentionRouting}
ROUTING = {
    **{("dynamic", variant, gradient): TorchRouting(dynamic_entry(function, gradient),
                                                    HAND_WRITTEN.get(("dynamic", variant, gradient)))
       for variant, function in (("vectorised", routing_vectorised), ("looped", routing_looped))
       for gradient in ROUTING_ALGORITHM_GRADIENTS["dynamic"]},
    **{("self-attention", variant, gradient): TorchRouting(self_attention_entry(function),
                                                           HAND_WRITTEN.get(("self-attention", variant, gradient)))
       for variant, function in (("vectorised", self_attention_vectorised), ("looped", self_attention_looped))
       for gradient in ROUTING_ALGORITHM_GRADIENTS["self-attention"]},
}
