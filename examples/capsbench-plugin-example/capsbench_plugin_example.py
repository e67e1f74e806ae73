"""A capsbench plugin: the torch CapsNet with routing written as einsum on the canonical (B, N, J, D) layout."""

import torch

from harness.registry import register
from harness.spec import ROUTING_GRADIENTS
from implementations.torch.autograd import TorchCapsNet
from implementations.torch.routing import routed_predictions, squash


def routing_einsum(u_hat, iterations, eps, gradient="full"):
    """Procedure 1 with the sums over capsules as torch.einsum, indices as in the paper; under the routing
    gradient ``final`` the iterations before the last read u_hat with its gradient stopped (harness.spec)."""
    logits = u_hat.new_zeros(u_hat.shape[:3])  # b_ij, (B, N, J)
    for iteration in range(iterations):
        u = routed_predictions(u_hat, iteration, iterations, gradient)
        coupling = torch.softmax(logits, dim=2)  # over the output capsules j
        v = squash(torch.einsum("bij,bijd->bjd", coupling, u), eps)
        if iteration < iterations - 1:
            logits = logits + torch.einsum("bijd,bjd->bij", u, v)
    return v


class TorchEinsumRouting(TorchCapsNet):
    """Everything as in torch-vectorised except the routing function."""

    routing_gradients = ROUTING_GRADIENTS  # overriding route, it declares what its routing computes

    def route(self, u_hat):
        return routing_einsum(u_hat, self.config.routing_iterations, self.config.squash_eps,
                              self.config.routing_gradient)


register("example-torch-einsum", TorchEinsumRouting, device="cpu", routing_variant="vectorised")
