"""``torch-fused`` and ``torch-fused-cuda``: CapsNet in PyTorch with the backward written by hand, to show how
close a torch training step comes to the GEMM peak.

The autograd reference (:mod:`implementations.torch.autograd`) stays as it is; this one subclasses it for
everything the contract asks besides the network (data, optimizer state, allocator peaks, the PCI bus id)
and replaces the network's forward with ``torch.autograd.Function`` s whose backward is written by hand.
Why: autograd keeps every intermediate of every routing iteration and builds the gradient of u_hat one
rank-one term at a time, with layout copies of u_hat between them; and the PrimaryCaps convolution, which
is almost all the FLOPs of a step, goes through the framework's convolution whether or not its kernels suit
this shape.  What is written by hand, each with the profiler's ranges (:mod:`harness.ranges`) in its forward
and in its backward:

* the convolutions (:class:`Convolution`: Conv1 with its ReLU, and PrimaryCaps): NHWC activations and
  channels-last weights, so that a weight is a (out, kh * kw * in) matrix without a copy.  Each of the three
  products (forward, weight gradient, input gradient) is done the way that measures fastest on the machine
  it runs on: at the first step of a batch shape the model times every candidate on that shape and keeps
  the fastest, cached per machine, torch version, device, dtype, shape and threads
  (:func:`choose_plan`, :mod:`implementations.torch._conv_plans`; the candidates are in :data:`FORWARD`,
  :data:`WEIGHT_GRADIENT` and :data:`INPUT_GRADIENT`, and ``python -m implementations.torch.fused`` prints
  the measured table): an im2col copy and one GEMM, the framework's own convolution (oneDNN, cuDNN), one
  product per kernel offset accumulated in place, one per kernel row, one large product and col2im, or the
  products in the Fourier domain (:mod:`implementations.torch._spectral`: every transform a GEMM, and
  fewer multiply-adds than the direct convolution that :mod:`harness.measure.flops` counts, so a plan that uses it
  runs at an *effective* rate, possibly above the machine's peak);
* PrimaryCaps' squash together with the regrouping of the convolution's channels into capsules
  (:class:`PrimarySquash`);
* the prediction vectors (:class:`PredictionVectors`), written once in the (B, J, N, D) layout that the
  routing consumes (``u_hat_layout`` "BJND"), with no autograd layout copies around them;
* the routing (:class:`~implementations.torch.routing.Routing`), exactly the mathematics of
  :func:`implementations.numpy.routing.routing_vectorised_forward` and ``..._backward``: c = 1/J in the
  first iteration, gradients through c and b of every iteration, the gradient of u_hat written once by one
  batched product of inner dimension 2R - 1 from gathered coefficients; under the routing gradient
  ``final`` (:class:`~implementations.torch.routing.FinalGradientRouting`) the last iteration's weighted
  sum alone, one broadcast product; under the routing algorithm ``self-attention``
  (:class:`~implementations.torch.routing.SelfAttentionRouting`) the agreement with T_j = sum_k u_hat_j|k,
  the softmax over j plus the bias ``digit.bias`` (a parameter of the module then, updated by the same
  Adam) and the weighted sum, its gradient of u_hat three rank-one terms per example and output capsule
  written by one batched product, and the bias's gradient beside it.

Lengths, mask, decoder and losses stay with autograd: a small part of the work, with no layout to fix.

Workspaces: every large activation, im2col matrix and gradient buffer is allocated once per batch shape
and reused (:class:`Workspace`): on the CPU a fresh large tensor is fresh pages, and their faults cost a
measurable part of a step.  So a forward pass reuses the buffers that a pending backward needs; an
inference ``forward`` therefore ends any pending ``forward_loss`` (``backward`` then asks for a new one),
as in the NumPy implementation, and autograd's version counters catch any other reuse.  The routing-alone
calls of the contract (``routing_forward``, ``routing_backward``) keep buffers of their own, reused call to
call, like NumPy's; ``prediction_vectors`` (not timed) allocates afresh.

The optimizer is ``torch.optim.Adam(fused=True)`` (one kernel for all parameters; ``foreach`` where the
build has no fused kernel for the device).

CUDA: the same code with device tensors (nothing in the hot path leaves the device or assumes the CPU); on
a GPU the same measurement chooses between cuDNN and the alternatives.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

from harness.params import DIGIT_WEIGHT
from harness.ranges import layer_range
from harness.registry import register
from harness.settings import CONV_PLAN_ENV
from harness.spec import ADAM, PAPER, ROUTING_ALGORITHMS, ROUTING_GRADIENTS, CapsNetConfig, conv_output_size
from implementations.torch import _conv_plans as conv_plans
from implementations.torch import _spectral as spectral
from implementations.torch.autograd import F, TorchCapsNet, capsule_lengths, decoder, mask_capsules, torch
from implementations.torch.routing import ROUTING, squash_backward, squash_forward

_Function = torch.autograd.Function if torch is not None else object
_Module = torch.nn.Module if torch is not None else object
CONV_WEIGHTS = ("conv1.weight", "primary.weight")


# Workspaces ------------------------------------------------------------------------------------------------


class Workspace:
    """Buffers reused across steps, each reallocated only when its shape changes (a new batch size).

    ``get`` hands out a new view of the kept buffer on every call, so no graph is attached to the buffer
    itself; the view shares the buffer's version counter, so autograd notices a saved buffer that a later
    forward pass overwrote.  With ``keep=False`` every call allocates (the routing-alone calls).
    """

    def __init__(self, dtype, device, keep: bool = True) -> None:
        self.dtype, self.device, self.keep = dtype, device, keep
        self.buffers: dict = {}

    def get(self, key: str, shape: tuple):
        shape = tuple(shape)
        buffer = self.buffers.get(key) if self.keep else None
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
            if self.keep:
                self.buffers[key] = buffer
        return buffer.view(shape)

    def zeros(self, key: str, shape: tuple):
        return self.get(key, shape).zero_()


# Convolutions on NHWC activations --------------------------------------------------------------------------


def im2col(x, kernel: int, stride: int, out):
    """NHWC ``x`` (B, H, W, C) -> ``out`` (B * Ho * Wo, kh * kw * C), columns in (kh, kw, C) order: one copy
    from a strided window view (each row of a window, kw * C values, is contiguous in NHWC)."""
    batch, height, width, channels = x.shape
    out_h, out_w = conv_output_size(height, kernel, stride), conv_output_size(width, kernel, stride)
    s_b, s_h, s_w, s_c = x.stride()
    windows = x.as_strided((batch, out_h, out_w, kernel, kernel, channels),
                           (s_b, s_h * stride, s_w * stride, s_h, s_w, s_c))
    out.view(windows.shape).copy_(windows)
    return out


def nhwc(images):
    """NCHW images -> an NHWC copy with the strides of a freshly made NHWC tensor.  ``permute(...).contiguous()``
    is not that for one channel: it returns the images' own memory, whose strides (size-1 channel axis
    aside) read as NCHW to oneDNN, which then converts the output gradient's layout in Conv1's weight
    gradient (measured 4 to 5 times slower)."""
    batch, channels, height, width = images.shape
    return images.new_empty((batch, height, width, channels)).copy_(images.permute(0, 2, 3, 1))


def weight_matrix(weight):
    """(O, C, kh, kw) -> (O, kh * kw * C): a view of a channels-last weight."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def window(x, i: int, j: int, stride: int, out_h: int, out_w: int):
    """The strided (B, Ho, Wo, C) view of NHWC ``x`` that kernel offset (i, j) reads."""
    return x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]


