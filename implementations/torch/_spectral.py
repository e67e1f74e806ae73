"""A convolution's three products (forward, weight gradient, input gradient) in the discrete Fourier domain,
every transform and every product a GEMM: a candidate strategy of torch-fused's plan
(:mod:`implementations.torch.fused`).

Why: a direct 9 x 9 convolution spends 81 multiply-adds per output and input channel pair, and PrimaryCaps'
are almost all of a CapsNet step's FLOPs.  In the Fourier domain a valid correlation is a product per
frequency, so each product becomes, frequency by frequency, one matrix product over the channels, with
fewer multiply-adds than the direct convolution (for PrimaryCaps 4 x 52 complex frequencies, 832 real
multiply-adds, against 81 x 36 = 2916).  The FLOP counts of :mod:`harness.measure.flops` stay those of the direct
convolution, so a step done this way shows an *effective* rate (direct FLOPs / time), as cuDNN's FFT and
Winograd algorithms do.

How, for an NHWC input (B, H, W, C), a (O, C, k, k) weight and stride s:

* polyphase: the input splits into s * s phases x_ae[p, q] = x[s p + a, s q + e] on an n x n grid
  (n = ceil(H / s), zero-padded) and the weight into s * s phases of kp = ceil(k / s) taps, so the strided
  convolution is the sum over the phases of stride-1 correlations on that grid, each exact as a circular
  one (its valid outputs never wrap);
* the transforms are products with fixed real matrices (:class:`Grid`): the DFT on the n x n grid, kept at
  one frequency of every conjugate pair (the others follow, the signals being real), as rows (frequency,
  real/imaginary part); inverse transforms are evaluated only where they are needed (the outputs, the taps);
* per frequency, complex products as four real batched products over the channels (Y = X conj(W) for the
  forward, dW = sum_b X conj(G) for the weight gradient, dX = G W for the input gradient).

Numerically the transforms are orthogonal up to scale: float32 results agree with the direct convolution
to a few units of float32 rounding (tests/test_torch_fused.py checks float64 to 1e-12).

Layouts (P = s * s phases, F frequencies): input spectrum (P, F, 2, B, C), weight spectrum (P, F, 2, O, C),
output-gradient spectrum (F, 2, B, O); every real and imaginary block is then a row-major (B, C), (O, C)
or (B, O) matrix per frequency, so each product is one ``bmm`` over the frequencies with no copy.  The big
buffers come from the caller's workspace (reused across steps).
"""

from __future__ import annotations

import functools
import math

from harness.spec import conv_output_size
from implementations.torch.autograd import torch  # None where torch is not installed (that module says why)


def conjugate_classes(n: int) -> list[tuple[int, int, int]]:
    """One frequency (u, v) of each conjugate pair {(u, v), (-u, -v)} of the n x n DFT, with the pair's size
    (1 for a frequency that is its own conjugate, whose imaginary part is zero for a real signal)."""
    seen, classes = set(), []
    for u in range(n):
        for v in range(n):
            if (u, v) in seen:
                continue
            conjugate = ((-u) % n, (-v) % n)
            seen.update({(u, v), conjugate})
            classes.append((u, v, 1 if conjugate == (u, v) else 2))
    return classes


def _angles(n: int, classes, points: int):
    """2 pi (u p + v q) / n for every kept frequency and every point (p, q) with p, q < points: (F, points^2)."""
    u = torch.tensor([c[0] for c in classes], dtype=torch.float64).view(-1, 1, 1)
    v = torch.tensor([c[1] for c in classes], dtype=torch.float64).view(-1, 1, 1)
    p = torch.arange(points, dtype=torch.float64).view(1, -1, 1)
    q = torch.arange(points, dtype=torch.float64).view(1, 1, -1)
    return (2 * math.pi / n * (u * p + v * q)).reshape(len(classes), points * points)


