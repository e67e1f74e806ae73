"""``jax-vectorised`` and ``jax-looped`` (and their ``-cuda`` twins): CapsNet as pure JAX functions under ``jax.jit``.

XLA compiles each contract operation into one program, the whole training step included: the forward pass,
``jax.value_and_grad`` and the Adam update (written out as :func:`adam_update`, the NumPy implementation's
rule on :data:`harness.spec.ADAM`, so the three-step Adam parity check holds) are one jitted function,
:func:`train_step`.  What each contract method runs, each jitted on its own so a benchmark times what its
name says:

* ``forward(batch, train=False)``: :func:`inference`; ``forward_loss``: :func:`forward_with_pullback`, the
  loss and its ``jax.vjp`` pullback (a pytree of the residuals backward needs, returned through the jit
  boundary, as torch keeps its graph); ``backward``: :func:`pullback`, the gradients from those residuals;
* ``routing_forward`` / ``routing_backward``: :func:`route` and :func:`route_backward` (routing, and its
  vjp in u_hat) on u_hat in the canonical (B, N, J, D) layout (``u_hat_layout``), with the routing
  algorithm's own parameters (self-attention's ``digit.bias``) as an argument;
* ``adam_step``: :func:`adam_update` over the parameter pytree.

Parameters, gradients and Adam's moments are dicts in the canonical layout of :mod:`harness.params`; the
convolutions are im2col (strided slices of the NHWC activations) and one matrix product with the
(out, in, kh, kw) weights re-laid out inside the program (:func:`conv_valid`; XLA's own convolution is the
alternative, see :data:`CONVOLUTION`).  The routing of each routing algorithm (dynamic, self-attention),
variant and routing gradient is in :mod:`implementations.jax.routing` (its table ``ROUTING``);
``config.routing_gradient`` "final" stops the gradient through every iteration but the last weighted sum and
squash (``jax.lax.stop_gradient``).  A routing algorithm's parameters (self-attention's ``digit.bias``) are
parameters like the others: in the pytree, its gradients, Adam's moments and state.

Set-up done where this module is imported (:mod:`implementations.jax._setup`, before JAX is imported):

* **float64.**  JAX computes in float32 unless x64 is on, a process-wide flag; a float64 instance runs
  every call (arrays made, programs traced and run) inside ``jax.enable_x64(True)`` and a float32 one
  inside ``jax.enable_x64(False)`` (:meth:`JaxCapsNet._precision`), so each computes in its own dtype
  and the flag outside is what it was.
* **Compiling.**  The first call of each function per shape, dtype and configuration compiles (the
  configuration, its routing algorithm included, is a static argument, so two algorithms never share a
  program)
  (``first_call_compiles``); compiled programs are also written to JAX's persistent compilation cache,
  ``$CAPSBENCH_JAX_CACHE`` or ``runs/jax-cache`` (:func:`cache_folder`), so a later process (asv runs one
  per benchmark) reads them back instead of compiling again.
* **GPU memory.**  ``XLA_PYTHON_CLIENT_PREALLOCATE=false``
  (:func:`~implementations.jax._setup.configure_environment`): by default JAX takes 75 % of the GPU's
  memory at start-up, which would make every device-memory figure that of the preallocation.
* **Threads.**  XLA's CPU thread pool has no setting (``threadpoolctl`` and torch's count do not reach
  it); it is as large as the CPUs this process may run on, and :func:`harness.threads.thread_facts`
  records that figure under ``xla:cpu`` (:data:`XLA_CPU_POOL`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from harness.contract import ROUTING_VARIANTS, AllocatorPeaks, Availability, Batch, Implementation
from harness.params import DECODER_PREFIX, decoder_layer_count, routing_parameter_shapes
from harness.registry import register
from harness.settings import JAX_CACHE_DIR, JAX_CACHE_ENV, JAX_CONVOLUTION_ENV
from harness.spec import ADAM, ROUTING_ALGORITHMS, ROUTING_GRADIENTS, CapsNetConfig
from harness.threads import register_thread_pool, usable_cpu_count
from implementations.jax._setup import _IMPORT_ERROR, jax, jnp, lax
from implementations.jax.routing import ROUTING, squash

CACHE_ENV = JAX_CACHE_ENV
DEFAULT_CACHE = JAX_CACHE_DIR
XLA_CPU_POOL = "xla:cpu"


def cache_folder() -> Path:
    """Where JAX's persistent compilation cache lives: $CAPSBENCH_JAX_CACHE, else runs/jax-cache."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