def _nchw(x):
    """An NHWC tensor as the NCHW-shaped, channels-last tensor the framework's convolution takes (a view)."""
    return x.permute(0, 3, 1, 2)


def _library_backward(grad_rows, x, weight, stride: int, out_h: int, out_w: int, mask: list):
    grad_out = _nchw(grad_rows.view(x.shape[0], out_h, out_w, weight.shape[0]))
    return torch.ops.aten.convolution_backward(grad_out, _nchw(x), weight, None, [stride, stride], [0, 0], [1, 1],
                                               False, [0, 0], 1, mask)


def forward_im2col_gemm(x, weight, bias, kernel, stride, workspace, name):
    """im2col into the workspace, then one GEMM with the bias; the patch matrix is kept for the weight
    gradient."""
    batch, height, width, channels = x.shape
    rows = batch * conv_output_size(height, kernel, stride) * conv_output_size(width, kernel, stride)
    cols = im2col(x, kernel, stride, workspace.get(f"{name}:cols", (rows, kernel * kernel * channels)))
    out = workspace.get(f"{name}:out", (rows, weight.shape[0]))
    torch.addmm(bias, cols, weight_matrix(weight).t(), out=out)
    return out, {"patches": cols}


def forward_library(x, weight, bias, kernel, stride, workspace, name):
    """The framework's convolution on the channels-last view (oneDNN on the CPU, cuDNN on CUDA)."""
    out = F.conv2d(_nchw(x), weight, bias, stride=stride).permute(0, 2, 3, 1)
    return out.reshape(-1, weight.shape[0]), {}


def forward_offsets(x, weight, bias, kernel, stride, workspace, name):
    """One GEMM per kernel offset (its window copied into a small buffer) accumulated into the output."""
    batch, height, width, channels = x.shape
    out_h, out_w = conv_output_size(height, kernel, stride), conv_output_size(width, kernel, stride)
    out = workspace.get(f"{name}:out", (batch * out_h * out_w, weight.shape[0]))
    out.copy_(bias.expand_as(out))
    patch = workspace.get(f"{name}:window", (batch, out_h, out_w, channels))
    for i in range(kernel):
        for j in range(kernel):
            patch.copy_(window(x, i, j, stride, out_h, out_w))
            out.addmm_(patch.view(-1, channels), weight[:, :, i, j].t())
    return out, {}


def weight_gradient_im2col_gemm(grad_rows, x, kept, weight, kernel, stride, workspace, name):
    """One GEMM with the patch matrix (the one the forward kept, or built here)."""
    cols = kept.get("patches")
    if cols is None:
        batch, height, width, channels = x.shape
        cols = im2col(x, kernel, stride, workspace.get(f"{name}:cols", (grad_rows.shape[0], kernel**2 * channels)))
    out, channels = weight.shape[0], weight.shape[1]
    return torch.mm(grad_rows.t(), cols).view(out, kernel, kernel, channels).permute(0, 3, 1, 2)


