"""A capsbench plugin that brings a routing algorithm: inverted dot-product attention routing.

Tsai, Srivastava, Goh & Salakhutdinov (2020), "Capsules with Inverted Dot-Product Attention Routing" (ICLR),
Procedure 1, as the authors' ``CapsuleFC`` layer computes it (apple/ml-capsules-inverted-attention-routing,
``src/layers.py``, vector poses).  With v_ij = u_hat_j|i the vote of child i for parent j (u_hat (B, N, J, D)),
D = ``digit_caps_dim`` and R = ``routing_iterations`` computations of the parents' poses p:

    iteration 1:        r_ij = 1 / J                                (the poses start at 0: softmax of a = 0)
    every iteration:    p_j = LayerNorm(sum_i r_ij v_ij)            (gamma, beta: ``digit.norm.weight``, ``.bias``)
    before iteration t: a_ij = p_j . v_ij / sqrt(D),  r_ij = softmax_j(a_ij)   (over the parents j)

and v = p of the last iteration.  LayerNorm over the D components of each pose: (x - mean) / sqrt(var + 1e-5)
* gamma + beta, var the biased variance (torch.nn.LayerNorm(D) as the authors build it); gamma and beta, shape
(D,), are shared by the J parents and start at 1 and 0: the two parameters this algorithm adds to the network.
Choices of the authors' code that the paper's text leaves open, followed: the agreement is scaled by
1 / sqrt(D) (their ``self.scale``); the softmax runs over the parents; R counts the computations of p (their
``num_routing``, the first with uniform coefficients).  Left out: their renormalisation r / (sum_j r + 1e-10)
(a factor 1 / (1 + 1e-10): nothing in float32, 1e-10 relative in float64) and their dropout (rate 0 by default).
Their network classifies the parents' poses with a linear layer; capsbench keeps the paper CapsNet's margin
loss on the lengths |v_j| under every routing algorithm, and LayerNorm at its initial gamma = 1, beta = 0 makes
every length sqrt(D var / (var + 1e-5)), nearly sqrt(D) for all J parents once var >> 1e-5: this measures the
routing's cost and parity, not its accuracy.

The routing gradient ``final`` (harness.spec) stops the gradient of the votes in every iteration but the last,
as it does for dynamic routing: the agreements that set the last iteration's coefficients are computed, like
dynamic routing's logit update, in the iteration before, from stopped votes.  gamma and beta get their gradient
through every iteration under both settings (only the votes are stopped).

:func:`reference` is the algorithm's definition, differentiated by torch autograd (capsbench's torch-vectorised
computes the algorithm with it, so torch-vectorised float64 is its reference); :class:`TorchInvertedAttention`
is an implementation of its own: batched matrix products on the (B, J, N, D) layout and a backward written by
hand (:class:`InvertedAttentionRouting`).
"""

import math

import numpy as np
import torch

from harness.registry import RoutingAlgorithm, register, register_routing_algorithm
from harness.spec import ROUTING_GRADIENTS
from implementations.torch.autograd import TorchCapsNet

NAME = "inverted-attention"
NORM_WEIGHT, NORM_BIAS = "digit.norm.weight", "digit.norm.bias"  # LayerNorm's gamma and beta, shape (D,)
NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the authors' layer keeps


def parameters(config):
    """The canonical parameters the algorithm adds: LayerNorm's gamma and beta over the D pose components."""
    return {NORM_WEIGHT: (config.digit_caps_dim,), NORM_BIAS: (config.digit_caps_dim,)}


def initial(name, shape, rng):
    """gamma starts at 1 and beta at 0, as torch.nn.LayerNorm's (nothing drawn from ``rng``)."""
    return np.ones(shape) if name == NORM_WEIGHT else np.zeros(shape)


def reference(u_hat, params, config):
    """Procedure 1 on u_hat (B, N, J, D) -> v (B, J, D), by torch autograd, in the paper's indices: the
    softmax over the parents j (axis 2), the sum over the children i (axis 1)."""
    iterations, dim = config.routing_iterations, u_hat.shape[-1]
    agreement = torch.zeros_like(u_hat[..., 0])  # a_ij, (B, N, J): the poses start at 0
    for iteration in range(iterations):
        stopped = config.routing_gradient == "final" and iteration < iterations - 1
        votes = u_hat.detach() if stopped else u_hat
        routing = torch.softmax(agreement, dim=2)  # r_ij
        pose = torch.nn.functional.layer_norm((routing.unsqueeze(-1) * votes).sum(dim=1), (dim,),
                                              params[NORM_WEIGHT], params[NORM_BIAS], NORM_EPS)  # p_j, (B, J, D)
        if iteration < iterations - 1:
            agreement = (votes * pose.unsqueeze(1)).sum(dim=-1) / math.sqrt(dim)  # a_ij = p_j . v_ij / sqrt(D)
    return pose


