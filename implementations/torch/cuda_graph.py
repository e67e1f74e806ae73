"""``torch-vectorised-cuda-graph`` and ``torch-looped-cuda-graph``: the PyTorch CapsNet replayed from CUDA graphs.

Eager PyTorch on a GPU spends much of a CapsNet step launching small kernels, one per operation; a CUDA
graph records a whole sequence of kernels once and launches it again with one call.  Every region below is
captured once per batch shape (and dtype: one instance has one), then replayed:

* ``train_step``: the whole step, forward, loss, backward and Adam, as one graph (PyTorch's "whole-network
  capture"), followed on the host by the learning-rate scheduler, which fills the learning-rate tensor
  the captured Adam reads;
* ``forward_loss`` and ``backward``: two graphs sharing one memory pool, captured together at the first
  ``forward_loss`` of a shape, as ``torch.cuda.make_graphed_callables`` captures a forward and its backward
  (a backward captured later would find parameters changed in place by another capture's warm-up).  The
  backward graph is captured with ``retain_graph=True``, so the activations the forward graph saved stay
  where they are and ``backward`` replayed twice gives the same gradients, not their sum;
* ``adam_step``: ``torch.optim.Adam(capturable=True)`` (step counts, bias corrections and the learning
  rate live on the GPU), one graph for every batch shape;
* ``forward``: one graph per batch shape and mode (training mask or longest capsule);
* ``routing_forward`` and ``routing_backward``: one graph per input tensor (the latest of each kept).  The
  graph reads the caller's u_hat (and grad_v) where they are, so nothing is copied in the timed call; it is
  replayed while the same tensors come back, and captured again for others.  Their results are the
  graph's own output buffers, overwritten by the next replay.

``prediction_vectors`` alone stays eager (the suite never times it).  What a graph reads or writes lives
at fixed addresses: each graph has static input buffers the batch is copied into before a replay (one
small device-to-device copy of images and labels); the gradients are static tensors allocated once and
written in place by both backward graphs (where PyTorch's example lets the captured backward allocate
them: here two graphs write them and Adam's graph reads them), held by the instance, so that a ``.grad``
replaced from outside (``zero_grad(set_to_none=True)`` and an eager backward) frees nothing a graph
addresses and is copied back in before Adam's graph runs; and Adam's state is allocated before any capture
and only ever updated in place (``load_adam_state`` copies into it).

Capture follows PyTorch's CUDA graph notes: the region is first run a few times on a side stream (lazy
initialisation: cuBLAS and cuDNN handles and workspaces, the caching allocator), then captured on that
same stream (as ``make_graphed_callables`` does, so a backward graph runs on its forward's stream), with
no host synchronisation inside.  The warm-up runs of a step change parameters and Adam's state, which are
saved before and put back after, in place, so the first replay is the first step.  Capturing is set-up,
never step time: the first call of each shape captures (:attr:`first_call_compiles`, which
``benchmarks/bench_compile.py`` measures); asv's ``setup`` makes that call.  Memory: each captured region
keeps a private pool, allocated at capture, so a peak measured around a replay sees only what the replay
writes into memory it already holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from harness.contract import ROUTING_VARIANTS, Batch, Implementation
from harness.registry import register
from harness.spec import ADAM, LearningRateSchedule
from implementations.torch.autograd import TorchCapsNet, torch, total_loss

WARM_UPS = 3  # eager runs on the side stream before a capture (PyTorch's whole-network example runs 3)


# Capturing and replaying -------------------------------------------------------------------------------


class Captured(Protocol):
    """A captured region: ``replay()`` runs it again; ``outputs`` are what it returns, read after a replay."""

    outputs: Any

    def replay(self) -> None: ...


@dataclass
class CapturedGraph:
    graph: Any  # torch.cuda.CUDAGraph
    outputs: Any

    def replay(self) -> None:
        self.graph.replay()


class CudaGraphs:
    """Captures regions of one device in CUDA graphs, warming up and capturing on one side stream."""

    def __init__(self, device) -> None:
        self.stream = torch.cuda.Stream(device)

    def new_pool(self):
        """A memory pool two captures may share (a forward and its backward)."""
        return torch.cuda.graph_pool_handle()

    def capture(self, function: Callable, pool=None) -> CapturedGraph:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(WARM_UPS):
                function()
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=self.stream):
            outputs = function()
        return CapturedGraph(graph, outputs)


def shape_key(kind, tensors: Sequence) -> tuple:
    """What makes a region's graph: its kind and the shapes of its inputs (None where absent)."""
    return (kind, *(None if t is None else tuple(t.shape) for t in tensors))