def weight_gradient_library(grad_rows, x, kept, weight, kernel, stride, workspace, name):
    out_h, out_w = conv_output_size(x.shape[1], kernel, stride), conv_output_size(x.shape[2], kernel, stride)
    return _library_backward(grad_rows, x, weight, stride, out_h, out_w, [False, True, False])[1]


def weight_gradient_offsets(grad_rows, x, kept, weight, kernel, stride, workspace, name):
    """One GEMM per kernel offset with its window, written into that offset's columns."""
    batch, height, width, channels = x.shape
    out_h, out_w = conv_output_size(height, kernel, stride), conv_output_size(width, kernel, stride)
    grad = torch.empty((weight.shape[0], kernel, kernel, channels), dtype=grad_rows.dtype, device=grad_rows.device)
    patch = workspace.get(f"{name}:window", (batch, out_h, out_w, channels))
    for i in range(kernel):
        for j in range(kernel):
            patch.copy_(window(x, i, j, stride, out_h, out_w))
            torch.mm(grad_rows.t(), patch.view(-1, channels), out=grad[:, i, j, :])
    return grad.permute(0, 3, 1, 2)


def input_gradient_offsets(grad_rows, x, kept, weight, kernel, stride, workspace, name):
    """One GEMM per kernel offset (grad_out @ W_ij) added into that offset's strided input window."""
    batch, height, width, channels = x.shape
    out_h, out_w = conv_output_size(height, kernel, stride), conv_output_size(width, kernel, stride)
    grad = workspace.zeros(f"{name}:grad_input", x.shape)
    product = workspace.get(f"{name}:grad_window", (grad_rows.shape[0], channels))
    for i in range(kernel):
        for j in range(kernel):
            torch.mm(grad_rows, weight[:, :, i, j], out=product)
            window(grad, i, j, stride, out_h, out_w).add_(product.view(batch, out_h, out_w, channels))
    return grad


def input_gradient_rows(grad_rows, x, kept, weight, kernel, stride, workspace, name):
    """One GEMM per kernel row (grad_out @ W_i, kw * C wide), then a strided add per offset of the row."""
    batch, height, width, channels = x.shape
    out_h, out_w = conv_output_size(height, kernel, stride), conv_output_size(width, kernel, stride)
    grad = workspace.zeros(f"{name}:grad_input", x.shape)
    product = workspace.get(f"{name}:grad_row", (grad_rows.shape[0], kernel * channels))
    by_offset = product.view(batch, out_h, out_w, kernel, channels)
    per_row = weight.permute(2, 0, 3, 1)  # (kh, O, kw, C), a view of a channels-last weight
    for i in range(kernel):
        torch.mm(grad_rows, per_row[i].reshape(weight.shape[0], kernel * channels), out=product)
        for j in range(kernel):
            window(grad, i, j, stride, out_h, out_w).add_(by_offset[:, :, :, j])
    return grad


def input_gradient_col2im(grad_rows, x, kept, weight, kernel, stride, workspace, name):
    """One large GEMM (the patch-gradient matrix, as large as the im2col matrix), then col2im by strided adds."""
    batch, height, width, channels = x.shape
    out_h, out_w = conv_output_size(height, kernel, stride), conv_output_size(width, kernel, stride)
    grad = workspace.zeros(f"{name}:grad_input", x.shape)
    patches = workspace.get(f"{name}:grad_cols", (grad_rows.shape[0], kernel * kernel * channels))
    torch.mm(grad_rows, weight_matrix(weight), out=patches)
    by_offset = patches.view(batch, out_h, out_w, kernel, kernel, channels)
    for i in range(kernel):
        for j in range(kernel):
            window(grad, i, j, stride, out_h, out_w).add_(by_offset[:, :, :, i, j])
    return grad


def input_gradient_library(grad_rows, x, kept, weight, kernel, stride, workspace, name):
    out_h, out_w = conv_output_size(x.shape[1], kernel, stride), conv_output_size(x.shape[2], kernel, stride)
    grad = _library_backward(grad_rows, x, weight, stride, out_h, out_w, [True, False, False])[0]
    return grad.permute(0, 2, 3, 1).contiguous()


# Every strategy of a product, by name.  A forward returns its output rows and a dict of what the backward
# may reuse ("patches": the im2col matrix; the spectral strategy's spectra); the backward's products take that
# dict (the spectral weight gradient adds the output gradient's spectrum to it for the input gradient).
FORWARD = {"im2col-gemm": forward_im2col_gemm, "library": forward_library, "offsets": forward_offsets,
           "spectral": spectral.forward}
WEIGHT_GRADIENT = {"im2col-gemm": weight_gradient_im2col_gemm, "library": weight_gradient_library,
                   "offsets": weight_gradient_offsets, "spectral": spectral.weight_gradient}
