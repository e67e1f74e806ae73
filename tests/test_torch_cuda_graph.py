"""The CUDA-graph implementation: its availability message and, on the CPU, its host-side logic (one capture
per region and batch shape, static buffers, warm-up runs that leave parameters and Adam's state as they
were, the learning rate as a tensor, Adam's state loaded in place) through a stand-in whose "graphs" run
their region eagerly on every replay; the real graphs where a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness import registry
from harness.check import check_implementation, quantities
from harness.data import synthetic_batch
from harness.params import init_parameters
from harness.spec import SMALL, LearningRateSchedule
from implementations.torch import autograd as tc
from implementations.torch import cuda_graph as tg

from gradcheck_util import livelier_parameters

GRAPH = registry.get("torch-vectorised-cuda-graph").availability()
needs_gpu = pytest.mark.skipif(not GRAPH, reason=f"torch-vectorised-cuda-graph unavailable here: {GRAPH.reason}")


class EagerRegion:
    """A stand-in for a captured graph: the region runs again on every replay (its outputs replaced)."""

    def __init__(self, function) -> None:
        self.function = function
        self.outputs = function()  # a capture records without running: what it returns is read after a replay
        self.replays = 0

    def replay(self) -> None:
        self.outputs = self.function()
        self.replays += 1


class EagerGraphs:
    """The capture interface of tg.CudaGraphs without a GPU: the warm-up runs, then a recorded region."""

    def __init__(self, device) -> None:
        self.captured: list[EagerRegion] = []

    def new_pool(self):
        return None

    def capture(self, function, pool=None) -> EagerRegion:
        for _ in range(tg.WARM_UPS):
            function()
        self.captured.append(EagerRegion(function))
        return self.captured[-1]


class OnCpu(tg.TorchCudaGraphCapsNet):
    graph_backend = EagerGraphs

    @classmethod
    def availability(cls, device):
        return registry.Availability.ok()


STAND_INS = {f"torch-{variant}-cuda-graph-on-cpu": variant for variant in registry.ROUTING_VARIANTS}


@pytest.fixture(scope="module", autouse=True)
def stand_ins_registered():
    with registry.registered("torch-vectorised-cuda-graph-on-cpu", OnCpu, routing_variant="vectorised"), \
            registry.registered("torch-looped-cuda-graph-on-cpu", OnCpu, routing_variant="looped"):
        yield


def build(name="torch-vectorised-cuda-graph-on-cpu", dtype="float64", params=None, config=SMALL):
    params = init_parameters(config, dtype=dtype) if params is None else params
    return registry.create(name, config, params, dtype)


def test_unavailability_names_the_reason():
    if GRAPH:
        pytest.skip("a CUDA device is present")
    assert GRAPH.reason.startswith(("no CUDA device", "torch not installed", "torch cannot be imported"))
    for variant in registry.ROUTING_VARIANTS:
        info = registry.get(f"torch-{variant}-cuda-graph")
        assert info.device == "cuda" and info.routing_variant == variant
        assert info.name not in registry.available()


def test_keys():
    a, b = torch.zeros(4, 3), torch.zeros(2, 3)
    assert tg.shape_key("step", (a, None)) == ("step", (4, 3), None)
    assert tg.shape_key("step", (a,)) != tg.shape_key("step", (b,))
    assert tg.identity_key((a,)) == tg.identity_key((a,))
    assert tg.identity_key((a,)) != tg.identity_key((a.clone(),))  # same shape, other memory
    assert tg.identity_key((a,)) != tg.identity_key((a.t(),))  # same memory, other layout


def test_snapshot_puts_values_back_in_the_same_storage():
    tensor = torch.arange(4.0, requires_grad=True)
    address = tensor.data_ptr()
    saved = tg.Snapshot([tensor])
    with torch.no_grad():
        tensor.mul_(3.0)
    saved.restore()
    assert tensor.data_ptr() == address
    np.testing.assert_array_equal(tensor.detach().numpy(), [0.0, 1.0, 2.0, 3.0])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(STAND_INS))
@pytest.mark.parametrize("algorithm", ["dynamic", "self-attention"])
def test_host_logic_keeps_parity_with_the_reference(name, dtype, algorithm):
    """The whole check (outputs, gradients, three scheduled Adam steps, routing alone) through the captured
    regions' host logic: a warm-up that moved the parameters or Adam's state would show here.  Under
    self-attention digit.bias is one more parameter whose gradient and Adam state the graphs hold."""
    config = SMALL.replace(routing_algorithm=algorithm)
    rows = check_implementation(name, config, dtype)
    assert [row.quantity for row in rows] == quantities(config)
    assert all(row.passed for row in rows), [row for row in rows if not row.passed]


def test_one_capture_per_region_and_batch_shape():
    impl = build()
    eight, four = (impl.to_device(*synthetic_batch(SMALL, size, seed=size)) for size in (8, 4))
    for batch in (eight, eight, four, eight):
        impl.train_step(batch)
    assert sorted(key for key in impl.captured_regions() if key[0] == "step") == [
        ("step", (4, *SMALL.input_shape), (4,)), ("step", (8, *SMALL.input_shape), (8,))]
    assert len(impl._graphs.captured) == 2
    impl.forward_loss(eight)
    impl.backward()
    impl.backward()
    impl.adam_step()
    impl.forward(eight, train=False)
    impl.forward(eight, train=True)
    assert len(impl._graphs.captured) == 7  # + loss, its backward, Adam, two forwards
    assert impl._regions[("loss", (8, *SMALL.input_shape), (8,))].backward.replays == 2


class RecordedOnce:
    """A captured region as CUDA keeps it: recorded once, its outputs (and their autograd graph, holding the
    parameters at their versions at capture) fixed; a replay runs nothing on the host."""

    def __init__(self, outputs) -> None:
        self.outputs = outputs

    def replay(self) -> None:
        pass


class RecordingGraphs(EagerGraphs):
    def capture(self, function, pool=None) -> RecordedOnce:
        for _ in range(tg.WARM_UPS):
            function()
        return RecordedOnce(function())


class RecordedOnCpu(OnCpu):
    graph_backend = RecordingGraphs


def test_a_train_step_capture_between_forward_loss_and_backward_breaks_nothing():
    """forward_loss, then a train_step whose capture changes the parameters in place, then backward: the
    backward graph was captured with its forward, so its capture never meets the changed versions (a
    backward captured lazily here raised "modified by an inplace operation")."""
    with registry.registered("torch-recorded-on-cpu", RecordedOnCpu, routing_variant="vectorised"):
        impl = build("torch-recorded-on-cpu")
    batch = impl.to_device(*synthetic_batch(SMALL, 4))
    impl.forward_loss(batch)
    loss_shape = ((4, *SMALL.input_shape), (4,))
    assert ("backward", *loss_shape) in impl.captured_regions()
    versions = [parameter._version for parameter in impl.params.values()]
    impl.train_step(batch)
    assert [parameter._version for parameter in impl.params.values()] != versions  # changed in place
    impl.forward_loss(batch)
    impl.backward()
    impl.adam_step()


def test_a_replay_reads_the_new_batch():
    """The second batch of a shape goes into the static buffers: its loss is its own, not the first's."""
    impl, fresh = build(), build()
    first, second = (impl.to_device(*synthetic_batch(SMALL, 4, seed=seed)) for seed in (1, 2))
    impl.forward_loss(first)
    loss = float(impl.forward_loss(second))
    assert loss == pytest.approx(float(fresh.forward_loss(second)), rel=1e-12)