@functools.cache
def enable_compilation_cache() -> Path:
    """Point JAX's persistent compilation cache at :func:`cache_folder` (once per process), caching every
    program however quickly it compiled (the small test network's compile in well under JAX's default
    threshold of one second)."""
    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


register_thread_pool(XLA_CPU_POOL, lambda: usable_cpu_count() if jax is not None else None)


# The network as pure functions ------------------------------------------------------------------------------


def conv_valid(x, weight, bias, stride: int):
    """Valid convolution of NHWC ``x`` with a canonical (out, in, kh, kw) weight; NHWC out (the formulation
    :data:`CONVOLUTION` names)."""
    return CONVOLUTIONS[CONVOLUTION](x, weight, stride) + bias


def conv_xla(x, weight, stride: int):
    """XLA's own convolution, weights read in place through the dimension numbers."""
    return lax.conv_general_dilated(x, weight, (stride, stride), "VALID", dimension_numbers=("NHWC", "OIHW", "NHWC"))


def conv_im2col(x, weight, stride: int):
    """im2col by strided slices (one per kernel offset, concatenated on the channel axis) and one matrix
    product; the slices' gradient is a padded add, the product's two more products."""
    out_channels, _, kernel, _ = weight.shape
    batch, height, width, channels = x.shape
    out_h, out_w = (height - kernel) // stride + 1, (width - kernel) // stride + 1
    patches = jnp.concatenate([
        lax.slice(x, (0, i, j, 0), (batch, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, channels),
                  (1, stride, stride, 1))
        for i in range(kernel) for j in range(kernel)], axis=-1)  # (B, Ho, Wo, kh * kw * C), (kh, kw, C) order
    matrix = jnp.transpose(weight, (2, 3, 1, 0)).reshape(kernel * kernel * channels, out_channels)
    return patches @ matrix


CONVOLUTIONS = {"xla": conv_xla, "im2col": conv_im2col}
# im2col by default: on this 2-core CPU a paper-network training step at batch 32 took 1.9 s with it and 37 s
# with XLA:CPU's own convolution (its PrimaryCaps backward); CAPSBENCH_JAX_CONVOLUTION=xla chooses the other
CONVOLUTION = os.environ.get(JAX_CONVOLUTION_ENV, "im2col")


def predictions_from_images(params: dict, images, config: CapsNetConfig):
    """Conv1 -> PrimaryCaps -> squash -> u_hat (B, N, J, D), from NCHW images."""
    batch = images.shape[0]
    x = jnp.transpose(images, (0, 2, 3, 1))
    with jax.named_scope("conv1"):
        hidden = jax.nn.relu(conv_valid(x, params["conv1.weight"], params["conv1.bias"], config.conv1_stride))
    with jax.named_scope("primary_caps"):
        primary = conv_valid(hidden, params["primary.weight"], params["primary.bias"], config.primary_stride)
    with jax.named_scope("primary_squash"):
        size, types, dim = config.primary_size, config.primary_caps_channels, config.primary_caps_dim
        capsules = jnp.transpose(primary.reshape(batch, size, size, types, dim), (0, 3, 1, 2, 4))
        u = squash(capsules.reshape(batch, config.num_primary_caps, dim), config.squash_eps)
    with jax.named_scope("u_hat"):
        return jnp.einsum("njdk,bnk->bnjd", params["digit.weight"], u)


def capsule_lengths(v):
    """|v| along the capsule axis, with gradient 0 where |v| = 0 (torch.linalg.vector_norm's convention)."""
    squared = jnp.sum(v * v, axis=-1)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def decode(params: dict, v, selected, config: CapsNetConfig):
    """The decoder's reconstruction from v masked to the ``selected`` class of each example."""
    mask = jax.nn.one_hot(selected, config.num_classes, dtype=v.dtype)
    hidden = (v * mask[:, :, None]).reshape(v.shape[0], -1)
    layers = decoder_layer_count(config)
    with jax.named_scope("decoder"):
        for layer in range(layers):
            hidden = hidden @ params[f"{DECODER_PREFIX}{layer}.weight"].T + params[f"{DECODER_PREFIX}{layer}.bias"]
            hidden = jax.nn.relu(hidden) if layer < layers - 1 else jax.nn.sigmoid(hidden)
    return hidden


def routing_of(config: CapsNetConfig, routing: str, gradient: str):
    """The routing ``routing(u_hat, params, config)`` of ``config``'s routing algorithm in the routing variant
    ``routing`` under the routing gradient ``gradient`` (:data:`implementations.jax.routing.ROUTING`)."""
    return ROUTING[(config.routing_algorithm, routing, gradient)]