INPUT_GRADIENT = {"offsets": input_gradient_offsets, "rows": input_gradient_rows, "col2im": input_gradient_col2im,
                  "library": input_gradient_library, "spectral": spectral.input_gradient}


@dataclass(frozen=True)
class ConvPlan:
    """How each product of one convolution is done: keys of FORWARD, WEIGHT_GRADIENT and INPUT_GRADIENT."""

    forward: str
    weight: str
    input: str


@dataclass(frozen=True)
class Plan:
    conv1: ConvPlan
    primary: ConvPlan


# Per device, the plan used where none is measured ($CAPSBENCH_CONV_PLAN=fixed) and for the product no
# measurement covers (Conv1's input gradient, never needed).  A model chooses its own at the first step of a
# batch shape (:func:`choose_plan`).  The CPU's was the fastest of whole training steps on the first machine
# measured; CUDA's is the framework's convolution (cuDNN) throughout.
PLANS = {
    "cpu": Plan(conv1=ConvPlan("im2col-gemm", "im2col-gemm", "offsets"),
                primary=ConvPlan("im2col-gemm", "im2col-gemm", "offsets")),
    "cuda": Plan(conv1=ConvPlan("library", "library", "library"),
                 primary=ConvPlan("library", "library", "library")),
}


class Convolution(_Function):
    """A valid convolution of an NHWC input (B, H, W, C) with a (O, C, kh, kw) weight (channels-last memory)
    and a bias, optionally followed by a ReLU; returns the NHWC output as rows (B * Ho * Wo, O).  The ranges
    are the caller's (forward) and ``layer`` 's (backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel: int, stride: int, relu: bool, plan: ConvPlan, workspace, layer: str):
        out, kept = FORWARD[plan.forward](x, weight, bias, kernel, stride, workspace, layer)
        if relu:
            out.clamp_min_(0.0)
        ctx.setup = (kernel, stride, relu, plan, workspace, layer, tuple(kept))
        ctx.save_for_backward(x, weight, out if relu else None, *kept.values())
        return out

    @staticmethod
    def backward(ctx, grad_out):
        kernel, stride, relu, plan, workspace, layer, kept_names = ctx.setup
        x, weight, out, *kept_tensors = ctx.saved_tensors
        kept = dict(zip(kept_names, kept_tensors))
        grad_x = grad_weight = grad_bias = None
        with layer_range(layer, "backward"):
            grad_rows = grad_out.contiguous()
            if relu:
                masked = workspace.get(f"{layer}:grad_out", grad_rows.shape)
                grad_rows = torch.ops.aten.threshold_backward.grad_input(grad_rows, out, 0.0, grad_input=masked)
            if ctx.needs_input_grad[2]:
                grad_bias = grad_rows.sum(dim=0)
            if ctx.needs_input_grad[1]:
                grad_weight = WEIGHT_GRADIENT[plan.weight](grad_rows, x, kept, weight, kernel, stride, workspace, layer)
            if ctx.needs_input_grad[0]:
                grad_x = INPUT_GRADIENT[plan.input](grad_rows, x, kept, weight, kernel, stride, workspace, layer)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


# Capsules ----------------------------------------------------------------------------------------------------


class PrimarySquash(_Function):
    """The PrimaryCaps output rows (B * H * W, T * D), NHWC, -> squashed capsules u (B, T * H * W, D) in the
    capsule order of :mod:`harness.spec` (type-major, then pixel); the regrouping and the squash in one."""

    @staticmethod
    def forward(ctx, rows, batch: int, types: int, dim: int, eps: float, workspace):
        pixels = rows.shape[0] // batch
        s = workspace.get("primary_squash:s", (batch, types, pixels, dim))
        s.copy_(rows.view(batch, pixels, types, dim).permute(0, 2, 1, 3))
        s = s.view(batch, types * pixels, dim)
        u = squash_forward(s, eps, out=workspace.get("primary_squash:u", s.shape))
        ctx.setup = (batch, types, pixels, dim, eps, workspace)
        ctx.save_for_backward(s)
        return u

    @staticmethod
    def backward(ctx, grad_u):
        batch, types, pixels, dim, eps, workspace = ctx.setup
        (s,) = ctx.saved_tensors
        with layer_range("primary_squash", "backward"):
            grad_s = squash_backward(s, grad_u, eps)
            grad_rows = workspace.get("primary_squash:grad_rows", (batch, pixels, types, dim))
            grad_rows.copy_(grad_s.view(batch, types, pixels, dim).permute(0, 2, 1, 3))
        return grad_rows.view(batch * pixels, types * dim), None, None, None, None, None


class PredictionVectors(_Function):
    """u_hat[b, j, i] = W_ij u[b, i]: u (B, N, K) and W (N, J, D, K) -> u_hat (B, J, N, D), the layout the
    routing consumes.  Forward: one batched product per output capsule j (over the input capsules), each
    written into u_hat[:, j] through a small buffer.  Backward: the gradient regrouped by input capsule
    (one copy into a kept buffer), then two batched products over the input capsules, each with the capsule
    dimension K as its rows (d W_i^T = u_i^T G_i, d u_i^T = W_i^T G_i^T), which measured faster than
    the same products with K as the output's columns (the BLAS's small-matrix kernels do poorly there)."""

    @staticmethod
    def forward(ctx, u, weight, workspace):
        batch, n_in, dim_in = u.shape
        _, n_out, dim, _ = weight.shape
        u_hat = workspace.get("u_hat", (batch, n_out, n_in, dim))
        by_input = u.transpose(0, 1)  # (N, B, K)
        product = workspace.get("u_hat:product", (n_in, batch, dim))
        for j in range(n_out):
            torch.bmm(by_input, weight[:, j].transpose(1, 2), out=product)
            u_hat[:, j].copy_(product.transpose(0, 1))
        ctx.workspace = workspace
        ctx.save_for_backward(u, weight)
        return u_hat

    @staticmethod
    def backward(ctx, grad_u_hat):
        u, weight = ctx.saved_tensors
        batch, n_out, n_in, dim = grad_u_hat.shape
        dim_in = u.shape[2]
        with layer_range("u_hat", "backward"):
            by_input = ctx.workspace.get("u_hat:grad_by_input", (n_in, batch, n_out, dim))
            by_input.copy_(grad_u_hat.permute(2, 0, 1, 3))
            rows = by_input.view(n_in, batch, n_out * dim)  # per input capsule, (B, J * D)
            # both products with the capsule dimension K (small) as their rows, not their columns
            grad_weight = torch.bmm(u.permute(1, 2, 0), rows)  # (N, K, J * D)
            grad_u = torch.bmm(weight.view(n_in, n_out * dim, dim_in).transpose(1, 2), rows.transpose(1, 2))
        return grad_u.permute(2, 0, 1), grad_weight.transpose(1, 2).reshape(weight.shape), None


# The network ------------------------------------------------------------------------------------------------


class FusedCapsNetModule(_Module):
    """The network as a ``torch.nn.Module`` over the same Parameter objects as the reference module (so the
    optimizer built over those stays valid, and DistributedDataParallel can wrap it); ``forward(images,
    labels)`` returns (lengths, reconstructions) as :class:`implementations.torch.autograd.CapsNetModule`'s."""

    def __init__(self, config: CapsNetConfig, params: dict, plan: Plan, workspace: Workspace, routing):
        super().__init__()
        self.config, self.params, self.plan, self.workspace = config, params, plan, workspace
        self.routing = routing  # the hand-written routing (an autograd.Function) of implementations.torch.routing
        for name, parameter in params.items():
            self.register_parameter(name.replace(".", "_"), parameter)

    def predictions(self, images, workspace):
        """Conv1 -> PrimaryCaps -> squash -> u_hat (B, J, N, D)."""
        config, p, plan = self.config, self.params, self.plan
        batch = images.shape[0]
        x = nhwc(images)
        size1 = config.conv1_size
        with layer_range("conv1"):
            hidden = Convolution.apply(x, p["conv1.weight"], p["conv1.bias"], config.conv1_kernel, config.conv1_stride,
                                       True, plan.conv1, workspace, "conv1")
        hidden = hidden.view(batch, size1, size1, config.conv1_channels)
        with layer_range("primary_caps"):
            primary = Convolution.apply(hidden, p["primary.weight"], p["primary.bias"], config.primary_kernel,
                                        config.primary_stride, False, plan.primary, workspace, "primary_caps")
        with layer_range("primary_squash"):
            u = PrimarySquash.apply(primary, batch, config.primary_caps_channels, config.primary_caps_dim,
                                    config.squash_eps, workspace)
        with layer_range("u_hat"):
            return PredictionVectors.apply(u, p[DIGIT_WEIGHT], workspace)

    def route(self, u_hat, workspace, constant_parameters: bool = False):
        """The hand-written routing of the config's algorithm on u_hat (B, J, N, D) -> v (B, J, D), with the
        arguments it takes (dynamic: the iterations; self-attention: the parameter digit.bias, detached with
        ``constant_parameters``, so that no gradient of it is computed)."""
        params = ({name: value.detach() for name, value in self.params.items()} if constant_parameters
                  else self.params)
        return self.routing.apply(u_hat, *self.routing.arguments(params, self.config), workspace)

    def forward(self, images, labels=None):
        config = self.config
        v = self.route(self.predictions(images, self.workspace), self.workspace)
        with layer_range("lengths_mask"):
            lengths = capsule_lengths(v)
            masked = mask_capsules(v, labels if labels is not None else lengths.argmax(dim=1), config)
        with layer_range("decoder"):
            return lengths, decoder(self.params, masked, config)