def test_backward_needs_a_forward_loss_since_the_last_adam_step():
    impl = build()
    batch = impl.to_device(*synthetic_batch(SMALL, 2))
    with pytest.raises(RuntimeError, match="forward_loss"):
        impl.backward()
    impl.forward_loss(batch)
    impl.backward()
    impl.adam_step()
    with pytest.raises(RuntimeError, match="forward_loss"):
        impl.backward()


def test_gradient_and_adam_tensors_stay_where_the_graphs_read_them():
    impl = build(params=livelier_parameters(SMALL))
    impl.set_schedule(LearningRateSchedule("fast", decay_rate=0.5, decay_steps=1))
    learning_rate = impl.optimizer.param_groups[0]["lr"]
    addresses = [tensor.data_ptr() for tensor in impl._optimizer_tensors()]
    gradients = [parameter.grad.data_ptr() for parameter in impl.params.values()]
    batch = impl.to_device(*synthetic_batch(SMALL, 4))
    impl.train_step(batch)
    impl.forward_loss(batch)
    impl.backward()
    impl.adam_step()
    impl.load_adam_state(impl.adam_state())
    assert [tensor.data_ptr() for tensor in impl._optimizer_tensors()] == addresses
    assert [parameter.grad.data_ptr() for parameter in impl.params.values()] == gradients
    assert impl.optimizer.param_groups[0]["lr"] is learning_rate
    assert float(learning_rate) == pytest.approx(impl.schedule.rate(2))
    assert int(impl.adam_state()["step"]) == 2