def identity_key(tensors: Sequence) -> tuple:
    """The memory a graph reads in place: address, shape, strides, dtype and device of each tensor."""
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


class Snapshot:
    """Copies of tensors, put back in place (their storage, which captured graphs address, stays)."""

    def __init__(self, tensors: Sequence) -> None:
        self.tensors = list(tensors)
        self.copies = [tensor.detach().clone() for tensor in self.tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, copy in zip(self.tensors, self.copies):
                tensor.copy_(copy)


@dataclass
class Region:
    """One captured region: the static buffers it reads, the captured graph, and what it must keep alive."""

    inputs: tuple
    captured: Captured
    pool: Any = None
    key: tuple = ()
    backward: Captured | None = None  # a forward_loss region's backward graph, captured with its forward
    keep: tuple = field(default_factory=tuple)


# The implementation --------------------------------------------------------------------------------------


class TorchCudaGraphCapsNet(TorchCapsNet):
    """:class:`~implementations.torch.autograd.TorchCapsNet` with every timed region replayed from a CUDA graph
    (see the module docstring).  ``graph_backend`` captures; the CPU tests substitute one that runs the
    regions eagerly, to check the host-side logic."""

    graph_backend = CudaGraphs
    first_call_compiles = True  # the first call of each batch shape captures (bench_compile.py)

    def __init__(self, config, params, dtype="float32", device="cuda", routing_variant="vectorised"):
        super().__init__(config, params, dtype, device, routing_variant)
        self._graphs = self.graph_backend(self._device)
        # static gradients, written in place by every backward graph and read by Adam's; held here too, so
        # that a .grad replaced from outside never frees memory a graph addresses
        self._gradients = [torch.zeros_like(parameter) for parameter in self.params.values()]
        self._claim_gradients(keep_values=False)
        for parameter in self.params.values():  # Adam's state before any capture (step count: see make_optimizer)
            self.optimizer.state[parameter] = {
                "step": torch.zeros((), dtype=parameter.dtype, device=parameter.device),
                "exp_avg": torch.zeros_like(parameter),
                "exp_avg_sq": torch.zeros_like(parameter),
            }
        self._regions: dict[tuple, Region] = {}
        self._routing_regions: dict[str, Region] = {}
        self._adam: Captured | None = None
        self._pending: Region | None = None  # the forward_loss region whose activations backward reads

    def make_optimizer(self):
        """Adam whose whole step can be captured: capturable, with the learning rate a device tensor the
        scheduler fills in place (a Python float would be baked into the graph at capture).  Capturable Adam
        computes the step size on the device in the dtype of its step counts and learning rate: the
        parameters' dtype here (torch's default would be float32, a float32 step size for float64 weights)."""
        learning_rate = torch.tensor(ADAM.lr, dtype=self._dtype, device=self._device)
        return torch.optim.Adam(self.module.parameters(), lr=learning_rate, betas=(ADAM.beta1, ADAM.beta2),
                                eps=ADAM.eps, capturable=self._device.type == "cuda")

    def set_schedule(self, schedule: LearningRateSchedule) -> None:
        """torch's LambdaLR as in the eager class, keeping the learning rate the same tensor."""
        Implementation.set_schedule(self, schedule)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = schedule.initial
            group["lr"].fill_(schedule.initial)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule.factor)

    # capturing
    def _optimizer_tensors(self) -> list:
        """What a warm-up step changes: the parameters and Adam's state."""
        tensors = list(self.params.values())
        for parameter in self.params.values():
            tensors.extend(self.optimizer.state[parameter].values())
        return tensors

    def _capture(self, function: Callable, pool=None, preserve: Sequence = ()) -> Captured:
        """Capture ``function``; the tensors in ``preserve`` hold after it the values they held before the
        warm-up runs."""
        saved = Snapshot(preserve)
        captured = self._graphs.capture(function, pool)
        saved.restore()
        return captured

    def _region(self, kind, inputs: tuple, make_function: Callable, preserve: Sequence = (),
                shared_pool: bool = False) -> Region:
        """The region of this kind for the shapes of ``inputs``, its static buffers holding ``inputs``;
        captured on first use, from ``make_function(*static_buffers)``."""
        key = shape_key(kind, inputs)
        region = self._regions.get(key)
        if region is None:
            static = tuple(None if tensor is None else tensor.detach().clone() for tensor in inputs)
            pool = self._graphs.new_pool() if shared_pool else None
            captured = self._capture(make_function(*static), pool, preserve)
            region = self._regions[key] = Region(static, captured, pool, key)
        else:
            for buffer, tensor in zip(region.inputs, inputs):
                if buffer is not None:
                    buffer.copy_(tensor)
        return region

    def _routing_region(self, kind: str, tensors: tuple, function: Callable) -> Region:
        """The routing region reading ``tensors`` in place; one per kind, captured again for other tensors."""
        key = identity_key(tensors)
        region = self._routing_regions.get(kind)
        if region is None or region.key != key:
            self._routing_regions.pop(kind, None)  # the previous graph and its pool go first
            region = self._routing_regions[kind] = Region((), self._capture(function), key=key, keep=tensors)
        return region

    # the captured functions
    def _outputs_function(self, images, labels):
        def outputs():
            with torch.no_grad():
                return self.module(images, labels)
        return outputs

    def _loss_function(self, images, labels):
        def loss():
            lengths, reconstructions = self.module(images, labels)
            return total_loss(lengths, reconstructions, images, labels, self.config)
        return loss

    def _claim_gradients(self, keep_values: bool) -> None:
        """Point every ``.grad`` at its static tensor again.  Code outside the graphs may have replaced them
        (``zero_grad(set_to_none=True)`` and an eager backward, as data-parallel training does); with
        ``keep_values`` the gradients found there are copied in first, for Adam's graph to read."""
        with torch.no_grad():
            for parameter, static in zip(self.params.values(), self._gradients):
                if parameter.grad is not static:
                    if keep_values and parameter.grad is not None:
                        static.copy_(parameter.grad)
                    elif keep_values:
                        static.zero_()
                    parameter.grad = static

    def _write_gradients(self, loss, keep_graph: bool) -> None:
        gradients = torch.autograd.grad(loss, list(self.params.values()), retain_graph=keep_graph)
        for static, gradient in zip(self._gradients, gradients):
            static.copy_(gradient)

    def _step_function(self, images, labels):
        loss_of = self._loss_function(images, labels)

        def step():
            loss = loss_of()
            self._write_gradients(loss, keep_graph=False)
            self.optimizer.step()
            return loss.detach()
        return step

    # the network
    def forward(self, batch: Batch, train: bool = True):
        if train and batch.labels is None:
            raise ValueError("a training forward pass needs labels (the decoder is masked to the true class)")
        region = self._region(("forward", train), (batch.images, batch.labels if train else None),
                              self._outputs_function)
        region.captured.replay()
        lengths, reconstructions = region.captured.outputs
        return lengths.clone(), reconstructions.clone()

    def forward_loss(self, batch: Batch):
        if batch.labels is None:
            raise ValueError("the training loss needs labels")
        self._pending = None
        region = self._region("loss", (batch.images, batch.labels), self._loss_function, shared_pool=True)
        if region.backward is None:
            self._capture_backward(region)
        region.captured.replay()
        self._pending = region
        return region.captured.outputs.detach().clone()

    def _capture_backward(self, region: Region) -> None:
        """The backward graph of a forward_loss region, captured at once after its forward (as
        ``torch.cuda.make_graphed_callables`` does): its autograd graph is the forward capture's, which saved
        the parameters at their version then, so any later in-place change (a train_step or adam_step
        capture's warm-up runs) would make a backward captured later raise "modified by an inplace
        operation".  The warm-up runs write the static gradients, which hold their values after."""
        self._claim_gradients(keep_values=False)
        region.backward = self._capture(lambda: self._write_gradients(region.captured.outputs, keep_graph=True),
                                        region.pool, preserve=self._gradients)

    def backward(self) -> None:
        region = self._pending
        if region is None:
            raise RuntimeError("backward() needs a forward_loss() first (and no Adam step since)")
        self._claim_gradients(keep_values=False)
        region.backward.replay()

    def adam_step(self) -> None:
        self._claim_gradients(keep_values=True)
        if self._adam is None:
            self._adam = self._capture(self.optimizer.step, preserve=self._optimizer_tensors())
        self._adam.replay()
        self.scheduler.step()
        self._pending = None  # the parameters the pending backward would read have changed

    def train_step(self, batch: Batch) -> float:
        if batch.labels is None:
            raise ValueError("the training loss needs labels")
        self._pending = None
        self._claim_gradients(keep_values=False)
        region = self._region("step", (batch.images, batch.labels), self._step_function,
                              preserve=self._optimizer_tensors())
        region.captured.replay()
        self.scheduler.step()
        return float(region.captured.outputs)

    def load_adam_state(self, state: dict[str, np.ndarray]) -> None:
        """Adam's state copied into the tensors the captured graphs read, learning rate included."""
        step = int(state["step"])
        with torch.no_grad():
            for name, parameter in self.params.items():
                moments = self.optimizer.state[parameter]
                moments["step"].fill_(float(step))
                moments["exp_avg"].copy_(self.from_numpy(state[f"first/{name}"]).reshape(parameter.shape))
                moments["exp_avg_sq"].copy_(self.from_numpy(state[f"second/{name}"]).reshape(parameter.shape))
        self.scheduler.last_epoch = step
        for group in self.optimizer.param_groups:
            group["lr"].fill_(self.schedule.rate(step))

    # routing alone
    def routing_forward(self, u_hat):
        def route():
            with torch.no_grad():
                return self.route(u_hat)
        region = self._routing_region("forward", (u_hat,), route)
        region.captured.replay()
        return region.captured.outputs

    def routing_backward(self, u_hat, grad_v):
        def route_backward():
            leaf = u_hat.detach().requires_grad_(True)
            (grad_u_hat,) = torch.autograd.grad(self.route(leaf), leaf, grad_v)
            return grad_u_hat
        region = self._routing_region("backward", (u_hat, grad_v), route_backward)
        region.captured.replay()
        return region.captured.outputs

    def captured_regions(self) -> list[tuple]:
        """The keys of the regions captured so far (for tests and reports)."""
        keys = list(self._regions)
        keys += [("backward", *region.key[1:]) for region in self._regions.values() if region.backward is not None]
        keys += [("adam",)] if self._adam is not None else []
        keys += [(f"routing {kind}",) for kind in self._routing_regions]
        return keys


for _variant in ROUTING_VARIANTS:
    register(f"torch-{_variant}-cuda-graph", TorchCudaGraphCapsNet, device="cuda", routing_variant=_variant)