class TorchFusedCapsNet(TorchCapsNet):
    """CapsNet in torch with hand-written backward (see the module docstring).  u_hat is (B, J, N, D), so
    ``route`` here takes u_hat in that layout (the reference's takes (B, N, J, D)); it serves the
    routing-alone calls, while the network's forward applies the same routing with the kept workspace."""

    u_hat_layout = "BJND"
    routing_gradients = ROUTING_GRADIENTS  # Routing and FinalGradientRouting
    routing_algorithms = ROUTING_ALGORITHMS  # dynamic (those two), self-attention (SelfAttentionRouting)

    def __init__(self, config, params, dtype="float32", device="cpu", routing_variant="vectorised"):
        if routing_variant != "vectorised":
            raise ValueError(f"torch-fused has the vectorised routing only, not {routing_variant!r}")
        super().__init__(config, params, dtype, device, routing_variant)
        for name in CONV_WEIGHTS:  # (O, kh * kw * C) weight matrices as views; the gradients come in this layout
            self.params[name].data = self.params[name].data.contiguous(memory_format=torch.channels_last)
        self.plan = PLANS[self._device.type]  # until the first batch shape chooses its own (use_plan_for)
        self.plans: dict[int, tuple[Plan, dict]] = {}
        self.plan_seconds = 0.0  # spent choosing plans (measuring, or reading the cache): set-up, not a step
        self.workspace = Workspace(self._dtype, self._device)
        # routing alone (the routing benchmarks) keeps its own buffers, apart from the training step's
        self.routing_workspace = Workspace(self._dtype, self._device)
        routing = ROUTING[(config.routing_algorithm, routing_variant, config.routing_gradient)].hand_written
        self.module = FusedCapsNetModule(config, self.params, self.plan, self.workspace, routing)

    def use_plan_for(self, batch_size: int) -> Plan:
        """The convolution plan of this batch size, chosen on its first use: a batch no larger than one this
        model has planned (the last, partial batch of an epoch or of an evaluation) takes the plan of the
        smallest such (:func:`serving_batch_size`), since every plan computes every shape and re-planning
        would cost more than one step could save; otherwise :func:`choose_plan` (measured on this machine or
        read from the cache), unless $CAPSBENCH_CONV_PLAN is "fixed" (then :data:`PLANS`).  The seconds spent
        choosing add up in :attr:`plan_seconds`, so that a caller keeps them out of its step times."""
        if batch_size not in self.plans:
            start = time.perf_counter()
            serving = serving_batch_size(batch_size, self.plans)
            if serving is not None:
                plan, facts = self.plans[serving]
                self.plans[batch_size] = (plan, {**{key: facts[key] for key in STRATEGY_FACTS if key in facts},
                                                 "source": f"batch {serving}'s plan (a smaller batch takes the "
                                                           "plan of a larger one planned before)"})
            elif os.environ.get(CONV_PLAN_ENV, "measure") == "fixed":
                fixed = PLANS[self._device.type]
                self.plans[batch_size] = (fixed, {"conv1": dataclasses.asdict(fixed.conv1),
                                                  "primary_caps": dataclasses.asdict(fixed.primary),
                                                  "source": f"fixed (${CONV_PLAN_ENV}=fixed)"})
            else:
                self.plans[batch_size] = choose_plan(self.config, batch_size, self.dtype, self._device)
            self.plan_seconds += time.perf_counter() - start
        self.plan = self.module.plan = self.plans[batch_size][0]
        return self.plan

    def plan_facts(self) -> dict[str, dict]:
        """The plan of every batch size used so far, with where it came from: {str(batch size): facts}."""
        return {str(batch_size): facts for batch_size, (_, facts) in sorted(self.plans.items())}

    def forward_loss(self, batch):
        self.use_plan_for(batch.images.shape[0])
        return super().forward_loss(batch)

    def make_optimizer(self):
        """torch.optim.Adam with one fused kernel for every parameter, ``foreach`` where there is none."""
        options = {"lr": ADAM.lr, "betas": (ADAM.beta1, ADAM.beta2), "eps": ADAM.eps}
        try:
            return torch.optim.Adam(self.module.parameters(), fused=True, **options)
        except (RuntimeError, ValueError):
            return torch.optim.Adam(self.module.parameters(), foreach=True, **options)

    def load_adam_state(self, state) -> None:
        """As the reference's, with each moment in its parameter's memory layout (the fused kernel walks all
        four tensors of a parameter in memory order)."""
        super().load_adam_state(state)
        for parameter in self.params.values():
            moments = self.optimizer.state[parameter]
            for key in ("exp_avg", "exp_avg_sq"):
                moments[key] = torch.empty_like(parameter).copy_(moments[key])

    def forward(self, batch, train: bool = True):
        self._loss = None  # this pass reuses the buffers a pending backward would read
        self.use_plan_for(batch.images.shape[0])
        return super().forward(batch, train)

    def _fresh(self) -> Workspace:
        return Workspace(self._dtype, self._device, keep=False)

    def route(self, u_hat):
        """The routing alone (routing_forward, routing_backward) on u_hat (B, J, N, D) -> v (B, J, D), the
        routing's parameters (self-attention's bias) constants: the routing-alone gradient is u_hat's alone.
        Its buffers, the gradient of u_hat included, are kept and reused by the next call (apart from the
        training step's), as the training backward's are and as NumPy's routing alone does, so that routing
        alone times the routing and not the first touch of a fresh u_hat-sized gradient's pages; a result is
        valid until the next routing-alone call."""
        return self.module.route(u_hat, self.routing_workspace, constant_parameters=True)

    def prediction_vectors(self, batch):
        self.use_plan_for(batch.images.shape[0])
        with torch.no_grad():
            return self.module.predictions(batch.images, self._fresh())


