"""``torch-*-compiled``: the PyTorch CapsNet with its training step and inference compiled by ``torch.compile``.

Eager PyTorch launches one kernel per operation, and routing is dozens of small elementwise operations and
reductions per iteration; torch.compile (TorchDynamo tracing, Inductor code generation: C++ on the CPU,
Triton on CUDA) fuses them.  What each contract method runs:

* ``forward_loss``: the training forward pass and the losses, one compiled function
  (:func:`training_outputs`).  AOTAutograd derives its backward and Inductor compiles that too;
  ``backward`` runs the compiled backward (``loss.backward()``, as the eager class does).  The graph
  returns the reconstruction loss before its weight, which one scalar product outside applies: a
  configuration that differs in that weight alone (the gradient check's) reuses the compiled graphs.
* ``forward``: at inference, the forward pass without a graph (:func:`inference_outputs`), compiled apart;
  in training mode (which the suite never times; the parity check reads it) the training function's
  lengths and reconstructions, its autograd graph dropped on return: one compiled graph fewer per dtype.
* ``adam_step``: ``torch.optim.Adam(fused=True)``, one fused kernel for every tensor, on the CPU and on
  CUDA; nothing to compile.
* ``prediction_vectors``, ``routing_forward`` and ``routing_backward`` (the routing-alone benchmarks) are
  the eager autograd routing of :mod:`implementations.torch.routing`: compiling routing alone would compile one
  more pair of graphs per iteration count, and the parity check visits three counts.  The routing inside
  the training step and inference is compiled with the rest of the network.

Compiling is set-up, never step time.  The first call of each function per dtype, configuration and grad
mode compiles; later calls, from this instance or any other, run the compiled code.  The
compiled callables live at module level (:func:`compiled`), so Dynamo's cache of compiled graphs (guarded
on dtypes, the configuration's constants, the routing function and grad mode) is shared by every instance:
building a model again compiles nothing.  The batch axis is marked dynamic, so one compiled graph serves
every batch size (the suite's sweep and the tests' batches alike) instead of one compile per size; the
asv suite warms each benchmark up in ``setup``, and ``benchmarks/bench_compile.py`` measures the compile
itself (:attr:`first_call_compiles`).

Two settings hold while compiled code runs (:func:`compile_settings`): AOTAutograd's donated buffers are
off, because the contract lets ``backward`` run twice on one forward pass (``retain_graph``), which
donated buffers forbid; and hitting Dynamo's recompile limit raises instead of falling back to eager
code in silence, which would time eager PyTorch under a compiled name.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import sys

from harness.contract import ROUTING_VARIANTS, Availability, Batch
from harness.registry import register
from harness.spec import ADAM, CapsNetConfig
from implementations.torch.autograd import (
    TorchCapsNet,
    autograd_routing,
    capsule_lengths,
    decode,
    margin_loss,
    predictions_from_images,
    reconstruction_loss,
    torch,
)

# Compiled graphs Dynamo may keep per function and routing variant: dtypes x configurations x grad modes.
RECOMPILE_LIMIT = 32


# The compiled functions ------------------------------------------------------------------------------


def inference_outputs(params: dict, images, config: CapsNetConfig, routing):
    """Class-capsule lengths and reconstructions, the decoder masked to the longest capsule."""
    v = routing(predictions_from_images(params, images, config), params, config)
    lengths = capsule_lengths(v)
    return lengths, decode(params, v, lengths.argmax(dim=1), config)


def training_outputs(params: dict, images, labels, config: CapsNetConfig, routing):
    """The margin loss and the reconstruction loss of a training forward pass, the latter before its weight
    (``config``'s is 1, see :func:`unit_weight`), with the lengths and the reconstructions they come from
    (the decoder masked to the true class)."""
    v = routing(predictions_from_images(params, images, config), params, config)
    lengths = capsule_lengths(v)
    reconstructions = decode(params, v, labels, config)
    return (margin_loss(lengths, labels, config), reconstruction_loss(reconstructions, images, config), lengths,
            reconstructions)


@functools.cache
def unit_weight(config: CapsNetConfig) -> CapsNetConfig:
    """The configuration with a reconstruction weight of 1, which is all the compiled graphs see of it."""
    return config.replace(reconstruction_weight=1.0)


COMPILED_FUNCTIONS = {"inference_outputs": inference_outputs, "training_outputs": training_outputs}


@functools.cache
def compiled(name: str):
    """``torch.compile`` of one of :data:`COMPILED_FUNCTIONS`, made once per process (on first use, so
    importing this module, as ``capsbench list`` does, never loads the compiler)."""
    return torch.compile(COMPILED_FUNCTIONS[name])


@contextlib.contextmanager
def compile_settings():
    """What every call into compiled code (forward or backward) runs under; see the module docstring."""
    with torch._functorch.config.patch(donated_buffer=False), torch._dynamo.config.patch(
            recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        yield


def batch_dynamic(*tensors):
    """The tensors, their batch axis (0) marked dynamic for Dynamo, so a new batch size reuses the graph."""
    for tensor in tensors:
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    return tensors


def cpp_compiler() -> str:
    """The C++ compiler Inductor looks for on the CPU: $CXX, else clang++ on macOS and g++ elsewhere."""
    return os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")


# The implementation --------------------------------------------------------------------------------------


class TorchCompiledCapsNet(TorchCapsNet):
    """:class:`~implementations.torch.autograd.TorchCapsNet` with ``forward_loss`` (and through AOTAutograd
    its backward) and ``forward`` compiled, and fused Adam.  It compiles the autograd routing of its variant
    and routing gradient (:func:`implementations.torch.autograd.autograd_routing`), not an overridden ``route`` hook."""

    first_call_compiles = True  # the first step of a new dtype or configuration compiles (bench_compile.py)

    @classmethod
    def availability(cls, device: str) -> Availability:
        status = super().availability(device)
        if not status:
            return status
        if device == "cuda":
            if importlib.util.find_spec("triton") is None:
                return Availability.missing("torch.compile on CUDA needs Triton, which is not installed "
                                            "(it comes with torch's CUDA wheels: pip install triton)")
        elif shutil.which(cpp_compiler()) is None:
            return Availability.missing(f"torch.compile on the CPU needs a C++ compiler: {cpp_compiler()} not "
                                        "found (install g++, or set CXX)")
        return Availability.ok()

    def make_optimizer(self):
        """Fused Adam (one kernel over every tensor; CPU and CUDA both have it), same constants."""
        return torch.optim.Adam(self.module.parameters(), lr=ADAM.lr, betas=(ADAM.beta1, ADAM.beta2), eps=ADAM.eps,
                                fused=True)

    def forward(self, batch: Batch, train: bool = True):
        if not train:
            (images,) = batch_dynamic(batch.images)
            with torch.no_grad(), compile_settings():
                return compiled("inference_outputs")(self.params, images, unit_weight(self.config),
                                                     self._routing())
        if batch.labels is None:
            raise ValueError("a training forward pass needs labels (the decoder is masked to the true class)")
        _, _, lengths, reconstructions = self._training_outputs(batch)
        return lengths.detach(), reconstructions.detach()

    def forward_loss(self, batch: Batch):
        """Margin loss plus the weighted reconstruction loss, as :func:`~implementations.torch.autograd.total_loss`
        adds them."""
        if batch.labels is None:
            raise ValueError("the training loss needs labels")
        self._loss = None  # free the previous graph before building the next
        margin, reconstruction, _, _ = self._training_outputs(batch)
        self._loss = margin + self.config.reconstruction_weight * reconstruction
        return self._loss.detach()

    def _routing(self):
        """The autograd routing of this algorithm, variant and routing gradient, which the compiled functions
        take."""
        return autograd_routing(self.config, self.routing_variant)

    def _training_outputs(self, batch: Batch):
        images, labels = batch_dynamic(batch.images, batch.labels)
        with compile_settings():
            return compiled("training_outputs")(self.params, images, labels, unit_weight(self.config),
                                                self._routing())

    def _backward(self, keep_graph: bool) -> None:
        with compile_settings():
            super()._backward(keep_graph)


for _variant in ROUTING_VARIANTS:
    register(f"torch-{_variant}-compiled", TorchCompiledCapsNet, device="cpu", routing_variant=_variant)
    register(f"torch-{_variant}-cuda-compiled", TorchCompiledCapsNet, device="cuda", routing_variant=_variant)
