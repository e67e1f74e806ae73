"""The routing of ``cupy-fused``, forward and backward, as a few fused CUDA kernels, in one table :data:`ROUTING`
keyed by (routing algorithm, routing variant, routing gradient): dynamic routing alone.

Routing on the array module costs about fifteen kernels per iteration (softmax, products, squash and their
gradients, each one array operation), most of them small.  Here every routing iteration is two kernels
forward and two backward, plus one kernel that writes the gradient of u_hat, on u_hat laid out
(B, J, N, D) and C-contiguous, as :func:`implementations.numpy.routing.routing_vectorised_forward` and
``routing_vectorised_backward`` define the mathematics (and as the tests check, kernel by kernel):

* ``capsbench_route_agree_softmax`` (one thread per example and input capsule i): the agreement
  u_hat_j|i . v_j is added to the logits b_ij of every output capsule j, then c_i = softmax over j of b_i.
  Not run in the first iteration, whose couplings are exactly 1/J;
* ``capsbench_route_sum_squash`` (one block per example and output capsule j): s_j = sum_i c_ij u_hat_j|i,
  a block reduction over the input capsules, then v_j = squash(s_j) (with eps) in the same block;
* ``capsbench_route_sum_squash_backward`` (one block per example and output capsule): the gradient reaching
  v_j (grad_v in the last iteration, sum_i d loss / d b_ij u_hat_j|i in the others), then d loss / d s_j
  through the squash's full Jacobian;
* ``capsbench_route_softmax_backward`` (one thread per example and input capsule): d loss / d c_ij =
  u_hat_j|i . d loss / d s_j, through the softmax over j, plus the gradient of the next iteration's logits;
* ``capsbench_route_grad_u_hat`` (one thread per element of u_hat): the 2R - 1 rank-one terms of
  d loss / d u_hat (c_r x d loss / d s_r, and d loss / d b_{r+1} x v_r) summed and written once.

Under the routing gradient ``final`` (harness.spec) the backward is the last iteration's
``sum_squash_backward`` and ``grad_u_hat`` over that iteration alone (:meth:`FusedRouting.backward_final`).

:class:`FusedRouting` drives them, through a kernel set (:class:`CupyKernels` here; the tests run the same
driver on NumPy versions of each kernel, on the CPU); its cache for backward is the couplings, the sums s
and the outputs v of every iteration, stacked.  The five kernels are one ``cupy.RawModule`` per dtype
(float or double), compiled by NVRTC on first use; their source (:func:`routing_source`) and launch
geometry (:func:`sum_block_threads`, :func:`blocks`) are plain Python.  Sums accumulate in the array's own
dtype, as cuBLAS does for the unfused implementation.  The implementation is
:class:`implementations.cupy.fused.CupyFusedCapsNet`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from harness.ranges import layer_range
from implementations.cupy.capsnet import cupy
from implementations.numpy.routing import RoutingFunctions

THREADS = 256  # threads per block of the one-thread-per-element kernels, and the target of the block kernels
MAX_THREADS = 1024  # CUDA's limit per block: a capsule dimension above it has no block kernel

REAL_TYPES = {"float32": "float", "float64": "double"}

_MATH = r"""
__device__ inline float capsbench_exp(float x) { return expf(x); }
__device__ inline double capsbench_exp(double x) { return exp(x); }
__device__ inline float capsbench_sqrt(float x) { return sqrtf(x); }
__device__ inline double capsbench_sqrt(double x) { return sqrt(x); }
"""

_BLOCK_KERNELS = r"""
// One block per (example b, output capsule j); blockDim.x a multiple of dim.  Thread t adds up component
// d = t % dim over the input capsules i = t / dim, t / dim + groups, ...; thread d < dim then adds the
// groups' partial sums.  Consecutive threads read consecutive elements of u_hat[b, j].
__device__ T capsbench_weighted_sum(const T* weights, const T* u, T* partial, int n_in, int dim) {
    const int t = threadIdx.x, d = t % dim, groups = blockDim.x / dim;
    T acc = 0;
    for (int i = t / dim; i < n_in; i += groups) {
        acc += weights[i] * u[(long long)i * dim + d];
    }
    partial[t] = acc;
    __syncthreads();
    T total = 0;
    if (t < dim) {
        for (int g = 0; g < groups; ++g) total += partial[g * dim + t];
    }
    __syncthreads();
    return total;
}

