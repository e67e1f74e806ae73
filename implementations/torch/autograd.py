"""CapsNet in PyTorch with autograd: ``torch-vectorised`` and ``torch-looped``, on CPU and on CUDA.

``torch-vectorised`` (float64, CPU) is the reference every other implementation is checked against.
The two routing variants differ only in their routing, looked up by routing variant and routing gradient
in :data:`implementations.torch.routing.ROUTING`; everything else is shared.  The network follows
:mod:`harness.spec` exactly (read its docstring for the choices).
"""

from __future__ import annotations

import numpy as np

from harness import routing_algorithms
from harness.contract import DEVICES, ROUTING_VARIANTS, AllocatorPeaks, Availability, Batch, Implementation
from harness.params import DECODER_PREFIX, decoder_layer_count
from harness.ranges import ROUTING_LAYER, layer_range
from harness.registry import register
from harness.spec import ADAM, ROUTING_ALGORITHMS, ROUTING_GRADIENTS, CapsNetConfig, LearningRateSchedule
from implementations.torch.routing import ROUTING, squash

try:
    import torch
    import torch.nn.functional as F
except Exception as error:  # not installed, or a broken CUDA install: listed as unavailable, with the reason
    torch = None
    _IMPORT_ERROR = ("torch not installed (pip install torch==2.13.0)" if isinstance(error, ImportError)
                     else f"torch cannot be imported: {type(error).__name__}: {error}")


# The network, as functions of tensors --------------------------------------------------------------


def primary_capsules(conv_output, config: CapsNetConfig):
    """(B, T*D, H, W) PrimaryCaps convolution output -> (B, T*H*W, D) capsules (see spec: layout)."""
    batch, _, height, width = conv_output.shape
    types, dim = config.primary_caps_channels, config.primary_caps_dim
    capsules = conv_output.reshape(batch, types, dim, height, width).permute(0, 1, 3, 4, 2)
    return capsules.reshape(batch, types * height * width, dim)


def prediction_vectors(u, weight):
    """u_hat[b, i, j] = W_ij u[b, i]: (B, N, K) x (N, J, D, K) -> (B, N, J, D), W never tiled over B.

    The result is a (B, N, J, D) view of memory laid out (B, J, N, D): one copy here makes every sum of
    routing (over i for s_j, over the capsule axis for the agreement) a batched matrix product over
    contiguous (N, D) blocks, and the softmax over j a reduction across rows.
    """
    n_in, n_out, dim_out, dim_in = weight.shape
    batch = u.shape[0]
    per_capsule = torch.matmul(u.transpose(0, 1), weight.reshape(n_in, n_out * dim_out, dim_in).transpose(1, 2))
    by_output = per_capsule.reshape(n_in, batch, n_out, dim_out).permute(1, 2, 0, 3).contiguous()
    return by_output.transpose(1, 2)


def capsule_lengths(v):
    """|v_j| along the capsule axis (gradient 0 where |v| = 0)."""
    return torch.linalg.vector_norm(v, dim=-1)


def mask_capsules(v, selected, config: CapsNetConfig):
    """The DigitCaps output (B, J, D) with every capsule but the ``selected`` class zeroed, flattened."""
    mask = F.one_hot(selected, config.num_classes).to(v.dtype)
    return (v * mask.unsqueeze(-1)).reshape(v.shape[0], -1)


def decode(params: dict, v, selected, config: CapsNetConfig):
    """Reconstruction from the DigitCaps output masked to the ``selected`` class of each example."""
    return decoder(params, mask_capsules(v, selected, config), config)


def decoder(params: dict, hidden, config: CapsNetConfig):
    """The fully connected decoder: ReLU between layers, a sigmoid at the end."""
    layers = decoder_layer_count(config)
    for layer in range(layers):
        hidden = F.linear(hidden, params[f"{DECODER_PREFIX}{layer}.weight"], params[f"{DECODER_PREFIX}{layer}.bias"])
        hidden = torch.relu(hidden) if layer < layers - 1 else torch.sigmoid(hidden)
    return hidden