register("torch-fused", TorchFusedCapsNet, device="cpu", routing_variant="vectorised")
register("torch-fused-cuda", TorchFusedCapsNet, device="cuda", routing_variant="vectorised")


# Measuring the convolution strategies -----------------------------------------------------------------------


def conv_shape(config: CapsNetConfig, layer: str) -> tuple[int, int, int, int, int]:
    """(input size, input channels, output channels, kernel, stride) of the convolution ``layer``."""
    if layer == "conv1":
        return (config.image_size, config.image_channels, config.conv1_channels, config.conv1_kernel,
                config.conv1_stride)
    return (config.conv1_size, config.conv1_channels, config.primary_conv_channels, config.primary_kernel,
            config.primary_stride)


def time_candidates(config: CapsNetConfig, layer: str, batch_size: int, dtype: str, device: str, repeats: int,
                    prune: float | None = None) -> dict[tuple[str, str], list[float]]:
    """Seconds of every strategy of each product of the convolution ``layer`` ("conv1" or "primary_caps")
    in ``repeats`` rounds on random data, after one untimed call each; the alternatives run back to back in
    every round.  A backward product that reuses what its forward kept (im2col + GEMM's patch matrix, the
    spectral strategy's spectra) is timed twice: reusing it, and building its own (its name in
    :data:`conv_plans.OWN`, after any other forward).
    Conv1's input gradient is never needed, so not timed.  With ``prune``, a candidate slower than
    ``prune`` times the fastest of its phase in the first round (twice that in the untimed call) is not timed
    again, so the set-up stays short; only the candidates timed are returned."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    kind = getattr(torch, dtype)
    size, channels, out_channels, kernel, stride = conv_shape(config, layer)
    out_size = conv_output_size(size, kernel, stride)
    x = torch.rand((batch_size, size, size, channels), generator=generator, dtype=kind).to(device)
    weight = (torch.randn((out_channels, channels, kernel, kernel), generator=generator, dtype=kind) * 0.01).to(device)
    weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.zeros(out_channels, dtype=kind, device=device)
    grad_rows = torch.randn((batch_size * out_size**2, out_channels), generator=generator, dtype=kind).to(device)
    workspace = Workspace(kind, device)
    kept_by = {name: FORWARD[name](x, weight, bias, kernel, stride, workspace, f"kept {name}")[1]
               for name in conv_plans.OWN}  # what each forward that keeps something keeps, for the backward
    calls = {("forward", name): (lambda f=f: f(x, weight, bias, kernel, stride, workspace, "m"))
             for name, f in FORWARD.items()}
    phases = [("weight gradient", WEIGHT_GRADIENT)] + ([("input gradient", INPUT_GRADIENT)] if layer != "conv1" else [])
    for phase, table in phases:
        for name, f in table.items():
            kept = kept_by.get(name, {})
            calls[(phase, name)] = (lambda f=f, kept=kept:
                                    f(grad_rows, x, dict(kept), weight, kernel, stride, workspace, "m"))
            if name in conv_plans.OWN:
                calls[(phase, conv_plans.OWN[name])] = (
                    lambda f=f: f(grad_rows, x, {}, weight, kernel, stride, workspace, "m"))
    synchronize = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    times: dict = {key: [] for key in calls}
    warm: dict = {}
    for key, call in calls.items():
        synchronize()
        start = time.perf_counter()
        call()
        synchronize()
        warm[key] = time.perf_counter() - start
    live = dict(calls)
    if prune:  # the untimed first call pays page faults, so only a candidate far behind stops here
        fastest = {phase: min(s for (p, _), s in warm.items() if p == phase) for phase, _ in warm}
        live = {key: call for key, call in live.items() if warm[key] <= 2 * prune * fastest[key[0]]}
        times = {key: times[key] for key in live}
    for round_ in range(repeats):
        for key, call in live.items():
            synchronize()
            start = time.perf_counter()
            call()
            synchronize()
            times[key].append(time.perf_counter() - start)
        if prune and round_ == 0:
            best = {}
            for (phase, _), seconds in times.items():
                best[phase] = min(best.get(phase, float("inf")), seconds[0])
            live = {key: call for key, call in live.items() if times[key][0] <= prune * best[key[0]]}
    return times


# Choosing the plan where it runs ----------------------------------------------------------------------------

PLAN_REPEATS, PLAN_PRUNE = 3, 1.25
SPECTRAL_NOTE = ("spectral: the products in the Fourier domain, with fewer multiply-adds than the direct "
                 "convolution whose FLOPs every GFLOP/s and % of peak counts; those are then effective rates, "
                 "which can pass 100 % of the peak")


def machine_name(device) -> str:
    """What the cache keys a choice by: the CPU model, or the GPU's name."""
    from harness.measure.machine import cpu_model

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def plan_shape(config: CapsNetConfig, batch_size: int) -> dict:
    return {"batch": batch_size, "conv1": list(conv_shape(config, "conv1")),
            "primary_caps": list(conv_shape(config, "primary_caps"))}