def network(params: dict, images, labels, config: CapsNetConfig, routing: str, gradient: str):
    """Lengths (B, J) and reconstructions (B, pixels): the decoder masked to ``labels``, or to the longest
    capsule where labels is None."""
    u_hat = predictions_from_images(params, images, config)
    v = routing_of(config, routing, gradient)(u_hat, params, config)
    lengths = capsule_lengths(v)
    selected = jnp.argmax(lengths, axis=1) if labels is None else labels
    return lengths, decode(params, v, selected, config)


def total_loss(params: dict, images, labels, config: CapsNetConfig, routing: str, gradient: str):
    """Margin loss (summed over classes, averaged over the batch) plus the weighted reconstruction loss."""
    lengths, reconstructions = network(params, images, labels, config, routing, gradient)
    with jax.named_scope("losses"):
        target = jax.nn.one_hot(labels, config.num_classes, dtype=lengths.dtype)
        present = target * jax.nn.relu(config.margin_positive - lengths) ** 2
        absent = config.margin_down_weight * (1.0 - target) * jax.nn.relu(lengths - config.margin_negative) ** 2
        margin = jnp.mean(jnp.sum(present + absent, axis=1))
        errors = reconstructions - images.reshape(images.shape[0], -1)
        return margin + config.reconstruction_weight * jnp.mean(jnp.sum(errors * errors, axis=1))


def adam_update(params: dict, grads: dict, first: dict, second: dict, step_size, root_correction):
    """torch.optim.Adam's update: m <- m + (1 - beta1) (g - m); v <- beta2 v + (1 - beta2) g^2;
    p <- p - step_size m / (sqrt(v) / root_correction + eps), with step_size = lr_t / (1 - beta1^t) and
    root_correction = sqrt(1 - beta2^t) computed on the host (:meth:`JaxCapsNet._next_adam_step`)."""
    first = jax.tree.map(lambda m, g: m + (1.0 - ADAM.beta1) * (g - m), first, grads)
    second = jax.tree.map(lambda s, g: ADAM.beta2 * s + (1.0 - ADAM.beta2) * g * g, second, grads)
    params = jax.tree.map(lambda p, m, s: p - step_size * (m / (jnp.sqrt(s) / root_correction + ADAM.eps)),
                          params, first, second)
    return params, first, second


STATIC = ("config", "routing", "gradient")


def _jit(function):
    """``jax.jit`` with the configuration (its routing algorithm included), routing variant and routing gradient
    static (each compiles)."""
    return jax.jit(function, static_argnames=STATIC) if jax is not None else function


@_jit
def inference(params, images, config, routing, gradient):
    return network(params, images, None, config, routing, gradient)


@_jit
def training_outputs(params, images, labels, config, routing, gradient):
    return network(params, images, labels, config, routing, gradient)


@_jit
def forward_with_pullback(params, images, labels, config, routing, gradient):
    """The loss and its pullback (``jax.vjp``: a pytree holding what backward needs)."""
    return jax.vjp(lambda p: total_loss(p, images, labels, config, routing, gradient), params)


@jax.jit if jax is not None else (lambda function: function)
def pullback(vjp_function, loss):
    """d loss / d parameters from a kept pullback."""
    (grads,) = vjp_function(jnp.ones_like(loss))
    return grads


@_jit
def train_step(params, first, second, images, labels, step_size, root_correction, config, routing, gradient):
    """Forward, gradients and the Adam update in one program; returns (loss, grads, params, first, second)."""
    loss, grads = jax.value_and_grad(total_loss)(params, images, labels, config, routing, gradient)
    with jax.named_scope("optimizer"):
        params, first, second = adam_update(params, grads, first, second, step_size, root_correction)
    return loss, grads, params, first, second


@jax.jit if jax is not None else (lambda function: function)
def adam_only(params, grads, first, second, step_size, root_correction):
    return adam_update(params, grads, first, second, step_size, root_correction)


@_jit
def prediction_vectors(params, images, config, routing, gradient):
    return predictions_from_images(params, images, config)


@_jit
def route(u_hat, routing_params, config, routing, gradient):
    """v (B, J, D) from u_hat (B, N, J, D) and the routing algorithm's own parameters (name -> array)."""
    return routing_of(config, routing, gradient)(u_hat, routing_params, config)