ALGORITHM = register_routing_algorithm(RoutingAlgorithm(
    NAME, "Tsai, Srivastava, Goh & Salakhutdinov (2020), Capsules with Inverted Dot-Product Attention Routing, "
    "Procedure 1 (the authors' CapsuleFC)", iterative=True, routing_gradients=ROUTING_GRADIENTS,
    parameters=parameters, initial=initial, reference=reference))


class InvertedAttentionRouting(torch.autograd.Function):
    """The routing on votes laid out (B, J, N, D) -> v (B, J, D), each sum over the children a batched matrix
    product, LayerNorm written out, and the backward by hand: through the LayerNorm, the weighted sum, the
    softmax and the agreement of every iteration, back to the votes (under ``final`` from the last weighted sum
    alone) and to gamma and beta."""

    @staticmethod
    def forward(ctx, votes, gamma, beta, iterations: int, final: bool):
        batch, n_out, n_in, dim = votes.shape
        scale = 1.0 / math.sqrt(dim)
        routing = votes.new_full((batch, n_out, n_in), 1.0 / n_out)
        saved = []
        for iteration in range(iterations):
            total = torch.matmul(routing.unsqueeze(2), votes).squeeze(2)  # sum_i r_ij v_ij, (B, J, D)
            centred = total - total.mean(dim=-1, keepdim=True)
            inverse_std = torch.rsqrt((centred * centred).mean(dim=-1, keepdim=True) + NORM_EPS)
            normalised = centred * inverse_std
            pose = normalised * gamma + beta
            saved += [routing, normalised, inverse_std, pose]
            if iteration < iterations - 1:
                agreement = torch.matmul(votes, pose.unsqueeze(-1)).squeeze(-1) * scale  # (B, J, N)
                routing = torch.softmax(agreement, dim=1)  # over the parents j
        ctx.setup = (iterations, final, scale)
        ctx.save_for_backward(votes, gamma, *saved)
        return pose

    @staticmethod
    def backward(ctx, grad_pose):
        iterations, final, scale = ctx.setup
        votes, gamma, *saved = ctx.saved_tensors
        grad_votes = torch.zeros_like(votes)
        grad_gamma, grad_beta = torch.zeros_like(gamma), torch.zeros_like(gamma)
        for iteration in reversed(range(iterations)):
            routing, normalised, inverse_std = saved[4 * iteration : 4 * iteration + 3]
            grad_gamma += (grad_pose * normalised).sum(dim=(0, 1))
            grad_beta += grad_pose.sum(dim=(0, 1))
            grad_normalised = grad_pose * gamma
            grad_total = inverse_std * (grad_normalised - grad_normalised.mean(dim=-1, keepdim=True)
                                        - normalised * (grad_normalised * normalised).mean(dim=-1, keepdim=True))
            if not final or iteration == iterations - 1:  # this iteration's weighted sum reads the votes
                grad_votes += routing.unsqueeze(-1) * grad_total.unsqueeze(2)
            if iteration == 0:
                break  # uniform coefficients: nothing before them
            grad_routing = torch.matmul(votes, grad_total.unsqueeze(-1)).squeeze(-1)  # (B, J, N)
            grad_agreement = scale * routing * (grad_routing - (routing * grad_routing).sum(dim=1, keepdim=True))
            previous_pose = saved[4 * iteration - 1]
            if not final:  # the agreement reads the previous iteration's votes, stopped under final
                grad_votes += grad_agreement.unsqueeze(-1) * previous_pose.unsqueeze(2)
            grad_pose = torch.matmul(grad_agreement.unsqueeze(2), votes).squeeze(2)  # d loss / d previous pose
        return grad_votes, grad_gamma, grad_beta, None, None


class TorchInvertedAttention(TorchCapsNet):
    """torch-vectorised's network with inverted dot-product attention routing of its own."""

    routing_algorithms = (NAME,)  # overriding route, it declares what its routing computes
    routing_gradients = ROUTING_GRADIENTS

    def route(self, u_hat):
        votes = u_hat.transpose(1, 2).contiguous()  # (B, J, N, D): already so laid out from prediction_vectors
        return InvertedAttentionRouting.apply(votes, self.params[NORM_WEIGHT], self.params[NORM_BIAS],
                                              self.config.routing_iterations,
                                              self.config.routing_gradient == "final")


register("example-inverted-attention", TorchInvertedAttention, device="cpu", routing_variant="vectorised")