STRATEGY_FACTS = ("conv1", "primary_caps", "note")  # what a plan's facts say of the plan itself


def serving_batch_size(batch_size: int, planned) -> int | None:
    """The planned batch size whose plan a batch of ``batch_size`` takes instead of a plan of its own: the
    smallest of ``planned`` at least as large, or None (a batch larger than every planned one is planned)."""
    larger = [planned_size for planned_size in planned if planned_size >= batch_size]
    return min(larger) if larger else None


def measure_plan(config: CapsNetConfig, batch_size: int, dtype: str, device: str) -> dict:
    """Median seconds of every candidate of both convolutions: {layer: {"phase/strategy": seconds}}."""
    measured = {}
    for layer in ("conv1", "primary_caps"):
        times = time_candidates(config, layer, batch_size, dtype, device, PLAN_REPEATS, PLAN_PRUNE)
        measured[layer] = {f"{phase}/{name}": statistics.median(seconds) for (phase, name), seconds in times.items()}
    return measured


def plan_from_timings(measured: dict, fallback: Plan) -> Plan:
    """The fastest :class:`Plan` from :func:`measure_plan`'s timings (see :func:`conv_plans.choose_layer`);
    a product that was not timed (Conv1's input gradient) keeps ``fallback`` 's strategy."""
    layers = {}
    for layer, fallback_layer in (("conv1", fallback.conv1), ("primary_caps", fallback.primary)):
        seconds = {tuple(key.split("/", 1)): value for key, value in measured[layer].items()}
        chosen = conv_plans.choose_layer(seconds)
        layers[layer] = ConvPlan(chosen["forward"], chosen["weight"], chosen["input"] or fallback_layer.input)
    return Plan(conv1=layers["conv1"], primary=layers["primary_caps"])