extern "C" __global__ void capsbench_route_sum_squash(const T* coupling, const T* u_hat, T* s_out, T* v_out,
                                                      int n_in, int dim, T eps) {
    extern __shared__ __align__(sizeof(double)) unsigned char shared_raw[];
    T* partial = reinterpret_cast<T*>(shared_raw);
    const long long bj = blockIdx.x;
    const int t = threadIdx.x;
    const T s = capsbench_weighted_sum(coupling + bj * n_in, u_hat + bj * n_in * dim, partial, n_in, dim);
    if (t < dim) partial[t] = s;
    __syncthreads();
    if (t < dim) {
        T squared = 0;
        for (int k = 0; k < dim; ++k) squared += partial[k] * partial[k];
        s_out[bj * dim + t] = s;
        v_out[bj * dim + t] = s * (squared / ((1 + squared) * capsbench_sqrt(squared + eps)));
    }
}

extern "C" __global__ void capsbench_route_sum_squash_backward(const T* weights, const T* u_hat,
                                                               const T* grad_v, const T* s, T* grad_s,
                                                               int n_in, int dim, T eps, int weighted) {
    extern __shared__ __align__(sizeof(double)) unsigned char shared_raw[];
    T* partial = reinterpret_cast<T*>(shared_raw);
    const long long bj = blockIdx.x;
    const int t = threadIdx.x;
    T g = 0;
    if (weighted) {  // the same for the whole block
        g = capsbench_weighted_sum(weights + bj * n_in, u_hat + bj * n_in * dim, partial, n_in, dim);
    } else if (t < dim) {
        g = grad_v[bj * dim + t];
    }
    if (t < dim) partial[t] = g;
    __syncthreads();
    if (t < dim) {
        const T* sv = s + bj * dim;
        T squared = 0, along = 0;
        for (int k = 0; k < dim; ++k) {
            squared += sv[k] * sv[k];
            along += sv[k] * partial[k];
        }
        const T root = capsbench_sqrt(squared + eps);
        const T scale = squared / ((1 + squared) * root);
        const T slope = (1 / (1 + squared) - squared / (2 * (squared + eps))) / ((1 + squared) * root);
        grad_s[bj * dim + t] = scale * g + 2 * slope * along * sv[t];
    }
}
"""

_THREAD_KERNELS = r"""
// One thread per (example b, input capsule i), looping over the output capsules j.
extern "C" __global__ void capsbench_route_agree_softmax(const T* u_hat, const T* v, T* logits, T* coupling,
                                                         long long batch, int n_out, int n_in, int dim,
                                                         int accumulate) {
    const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= batch * n_in) return;
    const long long b = index / n_in;
    const long long i = index % n_in;
    T largest = 0;
    for (int j = 0; j < n_out; ++j) {
        const long long at = (b * n_out + j) * n_in + i;
        const T* u = u_hat + at * dim;
        const T* vj = v + (b * n_out + j) * dim;
        T agreement = 0;
        for (int d = 0; d < dim; ++d) agreement += u[d] * vj[d];
        const T logit = accumulate ? logits[at] + agreement : agreement;
        logits[at] = logit;
        largest = (j == 0 || logit > largest) ? logit : largest;
    }
    T total = 0;
    for (int j = 0; j < n_out; ++j) {
        const long long at = (b * n_out + j) * n_in + i;
        const T e = capsbench_exp(logits[at] - largest);
        coupling[at] = e;
        total += e;
    }
    for (int j = 0; j < n_out; ++j) coupling[(b * n_out + j) * n_in + i] /= total;
}

