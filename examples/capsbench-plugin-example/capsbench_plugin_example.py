"""A capsbench plugin: the torch CapsNet with routing written as batched matrix products."""

import torch

from harness.registry import register
from implementations.torch_capsnet import TorchCapsNet, squash


def routing_matmul(u_hat, iterations, eps):
    """Procedure 1 with the sums over capsules as torch.matmul on a (B, J, N, D) copy of u_hat."""
    u = u_hat.permute(0, 2, 1, 3)  # (B, J, N, D)
    logits = u.new_zeros(u.shape[:3])  # b_ij, stored (B, J, N)
    for iteration in range(iterations):
        coupling = torch.softmax(logits, dim=1)  # over the output capsules j
        v = squash(torch.matmul(coupling.unsqueeze(2), u).squeeze(2), eps)  # (B, J, D)
        if iteration < iterations - 1:
            logits = logits + torch.matmul(u, v.unsqueeze(-1)).squeeze(-1)
    return v


class TorchMatmulRouting(TorchCapsNet):
    """Everything as in torch-vectorised except the routing function."""

    def route(self, u_hat):
        return routing_matmul(u_hat, self.config.routing_iterations, self.config.squash_eps)


register("example-torch-matmul", TorchMatmulRouting, device="cpu", routing="vectorised")
