"""A capsbench plugin: the torch CapsNet with routing written as einsum on the canonical (B, N, J, D) layout."""

import torch

from harness.registry import register
from implementations.torch_capsnet import TorchCapsNet, squash


def routing_einsum(u_hat, iterations, eps):
    """Procedure 1 with the sums over capsules as torch.einsum, indices as in the paper."""
    logits = u_hat.new_zeros(u_hat.shape[:3])  # b_ij, (B, N, J)
    for iteration in range(iterations):
        coupling = torch.softmax(logits, dim=2)  # over the output capsules j
        v = squash(torch.einsum("bij,bijd->bjd", coupling, u_hat), eps)
        if iteration < iterations - 1:
            logits = logits + torch.einsum("bijd,bjd->bij", u_hat, v)
    return v


class TorchEinsumRouting(TorchCapsNet):
    """Everything as in torch-vectorised except the routing function."""

    def route(self, u_hat):
        return routing_einsum(u_hat, self.config.routing_iterations, self.config.squash_eps)


register("example-torch-einsum", TorchEinsumRouting, device="cpu", routing_variant="vectorised")