def transform_matrix(n: int, points: int):
    """The DFT of a real signal on the n x n grid that is zero outside p, q < ``points``: (2F, points^2),
    rows (frequency, real / imaginary part), float64."""
    angles = _angles(n, conjugate_classes(n), points)
    return torch.stack([torch.cos(angles), -torch.sin(angles)], dim=1).reshape(-1, points * points)


def inverse_matrix(n: int, points: int):
    """The real signal at p, q < ``points`` from its kept frequencies: (points^2, 2F), columns (real /
    imaginary part, frequency) (the order of the spectra's layouts), float64.  Each frequency counts for its
    conjugate pair: x = sum over kept (u, v) of size / n^2 * (Re X cos - Im X sin)."""
    classes = conjugate_classes(n)
    angles = _angles(n, classes, points).t()  # (points^2, F)
    scale = torch.tensor([c[2] for c in classes], dtype=torch.float64) / (n * n)
    return torch.cat([torch.cos(angles) * scale, -torch.sin(angles) * scale], dim=1)


@functools.lru_cache(maxsize=32)
def _matrices(n: int, taps: int, outputs: int, dtype, device) -> tuple:
    def cast(matrix):
        return matrix.to(dtype=dtype, device=device).contiguous()

    return (cast(transform_matrix(n, n)), cast(transform_matrix(n, taps)), cast(transform_matrix(n, outputs)),
            cast(inverse_matrix(n, outputs)), cast(inverse_matrix(n, n)), cast(inverse_matrix(n, taps)))


class Grid:
    """The polyphase grid of one convolution shape and its transform matrices (cached per shape, dtype and
    device): ``to_spectrum`` (2F, n^2), ``taps_to_spectrum`` (2F, kp^2), ``outputs_to_spectrum`` (2F, no^2)
    with rows (frequency, part); ``to_outputs`` (no^2, 2F), ``to_grid`` (n^2, 2F), ``to_taps`` (kp^2, 2F)
    with columns (part, frequency)."""

    def __init__(self, size: int, kernel: int, stride: int, dtype, device) -> None:
        self.size, self.kernel, self.stride = size, kernel, stride
        self.n, self.taps = -(-size // stride), -(-kernel // stride)
        self.outputs = conv_output_size(size, kernel, stride)
        self.phases = stride * stride
        self.frequencies = len(conjugate_classes(self.n))
        (self.to_spectrum, self.taps_to_spectrum, self.outputs_to_spectrum, self.to_outputs, self.to_grid,
         self.to_taps) = _matrices(self.n, self.taps, self.outputs, dtype, torch.device(device))


def grid_of(x, kernel: int, stride: int) -> Grid:
    """The grid of NHWC ``x`` (square images) convolved with a kernel x kernel weight at ``stride``."""
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"the spectral convolution takes square images, not {tuple(x.shape[1:3])}")
    return Grid(x.shape[1], kernel, stride, x.dtype, x.device)


def _phase_views(tensor, grid: Grid):
    """NHWC (B, n s, n s, C) -> the view (a, e, p, q, B, C) of its phases: element [b, s p + a, s q + e, c]."""
    batch, channels, s, n = tensor.shape[0], tensor.shape[3], grid.stride, grid.n
    return tensor.view(batch, n, s, n, s, channels).permute(2, 4, 1, 3, 0, 5)


def input_spectrum(x, grid: Grid, workspace, name: str):
    """NHWC x (B, H, W, C) -> its spectrum per phase (P, F, 2, B, C)."""
    batch, size, _, channels = x.shape
    s, n = grid.stride, grid.n
    if n * s != size:  # zero rows and columns at the end make the phases whole
        x = torch.nn.functional.pad(x, (0, 0, 0, n * s - size, 0, n * s - size))
    phases = workspace.get(f"{name}:phases", (s, s, n, n, batch, channels))
    phases.copy_(_phase_views(x, grid))
    spectrum = workspace.get(f"{name}:input spectrum", (grid.phases, grid.frequencies, 2, batch, channels))
    rows = phases.view(grid.phases, n * n, batch * channels)
    for phase in range(grid.phases):
        torch.mm(grid.to_spectrum, rows[phase], out=spectrum[phase].view(-1, batch * channels))
    return spectrum