extern "C" __global__ void capsbench_route_softmax_backward(const T* u_hat, const T* grad_s, const T* coupling,
                                                            const T* grad_logits_next, T* grad_logits,
                                                            long long batch, int n_out, int n_in, int dim,
                                                            int has_next) {
    const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= batch * n_in) return;
    const long long b = index / n_in;
    const long long i = index % n_in;
    T weighted = 0;
    for (int j = 0; j < n_out; ++j) {
        const long long at = (b * n_out + j) * n_in + i;
        const T* u = u_hat + at * dim;
        const T* gs = grad_s + (b * n_out + j) * dim;
        T grad_c = 0;
        for (int d = 0; d < dim; ++d) grad_c += u[d] * gs[d];
        grad_logits[at] = grad_c;
        weighted += coupling[at] * grad_c;
    }
    for (int j = 0; j < n_out; ++j) {
        const long long at = (b * n_out + j) * n_in + i;
        T value = coupling[at] * (grad_logits[at] - weighted);
        if (has_next) value += grad_logits_next[at];
        grad_logits[at] = value;
    }
}
"""

_GRAD_KERNEL = r"""
// One thread per element of u_hat (B, J, N, D), grid-stride: the 2R - 1 terms of its gradient, summed.
extern "C" __global__ void capsbench_route_grad_u_hat(const T* coupling, const T* grad_s, const T* grad_logits,
                                                      const T* v, T* grad, long long size, int iterations,
                                                      int n_in, int dim, long long plane, long long vector_plane) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < size; index += stride) {
        const long long bji = index / dim;  // (b, j, i): the coupling's and the logits' index
        const long long at = (bji / n_in) * dim + index % dim;  // (b, j, d): the vectors' index
        T total = 0;
        for (int r = 0; r < iterations; ++r) {
            total += coupling[r * plane + bji] * grad_s[r * vector_plane + at];
            if (r + 1 < iterations) total += grad_logits[(r + 1) * plane + bji] * v[r * vector_plane + at];
        }
        grad[index] = total;
    }
}
"""

KERNEL_NAMES = ("capsbench_route_sum_squash", "capsbench_route_sum_squash_backward", "capsbench_route_agree_softmax",
                "capsbench_route_softmax_backward", "capsbench_route_grad_u_hat")
MAX_BLOCKS = 2**31 - 1  # CUDA's limit on gridDim.x


def real_type(dtype) -> str:
    """The CUDA C type of a float dtype."""
    name = np.dtype(dtype).name
    if name not in REAL_TYPES:
        raise TypeError(f"fused routing is written for float32 and float64, not {name}")
    return REAL_TYPES[name]


def routing_source(dtype) -> str:
    """The CUDA source of the five kernels for one dtype (``T`` is its C type)."""
    return f"typedef {real_type(dtype)} T;\n{_MATH}{_BLOCK_KERNELS}{_THREAD_KERNELS}{_GRAD_KERNEL}"


def sum_block_threads(dim: int) -> int:
    """Threads per block of the block kernels: the largest multiple of ``dim`` up to :data:`THREADS`, and at
    least ``dim`` (one thread per component)."""
    if not 1 <= dim <= MAX_THREADS:
        raise ValueError(f"fused routing needs a capsule dimension from 1 to {MAX_THREADS}, got {dim}")
    return max(dim, THREADS // dim * dim)


def blocks(count: int, threads: int = THREADS) -> int:
    """Blocks of ``threads`` covering ``count`` threads (at least one; at most CUDA's limit, past which the
    grid-stride kernel loops)."""
    return min(MAX_BLOCKS, max(1, -(-count // threads)))


def check_layout(u_hat) -> None:
    """The kernels index u_hat as a C-contiguous (B, J, N, D) array; anything else is refused, not copied
    (a copy would be timed in this implementation only)."""
    if u_hat.ndim != 4 or not u_hat.flags.c_contiguous:
        raise ValueError(f"fused routing needs a C-contiguous (B, J, N, D) u_hat, got shape {u_hat.shape} "
                         f"with strides {u_hat.strides}")


class FusedCache(NamedTuple):
    """What backward needs of every iteration r, stacked: couplings c (R, B, J, N), sums s and outputs v
    (R, B, J, D)."""

    coupling: object
    s: object
    v: object


class FusedRouting:
    """Routing forward and backward as a sequence of kernel launches; ``kernels`` runs each one (see the
    module docstring).  ``forward`` and ``backward`` have the signatures of
    :class:`~implementations.numpy.routing.RoutingFunctions`."""

    def __init__(self, kernels) -> None:
        self.kernels = kernels

    def forward(self, xp, u_hat, iterations: int, eps: float, params=None):
        """Dynamic routing has no parameters of its own: ``params`` is not read."""
        check_layout(u_hat)
        batch, n_out, n_in, dim = u_hat.shape
        coupling = xp.empty((iterations, batch, n_out, n_in), dtype=u_hat.dtype)
        s = xp.empty((iterations, batch, n_out, dim), dtype=u_hat.dtype)
        v = xp.empty_like(s)
        logits = xp.empty((batch, n_out, n_in), dtype=u_hat.dtype)
        coupling[0].fill(1.0 / n_out)  # softmax of b = 0: exactly 1 / J everywhere
        for r in range(iterations):
            with layer_range(f"routing_iteration_{r + 1}", "forward"):  # the profile's routing rows
                if r > 0:  # b += u_hat . v of the previous iteration (b = 0 before), c = softmax over j
                    self.kernels.agree_softmax(u_hat, v[r - 1], logits, coupling[r], accumulate=r > 1)
                self.kernels.sum_squash(coupling[r], u_hat, s[r], v[r], eps)
        return v[iterations - 1], FusedCache(coupling, s, v)

    def backward(self, xp, u_hat, cache: FusedCache, grad_v, eps: float):
        check_layout(u_hat)
        coupling, s, v = cache
        iterations = s.shape[0]
        grad_v = xp.ascontiguousarray(grad_v)
        grad_s = xp.empty_like(s)
        grad_logits = xp.empty_like(coupling)  # [r]: d loss / d b_r for r >= 1 ([0] is never written)
        for r in reversed(range(iterations)):
            last = r == iterations - 1
            with layer_range(f"routing_iteration_{r + 1}", "backward"):
                self.kernels.sum_squash_backward(None if last else grad_logits[r + 1], u_hat,
                                                 grad_v if last else None, s[r], grad_s[r], eps)
                if r > 0:
                    self.kernels.softmax_backward(u_hat, grad_s[r], coupling[r],
                                                  None if last else grad_logits[r + 1], grad_logits[r])
        grad_u_hat = xp.empty_like(u_hat)
        with layer_range("routing_iteration_1", "backward"):  # the last work, as in the vectorised routing
            self.kernels.grad_u_hat(coupling, grad_s, grad_logits, v, grad_u_hat)
        return grad_u_hat, {}

    def backward_final(self, xp, u_hat, cache: FusedCache, grad_v, eps: float):
        """The backward of the routing gradient ``final`` (harness.spec): the last iteration's sum-squash
        backward and the gradient kernel over that iteration alone (one term, c_R x d loss / d s_R; with one
        iteration the kernel reads no logits), two launches against the full backward's 2R."""
        check_layout(u_hat)
        coupling, s, v = cache
        last = s.shape[0] - 1
        grad_v = xp.ascontiguousarray(grad_v)
        grad_s = xp.empty_like(s[last:])
        self.kernels.sum_squash_backward(None, u_hat, grad_v, s[last], grad_s[0], eps)
        grad_u_hat = xp.empty_like(u_hat)
        self.kernels.grad_u_hat(coupling[last:], grad_s, coupling[last:], v[last:], grad_u_hat)
        return grad_u_hat, {}