@_jit
def route_backward(u_hat, routing_params, grad_v, config, routing, gradient):
    """d loss / d u_hat from d loss / d v (the routing's parameters held constant, as torch's routing_backward
    asks autograd for u_hat's gradient alone)."""
    _, vjp_function = jax.vjp(lambda u: routing_of(config, routing, gradient)(u, routing_params, config), u_hat)
    return vjp_function(grad_v)[0]


# Device memory ----------------------------------------------------------------------------------------------


def allocator_peaks_from_stats(stats: dict | None) -> AllocatorPeaks | None:
    """AllocatorPeaks from a ``Device.memory_stats()`` reading: live ``peak_bytes_in_use``; reserved
    ``peak_pool_bytes`` (what XLA's BFC allocator took from the device), else ``peak_bytes_reserved``, never
    below live.  XLA keeps one peak per process and has no call that resets it, so after
    :meth:`JaxCapsNet.reset_peak_memory` the figure is the region's peak where the region set a new high,
    and otherwise the earlier, higher one (an upper bound).  None where the device gives no statistics
    (the CPU)."""
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    live = int(stats["peak_bytes_in_use"])
    reserved = int(stats.get("peak_pool_bytes", stats.get("peak_bytes_reserved", live)))
    return AllocatorPeaks(live=live, reserved=max(reserved, live))


# The implementation -----------------------------------------------------------------------------------------