def margin_loss(lengths, labels, config: CapsNetConfig):
    """Squared-hinge margin loss on the raw lengths, summed over classes, averaged over the batch."""
    target = F.one_hot(labels, config.num_classes).to(lengths.dtype)
    present = target * torch.relu(config.margin_positive - lengths) ** 2
    absent = config.margin_down_weight * (1.0 - target) * torch.relu(lengths - config.margin_negative) ** 2
    return (present + absent).sum(dim=1).mean()


def reconstruction_loss(reconstructions, images, config: CapsNetConfig):
    """reconstruction_weight x sum of squared pixel errors, averaged over the batch."""
    errors = reconstructions - images.reshape(images.shape[0], -1)
    return config.reconstruction_weight * (errors * errors).sum(dim=1).mean()


def predictions_from_images(params: dict, images, config: CapsNetConfig):
    """Conv1 -> PrimaryCaps -> squash -> prediction vectors u_hat (B, N, J, D), the input to routing."""
    with layer_range("conv1"):
        hidden = torch.relu(F.conv2d(images, params["conv1.weight"], params["conv1.bias"], stride=config.conv1_stride))
    with layer_range("primary_caps"):
        primary = F.conv2d(hidden, params["primary.weight"], params["primary.bias"], stride=config.primary_stride)
    with layer_range("primary_squash"):
        u = squash(primary_capsules(primary, config), config.squash_eps)
    with layer_range("u_hat"):
        return prediction_vectors(u, params["digit.weight"])


def total_loss(lengths, reconstructions, images, labels, config: CapsNetConfig):
    """Margin loss plus the weighted reconstruction loss."""
    return margin_loss(lengths, labels, config) + reconstruction_loss(reconstructions, images, config)


# The implementation --------------------------------------------------------------------------------


class CapsNetModule(torch.nn.Module if torch is not None else object):
    """The network as a ``torch.nn.Module`` (what DistributedDataParallel wraps).

    ``forward(images, labels)`` returns (lengths, reconstructions): with labels the decoder sees the true
    class (training), without them the longest capsule (inference).  ``params`` maps the canonical names
    of :mod:`harness.params` to the module's parameters (a Module's own names cannot contain dots).
    """

    def __init__(self, config: CapsNetConfig, params: dict, dtype, device, route):
        super().__init__()
        self.config = config
        self.route = route
        self.params = {}
        for name, value in params.items():
            parameter = torch.nn.Parameter(torch.tensor(value, dtype=dtype, device=device))
            self.register_parameter(name.replace(".", "_"), parameter)
            self.params[name] = parameter

    def forward(self, images, labels=None):
        v = self.route(predictions_from_images(self.params, images, self.config))
        with layer_range("lengths_mask"):
            lengths = capsule_lengths(v)
            masked = mask_capsules(v, labels if labels is not None else lengths.argmax(dim=1), self.config)
        with layer_range("decoder"):
            return lengths, decoder(self.params, masked, self.config)