def choose_plan(config: CapsNetConfig, batch_size: int, dtype: str, device, measure=None) -> tuple[Plan, dict]:
    """The plan for this shape: from the cache if this machine, torch version, device, dtype, shape and
    thread count were measured before, else measured now (``measure``, default :func:`measure_plan`) and
    cached.  Returns the plan and its facts (the strategies, where they came from, the timings behind them,
    the seconds measuring took)."""
    device = torch.device(device)
    key = conv_plans.cache_key(machine_name(device), torch.__version__, device.type, dtype,
                               plan_shape(config, batch_size), torch.get_num_threads())
    fallback = PLANS[device.type]
    entry = conv_plans.read_cache().get(key)
    source = "cache"
    if entry is not None:
        try:
            plan = plan_from_timings(entry["seconds"], fallback)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            warnings.warn(f"ignoring a malformed entry of the plan cache {conv_plans.cache_path()} ({error})",
                          stacklevel=2)
            entry = None
    if entry is None:
        source = "measured"
        print(f"torch-fused: measuring its convolution plan for batch {batch_size} ({dtype} on {device.type}, "
              f"{torch.get_num_threads()} threads; once per machine and shape, then read from "
              f"{conv_plans.cache_path()}) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        seconds = (measure or measure_plan)(config, batch_size, dtype, device)
        entry = {"seconds": seconds, "measure_seconds": time.perf_counter() - start}
        plan = plan_from_timings(seconds, fallback)
        conv_plans.write_cache_entry(key, entry)
    facts = {"conv1": dataclasses.asdict(plan.conv1), "primary_caps": dataclasses.asdict(plan.primary),
             "source": source, "measure_seconds": entry.get("measure_seconds"), "seconds": entry["seconds"],
             "cache": str(conv_plans.cache_path())}
    if "spectral" in {*facts["conv1"].values(), *facts["primary_caps"].values()}:
        facts["note"] = SPECTRAL_NOTE
    return plan, facts


def main(argv: list[str] | None = None) -> int:
    from harness.threads import set_threads, usable_cpu_count

    parser = argparse.ArgumentParser(prog="python -m implementations.torch.fused",
                                     description="Time every strategy of each product of the convolutions and print "
                                                 "the fastest (what torch-fused chooses at its first step).")
    parser.add_argument("--layer", choices=("conv1", "primary_caps", "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads or usable_cpu_count())
    if args.device == "cuda":  # as the implementation computes: float32 means float32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    layers = ("conv1", "primary_caps") if args.layer == "both" else (args.layer,)
    for layer in layers:
        times = time_candidates(PAPER, layer, args.batch_size, args.dtype, args.device, args.repeats)
        seconds = {key: statistics.median(values) for key, values in times.items()}
        chosen = conv_plans.choose_layer(seconds)
        size, channels, out_channels, kernel, stride = conv_shape(PAPER, layer)
        flops = 2 * args.batch_size * conv_output_size(size, kernel, stride) ** 2 * out_channels * kernel**2 * channels
        print(f"{layer} at batch {args.batch_size}, {args.dtype} on {args.device}, {torch.get_num_threads()} threads, "
              f"median of {args.repeats}; fastest: {chosen}")
        for (phase, name), values in times.items():
            median = statistics.median(values)
            print(f"  {phase:16s} {name:26s} median {median * 1e3:8.2f} ms  min {min(values) * 1e3:8.2f} ms  "
                  f"{flops / median / 1e9:7.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