class JaxCapsNet(Implementation):
    """CapsNet in JAX: every contract operation one jitted program; device from JAX's own device list."""

    framework = "jax"
    first_call_compiles = True
    compile_cache_persists = True  # enable_compilation_cache: a later process reads the programs back
    routing_gradients = ROUTING_GRADIENTS
    routing_algorithms = ROUTING_ALGORITHMS

    def __init__(self, config, params, dtype="float32", device="cpu", routing_variant="vectorised"):
        super().__init__(config, params, dtype, device, routing_variant)
        self.gradient = getattr(config, "routing_gradient", "full")
        if self.gradient not in self.routing_gradients:
            raise ValueError(f"routing_gradient must be one of {self.routing_gradients}, got {self.gradient!r}")
        enable_compilation_cache()
        self._device = jax_device(device)
        self._dtype = np.dtype(dtype)
        self._names = list(params)  # canonical order (JAX returns dicts with their keys sorted)
        self._routing_names = list(routing_parameter_shapes(config))  # the routing algorithm's own parameters
        self._static = {"config": config, "routing": routing_variant, "gradient": self.gradient}
        with self._precision():
            self.params = {name: self.from_numpy(value) for name, value in params.items()}
            # zeros made by NumPy and copied: an eager jnp.zeros_like would compile a program per shape
            self._first = {name: self.from_numpy(np.zeros_like(value)) for name, value in params.items()}
            self._second = {name: self.from_numpy(np.zeros_like(value)) for name, value in params.items()}
        self.grads: dict | None = None
        self._pullback = None
        self._adam_steps = 0
        self._last = None  # the latest results, which synchronize() waits for

    @classmethod
    def availability(cls, device: str) -> Availability:
        if jax is None:
            return Availability.missing(_IMPORT_ERROR)
        if device == "cuda":
            try:
                jax.devices("cuda")
            except RuntimeError:
                return Availability.missing(f"no CUDA device: jaxlib {jax.__version__} here has no CUDA backend "
                                            "or sees no GPU (pip install 'jax[cuda12]' on a GPU machine)")
        return Availability.ok()

    def _precision(self):
        """x64 on for a float64 instance and off for a float32 one, for this call only (see the module)."""
        return jax.enable_x64(self._dtype == np.float64)

    def _keep(self, *results):
        self._last = results
        return results[0] if len(results) == 1 else results

    # data
    def from_numpy(self, array):
        with self._precision():
            return jax.device_put(np.asarray(array, dtype=self._dtype), self._device)

    def to_device(self, images, labels=None) -> Batch:
        with self._precision():
            images = self.from_numpy(images)
            if labels is not None:
                labels = jax.device_put(np.asarray(labels, dtype=np.int32), self._device)
        return Batch(images, labels)

    def to_numpy(self, array) -> np.ndarray:
        return np.asarray(jax.device_get(array))

    # the network
    def forward(self, batch: Batch, train: bool = True):
        if train and batch.labels is None:
            raise ValueError("a training forward pass needs labels (the decoder is masked to the true class)")
        with self._precision():
            if train:
                return self._keep(*training_outputs(self.params, batch.images, batch.labels, **self._static))
            return self._keep(*inference(self.params, batch.images, **self._static))

    def forward_loss(self, batch: Batch):
        if batch.labels is None:
            raise ValueError("the training loss needs labels")
        self._pullback = None  # the previous residuals go before the next are made
        with self._precision():
            loss, self._pullback = forward_with_pullback(self.params, batch.images, batch.labels, **self._static)
        self._loss = loss
        return self._keep(loss)

    def backward(self) -> None:
        if self._pullback is None:
            raise RuntimeError("backward() needs a forward_loss() first")
        self.grads = None
        with self._precision():
            self.grads = self._keep(pullback(self._pullback, self._loss))

    def _next_adam_step(self) -> tuple:
        """Count one more Adam step t; its step size lr_t / (1 - beta1^t) and root correction
        sqrt(1 - beta2^t), as arrays of the parameters' dtype (traced: a new step compiles nothing)."""
        rate = self.schedule.rate(self._adam_steps)
        self._adam_steps += 1
        step = self._adam_steps
        return (np.asarray(rate / (1.0 - ADAM.beta1**step), self._dtype),
                np.asarray(np.sqrt(1.0 - ADAM.beta2**step), self._dtype))

    def adam_step(self) -> None:
        if self.grads is None:
            raise RuntimeError("adam_step() needs gradients: call backward() first")
        with self._precision():
            self.params, self._first, self._second = self._keep(
                *adam_only(self.params, self.grads, self._first, self._second, *self._next_adam_step()))

    def train_step(self, batch: Batch) -> float:
        self._pullback = None
        with self._precision():
            loss, self.grads, self.params, self._first, self._second = self._keep(*train_step(
                self.params, self._first, self._second, batch.images, batch.labels, *self._next_adam_step(),
                **self._static))
        return float(loss)

    def gradients(self) -> dict[str, np.ndarray]:
        return {name: self.to_numpy(self.grads[name]).copy() for name in self._names}

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: self.to_numpy(self.params[name]).copy() for name in self._names}

    def adam_state(self) -> dict[str, np.ndarray]:
        state = {"step": np.asarray(self._adam_steps)}
        for name in self._names:
            state[f"first/{name}"] = self.to_numpy(self._first[name]).copy()
            state[f"second/{name}"] = self.to_numpy(self._second[name]).copy()
        return state

    def load_adam_state(self, state: dict[str, np.ndarray]) -> None:
        self._adam_steps = int(state["step"])
        self._first = {name: self.from_numpy(state[f"first/{name}"]) for name in self.params}
        self._second = {name: self.from_numpy(state[f"second/{name}"]) for name in self.params}

    # routing alone, on u_hat in the canonical (B, N, J, D) layout
    def prediction_vectors(self, batch: Batch):
        with self._precision():
            return self._keep(prediction_vectors(self.params, batch.images, **self._static))

    def _routing_params(self) -> dict:
        """The routing algorithm's own parameters (self-attention's ``digit.bias``; none for dynamic routing)."""
        return {name: self.params[name] for name in self._routing_names}

    def routing_forward(self, u_hat):
        with self._precision():
            return self._keep(route(u_hat, self._routing_params(), **self._static))

    def routing_backward(self, u_hat, grad_v):
        with self._precision():
            return self._keep(route_backward(u_hat, self._routing_params(), grad_v, **self._static))

    # devices and memory
    def synchronize(self) -> None:
        if self._last is not None:
            jax.block_until_ready(self._last)

    def reset_peak_memory(self) -> None:
        """XLA cannot reset its peaks (see :func:`allocator_peaks_from_stats`); only the queue is drained."""
        self.synchronize()

    def allocator_peaks(self) -> AllocatorPeaks | None:
        if self.device != "cuda":
            return None
        self.synchronize()
        return allocator_peaks_from_stats(self._device.memory_stats())

    def release_cached_memory(self) -> None:
        """Drop the arrays only this object still refers to (kept results, residuals); XLA's allocator has no
        call that returns its pool to the device, which the reserved figure therefore includes."""
        self.synchronize()
        self._last = None
        self._pullback = None

    def pci_bus_id(self) -> str | None:
        if self.device != "cuda":
            return None
        bus_id = getattr(self._device, "pci_bus_id", None)
        return bus_id.upper() if isinstance(bus_id, str) else None


def jax_device(device: str):
    """JAX's first device of the harness's kind ('cpu' or 'cuda')."""
    return jax.devices(device)[0]


for _device in ("cpu", "cuda"):
    for _variant in ROUTING_VARIANTS:
        register(f"jax-{_variant}" + ("-cuda" if _device == "cuda" else ""), JaxCapsNet, device=_device,
                 routing_variant=_variant)