class TorchCapsNet(Implementation):
    """CapsNet with PyTorch autograd and torch.optim.Adam; routing variant and device chosen at build."""

    framework = "torch"
    routing_gradients = ROUTING_GRADIENTS
    routing_algorithms = ROUTING_ALGORITHMS
    runs_algorithm_references = ("vectorised",)  # a plugin's algorithm, by its reference function

    def __init_subclass__(cls, **kwargs):
        """A subclass that overrides the ``route`` hook computes its own routing: it claims the routing
        gradients and algorithms it declares itself, ``full`` and ``dynamic`` alone unless it does, and no
        plugin's algorithm by its reference (never this class's claims by inheritance)."""
        super().__init_subclass__(**kwargs)
        if "route" in vars(cls):
            if "routing_gradients" not in vars(cls):
                cls.routing_gradients = ("full",)
            if "routing_algorithms" not in vars(cls):
                cls.routing_algorithms = ("dynamic",)
            if "runs_algorithm_references" not in vars(cls):
                cls.runs_algorithm_references = ()

    def __init__(self, config, params, dtype="float32", device="cpu", routing_variant="vectorised"):
        super().__init__(config, params, dtype, device, routing_variant)
        self._dtype = getattr(torch, dtype)
        self._device = torch.device(device)
        if self._device.type == "cuda":  # float32 means float32: no TF32 in convolutions or matrix products
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.module = CapsNetModule(config, params, self._dtype, self._device, self._route_in_range)
        self.params = self.module.params
        self.optimizer = self.make_optimizer()
        self.set_schedule(self.schedule)
        self._loss = None

    def make_optimizer(self):
        """torch.optim.Adam with the harness's constants (a subclass may choose another Adam kernel)."""
        return torch.optim.Adam(self.module.parameters(), lr=ADAM.lr, betas=(ADAM.beta1, ADAM.beta2), eps=ADAM.eps)

    def set_schedule(self, schedule: LearningRateSchedule) -> None:
        """The schedule as torch's own LambdaLR scheduler, stepped after every Adam step."""
        super().set_schedule(schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = schedule.initial
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule.factor)

    @classmethod
    def availability(cls, device: str) -> Availability:
        if torch is None:
            return Availability.missing(_IMPORT_ERROR)
        if device == "cuda" and not torch.cuda.is_available():
            if torch.version.cuda is None:
                return Availability.missing(f"no CUDA device: torch {torch.__version__} is a CPU-only build")
            return Availability.missing("no CUDA device (torch.cuda.is_available() is False)")
        return Availability.ok()

    # data
    def from_numpy(self, array):
        return torch.as_tensor(np.asarray(array), dtype=self._dtype, device=self._device)

    def to_device(self, images, labels=None) -> Batch:
        images = self.from_numpy(images)
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self._device)
        return Batch(images, labels)

    def to_numpy(self, array) -> np.ndarray:
        return array.detach().cpu().numpy()

    # the network
    def route(self, u_hat):
        """The differentiable routing of the forward pass: u_hat (B, N, J, D) -> v (B, J, D), of the config's
        routing algorithm (a plugin's by its reference function).  The hook a plugin overrides to try another
        routing (see harness.registry)."""
        return autograd_routing(self.config, self.routing_variant)(u_hat, self.params, self.config)

    def _route_in_range(self, u_hat):
        """``route`` as the network calls it: a plugin's own ``route``, and a plugin's routing algorithm
        computed by its reference function, run inside the range of the whole routing
        (harness.ranges.ROUTING_LAYER), so that a profile attributes its time (and its backward, through
        autograd) without the plugin opening any range; the built-in routing algorithms open their own ranges
        (one per iteration of dynamic routing, attention and attention_sum for self-attention)."""
        if type(self).route is TorchCapsNet.route and routing_algorithms.of(self.config).builtin:
            return self.route(u_hat)
        with layer_range(ROUTING_LAYER):
            return self.route(u_hat)

    def forward(self, batch: Batch, train: bool = True):
        if train and batch.labels is None:
            raise ValueError("a training forward pass needs labels (the decoder is masked to the true class)")
        with torch.no_grad():
            return self.module(batch.images, batch.labels if train else None)

    def forward_loss(self, batch: Batch):
        if batch.labels is None:
            raise ValueError("the training loss needs labels")
        self._loss = None  # free the previous graph before building the next
        lengths, reconstructions = self.module(batch.images, batch.labels)
        with layer_range("losses"):
            self._loss = total_loss(lengths, reconstructions, batch.images, batch.labels, self.config)
        return self._loss.detach()

    def _backward(self, keep_graph: bool) -> None:
        if self._loss is None:
            raise RuntimeError("backward() needs a forward_loss() first")
        self.optimizer.zero_grad(set_to_none=True)
        self._loss.backward(retain_graph=keep_graph)

    def backward(self) -> None:
        self._backward(keep_graph=True)

    def adam_step(self) -> None:
        with layer_range("optimizer", "update"):
            self.optimizer.step()
            self.scheduler.step()

    def train_step(self, batch: Batch) -> float:
        loss = self.forward_loss(batch)
        self._backward(keep_graph=False)
        self._loss = None
        self.adam_step()
        return float(loss)

    def adam_state(self) -> dict[str, np.ndarray]:
        state = {"step": np.asarray(self.scheduler.last_epoch)}
        for name, parameter in self.params.items():
            moments = self.optimizer.state.get(parameter, {})
            for key, moment in (("first", "exp_avg"), ("second", "exp_avg_sq")):
                value = moments.get(moment)
                state[f"{key}/{name}"] = (self.to_numpy(value).copy() if value is not None
                                          else np.zeros(parameter.shape, dtype=self.dtype))
        return state

    def load_adam_state(self, state: dict[str, np.ndarray]) -> None:
        step = int(state["step"])
        on_device = self.optimizer.defaults.get("fused") or self.optimizer.defaults.get("capturable")
        for name, parameter in self.params.items():
            self.optimizer.state[parameter] = {
                "step": torch.tensor(float(step), dtype=torch.float32,
                                     device=parameter.device if on_device else "cpu"),
                "exp_avg": self.from_numpy(state[f"first/{name}"]).reshape(parameter.shape).clone(),
                "exp_avg_sq": self.from_numpy(state[f"second/{name}"]).reshape(parameter.shape).clone(),
            }
        self.scheduler.last_epoch = step
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.rate(step)

    def gradients(self) -> dict[str, np.ndarray]:
        return {name: self.to_numpy(p.grad).copy() for name, p in self.params.items()}

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: self.to_numpy(p).copy() for name, p in self.params.items()}

    # routing alone
    def prediction_vectors(self, batch: Batch):
        with torch.no_grad():
            return predictions_from_images(self.params, batch.images, self.config)

    def routing_forward(self, u_hat):
        with torch.no_grad():
            return self.route(u_hat)

    def routing_backward(self, u_hat, grad_v):
        u_hat = u_hat.detach().requires_grad_(True)
        (grad_u_hat,) = torch.autograd.grad(self.route(u_hat), u_hat, grad_v)
        return grad_u_hat

    def _synchronized_cuda(self) -> bool:
        """True on a CUDA device, after waiting for its queued work (what a timer, and every reading or
        reset of the caching allocator, needs first); False on the CPU, where there is nothing to wait for."""
        if self._device.type != "cuda":
            return False
        torch.cuda.synchronize(self._device)
        return True

    def synchronize(self) -> None:
        self._synchronized_cuda()

    def reset_peak_memory(self) -> None:
        if self._synchronized_cuda():
            torch.cuda.reset_peak_memory_stats(self._device)

    def allocator_peaks(self) -> AllocatorPeaks | None:
        """The caching allocator's peaks: max_memory_allocated (live tensors), max_memory_reserved."""
        if not self._synchronized_cuda():
            return None
        return AllocatorPeaks(live=int(torch.cuda.max_memory_allocated(self._device)),
                              reserved=int(torch.cuda.max_memory_reserved(self._device)))

    def release_cached_memory(self) -> None:
        if self._synchronized_cuda():
            torch.cuda.empty_cache()

    def pci_bus_id(self) -> str | None:
        if self._device.type != "cuda":
            return None
        return cuda_pci_bus_id(torch.cuda.get_device_properties(self._device))


def autograd_routing(config: CapsNetConfig, routing_variant: str):
    """The autograd routing ``routing(u_hat, params, config)`` of ``config``'s routing algorithm and gradient in
    ``routing_variant``: the built-in's from :data:`implementations.torch.routing.ROUTING`, a plugin's
    algorithm's reference function (harness.routing_algorithms) otherwise."""
    algorithm = routing_algorithms.of(config)
    if algorithm.builtin:
        return ROUTING[(algorithm.name, routing_variant, config.routing_gradient)].autograd
    return algorithm.reference


def cuda_pci_bus_id(properties) -> str:
    """'DDDD:BB:DD.0' from torch's device properties (domain, bus and device numbers)."""
    return f"{properties.pci_domain_id:04x}:{properties.pci_bus_id:02x}:{properties.pci_device_id:02x}.0"


def register_variants(prefix: str, cls: type[Implementation], devices=DEVICES) -> None:
    """``<prefix>-vectorised``, ``<prefix>-looped`` and their ``-cuda`` twins."""
    for device in devices:
        for variant in ROUTING_VARIANTS:
            register(f"{prefix}-{variant}" + ("-cuda" if device == "cuda" else ""), cls, device=device,
                     routing_variant=variant)


register_variants("torch", TorchCapsNet)