def weight_spectrum(weight, grid: Grid, workspace, name: str):
    """(O, C, k, k) weight (any memory layout) -> its spectrum per phase (P, F, 2, O, C)."""
    out_channels, channels, kernel, _ = weight.shape
    s, taps = grid.stride, grid.taps
    phased = workspace.zeros(f"{name}:weight taps", (s, s, taps, taps, out_channels, channels))
    by_tap = weight.permute(2, 3, 0, 1)  # (k, k, O, C)
    for a in range(s):
        for e in range(s):
            phased[a, e, : len(range(a, kernel, s)), : len(range(e, kernel, s))] = by_tap[a::s, e::s]
    spectrum = workspace.get(f"{name}:weight spectrum", (grid.phases, grid.frequencies, 2, out_channels, channels))
    rows = phased.view(grid.phases, taps * taps, out_channels * channels)
    for phase in range(grid.phases):
        torch.mm(grid.taps_to_spectrum, rows[phase], out=spectrum[phase].view(-1, out_channels * channels))
    return spectrum


def output_gradient_spectrum(grad_rows, grid: Grid, workspace, name: str):
    """The output's gradient as rows (B * no * no, O) -> its spectrum (F, 2, B, O)."""
    outputs = grid.outputs * grid.outputs
    batch, out_channels = grad_rows.shape[0] // outputs, grad_rows.shape[1]
    by_point = workspace.get(f"{name}:output gradient by point", (outputs, batch, out_channels))
    by_point.copy_(grad_rows.view(batch, outputs, out_channels).transpose(0, 1))
    spectrum = workspace.get(f"{name}:output gradient spectrum", (grid.frequencies, 2, batch, out_channels))
    torch.mm(grid.outputs_to_spectrum, by_point.view(outputs, -1), out=spectrum.view(-1, batch * out_channels))
    return spectrum


def forward(x, weight, bias, kernel: int, stride: int, workspace, name: str):
    """The valid convolution's output rows (B * no * no, O) and what the backward can reuse: the input's
    and the weight's spectra ({"input spectrum", "weight spectrum"})."""
    grid = grid_of(x, kernel, stride)
    batch, out_channels = x.shape[0], weight.shape[0]
    xs, ws = input_spectrum(x, grid, workspace, name), weight_spectrum(weight, grid, workspace, name)
    product = workspace.get(f"{name}:output spectrum", (2, grid.frequencies, batch, out_channels))
    real, imaginary = product[0], product[1]
    for phase in range(grid.phases):  # Y = X conj(W): Re = Xr Wr + Xi Wi, Im = Xi Wr - Xr Wi
        xr, xi = xs[phase, :, 0], xs[phase, :, 1]
        wr, wi = ws[phase, :, 0].transpose(1, 2), ws[phase, :, 1].transpose(1, 2)
        if phase == 0:
            torch.bmm(xr, wr, out=real)
            torch.bmm(xi, wr, out=imaginary)
        else:
            real.baddbmm_(xr, wr)
            imaginary.baddbmm_(xi, wr)
        real.baddbmm_(xi, wi)
        imaginary.baddbmm_(xr, wi, alpha=-1)
    outputs = grid.outputs * grid.outputs
    by_point = workspace.get(f"{name}:output by point", (outputs, batch, out_channels))
    torch.mm(grid.to_outputs, product.view(-1, batch * out_channels), out=by_point.view(outputs, -1))
    out = workspace.get(f"{name}:out", (batch * outputs, out_channels))
    torch.add(by_point.transpose(0, 1), bias, out=out.view(batch, outputs, out_channels))
    return out, {"input spectrum": xs, "weight spectrum": ws}