@functools.cache
def _raw_module(dtype_name: str):
    return cupy.RawModule(code=routing_source(dtype_name))


@functools.cache
def raw_kernel(name: str, dtype_name: str):
    """One of :data:`KERNEL_NAMES` for one dtype, compiled with its module on first use."""
    return _raw_module(dtype_name).get_function(name)


class CupyKernels:
    """The kernels on the GPU: the functions of one ``cupy.RawModule`` of :func:`routing_source` per dtype,
    compiled on first use."""

    @staticmethod
    def _function(name: str, dtype):
        return raw_kernel(name, np.dtype(dtype).name)

    def sum_squash(self, coupling, u_hat, s_out, v_out, eps):
        batch, n_out, n_in, dim = u_hat.shape
        threads = sum_block_threads(dim)
        self._function("capsbench_route_sum_squash", u_hat.dtype)(
            (batch * n_out,), (threads,), (coupling, u_hat, s_out, v_out, np.int32(n_in), np.int32(dim),
                                           u_hat.dtype.type(eps)),
            shared_mem=threads * u_hat.dtype.itemsize)

    def sum_squash_backward(self, weights, u_hat, grad_v, s, grad_s_out, eps):
        batch, n_out, n_in, dim = u_hat.shape
        threads = sum_block_threads(dim)
        weighted = weights is not None
        self._function("capsbench_route_sum_squash_backward", u_hat.dtype)(
            (batch * n_out,), (threads,),
            (weights if weighted else u_hat, u_hat, s if weighted else grad_v, s, grad_s_out, np.int32(n_in),
             np.int32(dim), u_hat.dtype.type(eps), np.int32(weighted)),
            shared_mem=threads * u_hat.dtype.itemsize)

    def agree_softmax(self, u_hat, v, logits, coupling_out, accumulate: bool):
        batch, n_out, n_in, dim = u_hat.shape
        self._function("capsbench_route_agree_softmax", u_hat.dtype)(
            (blocks(batch * n_in),), (THREADS,),
            (u_hat, v, logits, coupling_out, np.int64(batch), np.int32(n_out), np.int32(n_in), np.int32(dim),
             np.int32(accumulate)))

    def softmax_backward(self, u_hat, grad_s, coupling, grad_logits_next, grad_logits_out):
        batch, n_out, n_in, dim = u_hat.shape
        has_next = grad_logits_next is not None
        self._function("capsbench_route_softmax_backward", u_hat.dtype)(
            (blocks(batch * n_in),), (THREADS,),
            (u_hat, grad_s, coupling, grad_logits_next if has_next else coupling, grad_logits_out,
             np.int64(batch), np.int32(n_out), np.int32(n_in), np.int32(dim), np.int32(has_next)))

    def grad_u_hat(self, coupling, grad_s, grad_logits, v, out):
        iterations, batch, n_out, n_in = coupling.shape
        dim = out.shape[-1]
        self._function("capsbench_route_grad_u_hat", out.dtype)(
            (blocks(out.size),), (THREADS,),
            (coupling, grad_s, grad_logits, v, out, np.int64(out.size), np.int32(iterations), np.int32(n_in),
             np.int32(dim), np.int64(batch * n_out * n_in), np.int64(batch * n_out * dim)))


# The table --------------------------------------------------------------------------------------------------

_FUSED = FusedRouting(CupyKernels())  # compiles nothing until a kernel first runs
# Every fused routing of CuPy, by (routing algorithm, routing variant, routing gradient) (harness.spec): the
# kernels are dynamic routing's vectorised mathematics, so there is no looped entry and no self-attention.
# cupy-vectorised and cupy-looped run the NumPy code on CuPy, with the routing of
# implementations.numpy.routing.ROUTING (self-attention included).
ROUTING = {
    ("dynamic", "vectorised", "full"): RoutingFunctions(_FUSED.forward, _FUSED.backward),
    ("dynamic", "vectorised", "final"): RoutingFunctions(_FUSED.forward, _FUSED.backward_final),
}