def test_adam_reads_gradients_that_an_eager_backward_put_in_place_of_the_static_ones():
    """Data-parallel training sets .grad to None and runs an eager backward before adam_step: the captured
    Adam must see those gradients, as torch-vectorised's Adam does."""
    params = livelier_parameters(SMALL)
    graphs, eager = (registry.create(name, SMALL, params, "float64")
                     for name in ("torch-vectorised-cuda-graph-on-cpu", "torch-vectorised"))
    graphs.train_step(graphs.to_device(*synthetic_batch(SMALL, 4)))  # captures, and writes the static gradients
    eager.train_step(eager.to_device(*synthetic_batch(SMALL, 4)))
    static = [parameter.grad for parameter in graphs.params.values()]
    images, labels = synthetic_batch(SMALL, 4, seed=1)
    for impl in (graphs, eager):
        batch = impl.to_device(images, labels)
        impl.optimizer.zero_grad(set_to_none=True)
        tc.total_loss(*impl.module(batch.images, batch.labels), batch.images, batch.labels, SMALL).backward()
        impl.adam_step()
    for name, value in eager.parameters().items():
        np.testing.assert_allclose(graphs.parameters()[name], value, rtol=1e-12, atol=1e-15, err_msg=name)
    assert all(parameter.grad is grad for parameter, grad in zip(graphs.params.values(), static))


def test_routing_is_captured_again_only_for_other_tensors():
    impl = build()
    u_hat = impl.prediction_vectors(impl.to_device(*synthetic_batch(SMALL, 3)))
    grad_v = impl.from_numpy(np.ones((3, SMALL.num_classes, SMALL.digit_caps_dim)))
    first = impl.routing_forward(u_hat).clone()
    impl.routing_forward(u_hat)
    impl.routing_backward(u_hat, grad_v)
    impl.routing_backward(u_hat, grad_v)
    assert len(impl._graphs.captured) == 2
    other = u_hat.clone()
    np.testing.assert_array_equal(impl.routing_forward(other).numpy(), first.numpy())
    assert len(impl._graphs.captured) == 3 and len(impl._routing_regions) == 2


@needs_gpu
def test_gpu_graphs_replay_what_eager_cuda_computes():
    """Five scheduled training steps on alternating batch shapes, then a forward and backward: the same
    parameters, Adam state and gradients as torch-vectorised-cuda, within rounding."""
    params = livelier_parameters(SMALL)
    schedule = LearningRateSchedule("fast", decay_rate=0.5, decay_steps=1)
    graphs, eager = (registry.create(name, SMALL, params, "float64")
                     for name in ("torch-vectorised-cuda-graph", "torch-vectorised-cuda"))
    for impl in (graphs, eager):
        impl.set_schedule(schedule)
        for step in range(5):
            impl.train_step(impl.to_device(*synthetic_batch(SMALL, 8 if step % 2 else 4, seed=step)))
        impl.forward_loss(impl.to_device(*synthetic_batch(SMALL, 8, seed=9)))
        impl.backward()
    for kind, values in (("parameters", lambda i: i.parameters()), ("gradients", lambda i: i.gradients()),
                         ("adam", lambda i: i.adam_state())):
        for key, value in values(eager).items():
            np.testing.assert_allclose(values(graphs)[key], value, rtol=1e-9, atol=1e-12, err_msg=f"{kind} {key}")
    assert len([key for key in graphs.captured_regions() if key[0] == "step"]) == 2