def weight_gradient(grad_rows, x, kept: dict, weight, kernel: int, stride: int, workspace, name: str):
    """d loss / d weight (O, C, k, k), in the memory layout (O, k, k, C) of a channels-last weight; uses the
    forward's input spectrum where ``kept`` has it, and leaves the output gradient's spectrum in ``kept``
    for the input gradient."""
    grid = grid_of(x, kernel, stride)
    out_channels, channels = weight.shape[0], weight.shape[1]
    xs = kept.get("input spectrum")
    if xs is None:
        xs = input_spectrum(x, grid, workspace, name)
    gs = kept["output gradient spectrum"] = output_gradient_spectrum(grad_rows, grid, workspace, name)
    gr, gi = gs[:, 0].transpose(1, 2), gs[:, 1].transpose(1, 2)  # (F, O, B)
    product = workspace.get(f"{name}:weight gradient spectrum",
                            (grid.phases, 2, grid.frequencies, out_channels, channels))
    for phase in range(grid.phases):  # dW = sum_b X conj(G): Re = Gr' Xr + Gi' Xi, Im = Gr' Xi - Gi' Xr
        xr, xi = xs[phase, :, 0], xs[phase, :, 1]
        torch.bmm(gr, xr, out=product[phase, 0])
        product[phase, 0].baddbmm_(gi, xi)
        torch.bmm(gr, xi, out=product[phase, 1])
        product[phase, 1].baddbmm_(gi, xr, alpha=-1)
    s, taps = grid.stride, grid.taps
    by_tap = workspace.get(f"{name}:weight gradient taps", (s, s, taps, taps, out_channels, channels))
    rows = product.view(grid.phases, -1, out_channels * channels)
    for phase in range(grid.phases):
        torch.mm(grid.to_taps, rows[phase], out=by_tap.view(grid.phases, taps * taps, -1)[phase])
    grad = torch.empty((out_channels, kernel, kernel, channels), dtype=x.dtype, device=x.device)
    grad_by_tap = grad.permute(1, 2, 0, 3)  # (k, k, O, C)
    for a in range(s):
        for e in range(s):
            grad_by_tap[a::s, e::s] = by_tap[a, e, : len(range(a, kernel, s)), : len(range(e, kernel, s))]
    return grad.permute(0, 3, 1, 2)


def input_gradient(grad_rows, x, kept: dict, weight, kernel: int, stride: int, workspace, name: str):
    """d loss / d x, NHWC like x; uses the forward's weight spectrum and the weight gradient's output-gradient
    spectrum where ``kept`` has them."""
    grid = grid_of(x, kernel, stride)
    batch, size, _, channels = x.shape
    ws = kept.get("weight spectrum")
    if ws is None:
        ws = weight_spectrum(weight, grid, workspace, name)
    gs = kept.get("output gradient spectrum")
    if gs is None:
        gs = output_gradient_spectrum(grad_rows, grid, workspace, name)
    gr, gi = gs[:, 0], gs[:, 1]  # (F, B, O)
    product = workspace.get(f"{name}:input gradient spectrum", (grid.phases, 2, grid.frequencies, batch, channels))
    for phase in range(grid.phases):  # dX = G W: Re = Gr Wr - Gi Wi, Im = Gr Wi + Gi Wr
        wr, wi = ws[phase, :, 0], ws[phase, :, 1]  # (F, O, C)
        torch.bmm(gr, wr, out=product[phase, 0])
        product[phase, 0].baddbmm_(gi, wi, alpha=-1)
        torch.bmm(gr, wi, out=product[phase, 1])
        product[phase, 1].baddbmm_(gi, wr)
    s, n = grid.stride, grid.n
    phases = workspace.get(f"{name}:input gradient phases", (s, s, n, n, batch, channels))
    rows = product.view(grid.phases, -1, batch * channels)
    for phase in range(grid.phases):
        torch.mm(grid.to_grid, rows[phase], out=phases.view(grid.phases, n * n, -1)[phase])
    grad = workspace.get(f"{name}:grad_input", (batch, n * s, n * s, channels))
    _phase_views(grad, grid).copy_(phases)
    return grad if n * s == size else grad[:, :size, :size].contiguous()
