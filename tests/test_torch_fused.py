"""The hand-written backward of torch-fused, Function by Function: each against finite differences in float64
(torch.autograd.gradcheck), the convolution's every strategy against torch.nn.functional.conv2d, the routing
against the NumPy implementation's.  The whole model is held to the contract in test_contract.py."""

import contextlib
import dataclasses
import time

import numpy as np
import pytest
import torch

from harness import registry
from harness.data import synthetic_batch
from harness.measure import flops
from harness.ranges import recording
from harness.settings import CONV_PLAN_ENV, PLAN_CACHE_ENV
from harness.spec import SMALL
from implementations.numpy import routing as nr
from implementations.torch import fused as tf
from implementations.torch import routing as tr
from implementations.torch.routing import routing_vectorised

from gradcheck_util import livelier_parameters

EPS = 1e-8


def fresh():
    return tf.Workspace(torch.float64, "cpu", keep=False)


def conv_case(rng, kernel, stride, channels=3, out_channels=4, size=7):
    x = torch.tensor(rng.normal(size=(2, size, size, channels)), requires_grad=True)  # NHWC
    weight = torch.tensor(rng.normal(size=(out_channels, channels, kernel, kernel)))
    weight = weight.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    bias = torch.tensor(rng.normal(size=out_channels), requires_grad=True)
    return x, weight, bias


def one_phase_at_a_time() -> list:
    """Every strategy of each phase once, the other phases at the first strategy of their table."""
    first = tf.ConvPlan(*(next(iter(table)) for table in (tf.FORWARD, tf.WEIGHT_GRADIENT, tf.INPUT_GRADIENT)))
    plans = [first]
    for field, table in (("forward", tf.FORWARD), ("weight", tf.WEIGHT_GRADIENT), ("input", tf.INPUT_GRADIENT)):
        plans += [dataclasses.replace(first, **{field: name}) for name in table if name != getattr(first, field)]
    return plans


@pytest.mark.parametrize("plan", one_phase_at_a_time(), ids=lambda plan: f"{plan.forward}/{plan.weight}/{plan.input}")
@pytest.mark.parametrize("kernel,stride", [(3, 2), (3, 1)])
def test_convolution_matches_conv2d_and_its_backward_finite_differences(rng, plan, kernel, stride):
    x, weight, bias = conv_case(rng, kernel, stride)
    rows = tf.Convolution.apply(x, weight, bias, kernel, stride, False, plan, fresh(), "conv")
    expected = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride=stride)
    np.testing.assert_allclose(rows.detach().numpy(), expected.permute(0, 2, 3, 1).reshape(rows.shape).detach().numpy(),
                               rtol=1e-12, atol=1e-12)
    x, weight, bias = conv_case(rng, kernel, stride, channels=2, out_channels=3, size=5)  # few entries to perturb
    assert torch.autograd.gradcheck(
        lambda xx, ww, bb: tf.Convolution.apply(xx, ww, bb, kernel, stride, False, plan, fresh(), "conv"),
        (x, weight, bias))


@pytest.mark.parametrize("name", list(tf.PLANS))
def test_the_plans_convolutions_with_relu_against_finite_differences(rng, name):
    x, weight, bias = conv_case(rng, 3, 2, channels=2, out_channels=3, size=5)
    for plan in (tf.PLANS[name].conv1, tf.PLANS[name].primary):
        assert torch.autograd.gradcheck(
            lambda xx, ww, bb, plan=plan: tf.Convolution.apply(xx, ww, bb, 3, 2, True, plan, fresh(), "conv"),
            (x, weight, bias))


def test_weight_gradient_comes_in_the_weights_memory_layout(rng):
    """A channels-last weight gets a channels-last gradient, so autograd takes it without a copy."""
    x, weight, bias = conv_case(rng, 3, 2)
    plan = tf.PLANS["cpu"].primary
    tf.Convolution.apply(x, weight, bias, 3, 2, False, plan, fresh(), "conv").sum().backward()
    assert weight.grad.stride() == weight.stride()


def test_primary_squash_takes_the_capsule_order_of_the_spec_and_finite_differences(rng):
    batch, size, types, dim = 2, 3, 4, 5
    conv_output = rng.normal(size=(batch, types * dim, size, size))  # NCHW, as the reference's convolution
    rows = torch.tensor(conv_output.transpose(0, 2, 3, 1).reshape(-1, types * dim), requires_grad=True)
    config = SMALL.replace(primary_caps_channels=types, primary_caps_dim=dim)
    from implementations.torch.autograd import primary_capsules
    from implementations.torch.routing import squash

    expected = squash(primary_capsules(torch.tensor(conv_output), config), EPS)
    u = tf.PrimarySquash.apply(rows, batch, types, dim, EPS, fresh())
    np.testing.assert_allclose(u.detach().numpy(), expected.numpy(), rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda r: tf.PrimarySquash.apply(r, batch, types, dim, EPS, fresh()), (rows,))


def test_squash_backward_is_the_full_vector_jacobian(rng):
    s = torch.tensor(rng.normal(size=(5, 8)))
    s[0] *= 1e-3
    s[1] *= 30
    grad_v = torch.tensor(rng.normal(size=s.shape))
    np.testing.assert_allclose(tr.squash_backward(s, grad_v, EPS).numpy(),
                               nr.squash_backward(np, s.numpy(), grad_v.numpy(), EPS), rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda x: tr.squash_forward(x, EPS), (s.clone().requires_grad_(True),))


def test_prediction_vectors_forward_and_finite_differences(rng):
    u = torch.tensor(rng.normal(size=(3, 5, 4)), requires_grad=True)  # (B, N, K)
    weight = torch.tensor(rng.normal(size=(5, 2, 6, 4)), requires_grad=True)  # (N, J, D, K), canonical
    u_hat = tf.PredictionVectors.apply(u, weight, fresh())
    assert u_hat.shape == (3, 2, 5, 6) and u_hat.is_contiguous()  # (B, J, N, D)
    np.testing.assert_allclose(u_hat.detach().numpy(), torch.einsum("bnk,njdk->bjnd", u, weight).detach().numpy(),
                               rtol=1e-12)
    assert torch.autograd.gradcheck(lambda uu, ww: tf.PredictionVectors.apply(uu, ww, fresh()), (u, weight))


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_routing_backward_through_every_iteration(rng, iterations):
    u_hat = torch.tensor(rng.normal(scale=0.7, size=(2, 3, 6, 4)), requires_grad=True)  # (B, J, N, D)
    assert torch.autograd.gradcheck(lambda x: tr.Routing.apply(x, iterations, EPS, fresh()), (u_hat,))


@pytest.mark.parametrize("iterations", [1, 3])
def test_routing_is_the_numpy_routing(rng, iterations):
    u_hat = rng.normal(scale=0.7, size=(2, 3, 6, 4))
    grad_v = rng.normal(size=(2, 3, 4))
    v, cache = nr.routing_vectorised_forward(np, u_hat, iterations, EPS)
    expected, _ = nr.routing_vectorised_backward(np, u_hat, cache, grad_v, EPS)
    x = torch.tensor(u_hat, requires_grad=True)
    out = tr.Routing.apply(x, iterations, EPS, fresh())
    (grad,) = torch.autograd.grad(out, x, torch.tensor(grad_v))
    np.testing.assert_allclose(out.detach().numpy(), v, rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_final_routing_gradient_is_the_detached_autograd_routing(rng, iterations):
    """FinalGradientRouting's hand-written backward against autograd through torch-vectorised's routing with
    the early iterations detached (harness.spec, routing gradient final); the forward is Routing's, and the
    gradient differs from the full one wherever there is more than one iteration."""
    u_hat = rng.normal(scale=0.7, size=(2, 3, 6, 4))  # (B, J, N, D)
    grad_v = torch.tensor(rng.normal(size=(2, 3, 4)))
    x = torch.tensor(u_hat, requires_grad=True)
    out = tr.FinalGradientRouting.apply(x, iterations, EPS, fresh())
    (grad,) = torch.autograd.grad(out, x, grad_v)
    reference_input = torch.tensor(u_hat.transpose(0, 2, 1, 3), requires_grad=True)  # (B, N, J, D)
    reference = routing_vectorised(reference_input, iterations, EPS, gradient="final")
    (expected,) = torch.autograd.grad(reference, reference_input, grad_v)
    np.testing.assert_allclose(out.detach().numpy(), tr.Routing.apply(x, iterations, EPS, fresh()).detach().numpy(),
                               rtol=1e-14)
    np.testing.assert_allclose(grad.numpy(), expected.numpy().transpose(0, 2, 1, 3), rtol=1e-12, atol=1e-15)
    (full,) = torch.autograd.grad(tr.Routing.apply(x, iterations, EPS, fresh()), x, grad_v)
    assert (iterations == 1) == np.allclose(grad.numpy(), full.numpy(), rtol=1e-9, atol=1e-12)


def test_a_final_routing_gradient_network_uses_the_final_backward():
    """Built with routing_gradient final, torch-fused's training backward runs FinalGradientRouting: its
    range profile has only the last routing iteration's backward."""
    config = SMALL.replace(routing_gradient="final")
    impl = tf.TorchFusedCapsNet(config, livelier_parameters(config), dtype="float64")
    impl.forward_loss(impl.to_device(*synthetic_batch(config, 2)))
    with recording(NameRecorder()) as recorder:
        impl.backward()
    backward = {layer for phase, layer in recorder.seen if phase == "backward" and layer.startswith("routing")}
    assert backward == {f"routing_iteration_{config.routing_iterations}"}


def attention_case(rng, batch=2, n_out=3, n_in=6, dim=4):
    """u_hat (B, J, N, D) of order one, so the agreements spread the softmax far from uniform, and a bias
    (J, N) far from zero."""
    u_hat = torch.tensor(rng.normal(size=(batch, n_out, n_in, dim)), requires_grad=True)
    bias = torch.tensor(rng.normal(scale=0.5, size=(n_out, n_in)), requires_grad=True)
    return u_hat, bias


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block_bytes", [tr.ATTENTION_BLOCK_BYTES, 1], ids=["one block", "one example a block"])
def test_self_attention_routing_is_the_autograd_reference(rng, monkeypatch, one_thread, block_bytes):
    """SelfAttentionRouting's forward, and its hand-written gradients of u_hat and of the bias, against
    autograd through torch-vectorised's self_attention_vectorised (u_hat (B, N, J, D) there); the forward in
    one block and in blocks of one example (as on a single-threaded CPU at the paper's sizes)."""
    monkeypatch.setattr(tr, "ATTENTION_BLOCK_BYTES", block_bytes)
    u_hat, bias = attention_case(rng, batch=3)
    assert len(tr.attention_blocks(u_hat)) == (1 if block_bytes > 1 else 3)
    grad_v = torch.tensor(rng.normal(size=(3, 3, 4)))
    out = tr.SelfAttentionRouting.apply(u_hat, bias, EPS, fresh())
    grad_u_hat, grad_bias = torch.autograd.grad(out, (u_hat, bias), grad_v)
    reference_input = u_hat.detach().transpose(1, 2).clone().requires_grad_(True)
    reference_bias = bias.detach().clone().requires_grad_(True)
    reference = tr.self_attention_vectorised(reference_input, reference_bias, EPS)
    expected_u_hat, expected_bias = torch.autograd.grad(reference, (reference_input, reference_bias), grad_v)
    np.testing.assert_allclose(out.detach().numpy(), reference.detach().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad_u_hat.numpy(), expected_u_hat.numpy().transpose(0, 2, 1, 3), rtol=1e-11,
                               atol=1e-14)
    np.testing.assert_allclose(grad_bias.numpy(), expected_bias.numpy(), rtol=1e-11, atol=1e-14)
    # the case routes: the couplings are far from uniform (1 / J) and the bias moves them further
    with torch.no_grad():
        total = u_hat.sum(dim=2, keepdim=True)
        probabilities = torch.softmax((u_hat * total).sum(dim=-1) / 2.0, dim=1)
    assert (probabilities.max() - probabilities.min()).item() > 0.5


def test_self_attention_blocks_cover_the_batch_once_and_only_a_single_thread_blocks(monkeypatch):
    u_hat = torch.zeros(5, 2, 3, 4)
    monkeypatch.setattr(tr, "ATTENTION_BLOCK_BYTES", 2 * 2 * 3 * 4 * 4)  # two examples of float32
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert tr.attention_blocks(u_hat) == [slice(0, 2), slice(2, 4), slice(4, 5)]
        torch.set_num_threads(2)
        assert tr.attention_blocks(u_hat) == [slice(0, 5)]
    finally:
        torch.set_num_threads(threads)


def test_self_attention_routing_backward_finite_differences(rng):
    u_hat, bias = attention_case(rng, batch=2, n_out=2, n_in=3, dim=3)
    assert torch.autograd.gradcheck(lambda x, b: tr.SelfAttentionRouting.apply(x, b, EPS, fresh()), (u_hat, bias))


def self_attention_parameters(config, seed: int = 0) -> dict:
    """livelier_parameters with a non-zero digit.bias (zero at the canonical start)."""
    params = livelier_parameters(config, seed=seed)
    params["digit.bias"] = np.random.default_rng(seed + 1).normal(scale=0.3, size=params["digit.bias"].shape)
    return params


def test_torch_fused_self_attention_network_is_torch_vectorised(monkeypatch):
    """The whole network under self-attention in float64: loss, every gradient (digit.bias's included), the
    parameters after an Adam step and Adam's state, against torch-vectorised (autograd)."""
    monkeypatch.setenv(CONV_PLAN_ENV, "fixed")  # the convolution plan is not what this checks
    config = SMALL.replace(routing_algorithm="self-attention")
    params = self_attention_parameters(config)
    images, labels = synthetic_batch(config, 4)
    results = {}
    for name in ("torch-vectorised", "torch-fused"):
        impl = registry.create(name, config, params, "float64")
        loss = impl.forward_loss(impl.to_device(images, labels))
        impl.backward()
        gradients = impl.gradients()
        impl.adam_step()
        results[name] = (float(loss), gradients, impl.parameters(), impl.adam_state())
    (loss, gradients, parameters, state), (fused_loss, fused_gradients, fused_parameters, fused_state) = (
        results["torch-vectorised"], results["torch-fused"])
    assert fused_loss == pytest.approx(loss, rel=1e-12)
    assert list(fused_gradients) == list(gradients) and list(gradients)[-1] == "digit.bias"
    for name, expected in gradients.items():
        np.testing.assert_allclose(fused_gradients[name], expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max(),
                                   err_msg=name)
    assert np.abs(gradients["digit.bias"]).max() > 1e-4  # the bias is in the loss's gradient
    for name, expected in parameters.items():
        np.testing.assert_allclose(fused_parameters[name], expected, rtol=1e-9, atol=1e-12, err_msg=name)
    assert not np.array_equal(fused_parameters["digit.bias"], params["digit.bias"])  # Adam moved the bias
    assert set(fused_state) == set(state)
    np.testing.assert_allclose(fused_state["second/digit.bias"], state["second/digit.bias"], rtol=1e-9)


def test_torch_fused_self_attention_adam_state_round_trip(monkeypatch):
    """Adam's state, digit.bias's moments included, loaded into a new model continues as the first."""
    monkeypatch.setenv(CONV_PLAN_ENV, "fixed")
    config = SMALL.replace(routing_algorithm="self-attention")
    params = self_attention_parameters(config)
    batches = [synthetic_batch(config, 3, seed=seed) for seed in range(2)]
    first = tf.TorchFusedCapsNet(config, params, "float64")
    first.train_step(first.to_device(*batches[0]))
    second = tf.TorchFusedCapsNet(config, first.parameters(), "float64")
    second.load_adam_state(first.adam_state())
    for impl in (first, second):
        impl.train_step(impl.to_device(*batches[1]))
    np.testing.assert_allclose(second.parameters()["digit.bias"], first.parameters()["digit.bias"], rtol=1e-12)
    np.testing.assert_allclose(second.adam_state()["first/digit.bias"], first.adam_state()["first/digit.bias"],
                               rtol=1e-12)


def test_torch_fused_self_attention_routing_alone_is_torch_vectorised_s(rng):
    """routing_forward and routing_backward (u_hat's gradient alone) in torch-fused's layout (B, J, N, D)."""
    config = SMALL.replace(routing_algorithm="self-attention")
    params = self_attention_parameters(config)
    fused = registry.create("torch-fused", config, params, "float64")
    vectorised = registry.create("torch-vectorised", config, params, "float64")
    u_hat = vectorised.prediction_vectors(vectorised.to_device(*synthetic_batch(config, 3)))  # (B, N, J, D)
    grad_v = torch.tensor(rng.normal(size=(3, config.num_classes, config.digit_caps_dim)))
    by_output = u_hat.transpose(1, 2).contiguous()
    np.testing.assert_allclose(fused.routing_forward(by_output).numpy(), vectorised.routing_forward(u_hat).numpy(),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fused.routing_backward(by_output, grad_v).numpy(),
                               vectorised.routing_backward(u_hat, grad_v).transpose(1, 2).numpy(), rtol=1e-10,
                               atol=1e-15)


def test_a_self_attention_network_has_the_attention_ranges_forward_and_backward(monkeypatch):
    monkeypatch.setenv(CONV_PLAN_ENV, "fixed")
    config = SMALL.replace(routing_algorithm="self-attention")
    impl = tf.TorchFusedCapsNet(config, self_attention_parameters(config), "float64")
    with recording(NameRecorder()) as recorder:
        impl.forward_loss(impl.to_device(*synthetic_batch(config, 2)))
        impl.backward()
    routing = {(phase, layer) for phase, layer in recorder.seen if layer.startswith(("routing", "attention"))}
    assert routing == {(phase, layer) for phase in ("forward", "backward") for layer in ("attention", "attention_sum")}


def test_workspace_keeps_a_buffer_per_shape():
    workspace = tf.Workspace(torch.float32, "cpu")
    first = workspace.get("a", (2, 3))
    assert workspace.get("a", (2, 3)).data_ptr() == first.data_ptr()
    assert workspace.get("a", (4, 3)).shape == (4, 3)
    once = tf.Workspace(torch.float32, "cpu", keep=False)
    once.get("a", (2, 3))
    assert not once.buffers


def test_an_inference_forward_ends_a_pending_backward():
    impl = tf.TorchFusedCapsNet(SMALL, livelier_parameters(SMALL), "float64")
    batch = impl.to_device(*synthetic_batch(SMALL, 2))
    impl.forward_loss(batch)
    impl.forward(batch, train=False)
    with pytest.raises(RuntimeError, match="forward_loss"):
        impl.backward()


class NameRecorder:
    def __init__(self):
        self.seen = set()

    def range(self, layer, phase):
        self.seen.add((phase, layer))
        return contextlib.nullcontext()


def test_every_layer_has_its_range_in_forward_and_in_the_hand_written_backward():
    impl = tf.TorchFusedCapsNet(SMALL, livelier_parameters(SMALL), "float64")
    batch = impl.to_device(*synthetic_batch(SMALL, 2))
    with recording(NameRecorder()) as recorder:
        impl.forward_loss(batch)
        impl.backward()
        impl.adam_step()
    hand_written = ["conv1", "primary_caps", "primary_squash", "u_hat", *flops.routing_layers(SMALL)]
    assert {("forward", layer) for layer in flops.layers(SMALL)} <= recorder.seen
    assert {("backward", layer) for layer in hand_written} <= recorder.seen
    assert ("update", flops.OPTIMIZER) in recorder.seen


def test_adam_is_fused():
    impl = tf.TorchFusedCapsNet(SMALL, livelier_parameters(SMALL), "float32")
    assert impl.optimizer.defaults["fused"] or impl.optimizer.defaults["foreach"]


# The plan chosen where it runs --------------------------------------------------------------------------------


def fake_timings(fast_forward: str, fast_input: str) -> dict:
    """Seconds of every candidate, the named ones fastest, as measure_plan returns them."""
    def layer(with_input: bool) -> dict:
        seconds = {f"forward/{name}": (1.0 if name == fast_forward else 3.0) for name in tf.FORWARD}
        seconds.update({f"weight gradient/{name}": 2.0 for name in tf.WEIGHT_GRADIENT})
        seconds[f"weight gradient/{tf.conv_plans.OWN_PATCHES}"] = 2.5
        if with_input:
            seconds.update({f"input gradient/{name}": (0.5 if name == fast_input else 4.0)
                            for name in tf.INPUT_GRADIENT})
        return seconds
    return {"conv1": layer(False), "primary_caps": layer(True)}


def test_the_plan_is_the_fastest_of_injected_timings_and_is_cached_for_a_second_model(tmp_path, monkeypatch):
    monkeypatch.setenv(PLAN_CACHE_ENV, str(tmp_path))
    calls = []

    def measure(config, batch_size, dtype, device):
        calls.append(batch_size)
        return fake_timings("library", "rows")

    plan, facts = tf.choose_plan(SMALL, 4, "float64", "cpu", measure=measure)
    # a library forward keeps no patch matrix: im2col + GEMM's weight gradient would build its own (2.5 s)
    assert plan.primary == tf.ConvPlan("library", "library", "rows")
    assert plan.conv1.input == tf.PLANS["cpu"].conv1.input  # never timed: the fixed plan's
    assert facts["source"] == "measured" and facts["primary_caps"]["input"] == "rows"
    assert (tmp_path / tf.conv_plans.CACHE_FILE).is_file()
    again, facts = tf.choose_plan(SMALL, 4, "float64", "cpu", measure=measure)
    assert again == plan and facts["source"] == "cache" and calls == [4]
    tf.choose_plan(SMALL, 8, "float64", "cpu", measure=measure)  # another shape is measured
    assert calls == [4, 8]


def test_forward_and_weight_gradient_are_chosen_together():
    """im2col + GEMM's forward is slower alone but keeps the patches that make its weight gradient cheap."""
    seconds = {("forward", "im2col-gemm"): 1.2, ("forward", "library"): 1.0, ("weight gradient", "im2col-gemm"): 0.5,
               ("weight gradient", "library"): 1.0, ("weight gradient", tf.conv_plans.OWN_PATCHES): 0.9}
    assert tf.conv_plans.choose_layer(seconds) == {"forward": "im2col-gemm", "weight": "im2col-gemm", "input": None}
    seconds[("forward", "im2col-gemm")] = 1.6  # now library forward + a weight gradient with its own patches wins
    assert tf.conv_plans.choose_layer(seconds) == {"forward": "library", "weight": "im2col-gemm", "input": None}


def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv(PLAN_CACHE_ENV, str(tmp_path))
    (tmp_path / tf.conv_plans.CACHE_FILE).write_text("{not json", encoding="utf-8")
    with pytest.warns(UserWarning, match="ignoring the convolution plan cache"):
        plan, facts = tf.choose_plan(SMALL, 4, "float64", "cpu", measure=lambda *a: fake_timings("offsets", "col2im"))
    assert facts["source"] == "measured" and plan.primary.forward == "offsets"
    assert tf.conv_plans.read_cache()  # rewritten, readable


def test_a_model_measures_its_plan_at_the_first_step_and_reports_it(tmp_path, monkeypatch):
    monkeypatch.setenv(PLAN_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(tf, "measure_plan", lambda *a: fake_timings("offsets", "col2im"))
    from harness.params import init_parameters

    impl = tf.TorchFusedCapsNet(SMALL, init_parameters(SMALL), "float64")
    impl.train_step(impl.to_device(*synthetic_batch(SMALL, 3, seed=0)))
    assert impl.module.plan.primary == tf.ConvPlan("offsets", "library", "col2im")
    facts = impl.plan_facts()
    assert list(facts) == ["3"] and facts["3"]["primary_caps"]["forward"] == "offsets"


def test_the_plan_measurement_times_every_candidate_on_the_shape():
    times = tf.time_candidates(SMALL, "primary_caps", 2, "float64", "cpu", repeats=2)
    expected = {("forward", n) for n in tf.FORWARD} | {("weight gradient", n) for n in tf.WEIGHT_GRADIENT} | {
        ("input gradient", n) for n in tf.INPUT_GRADIENT} | {("weight gradient", tf.conv_plans.OWN_PATCHES),
                                                             ("weight gradient", tf.conv_plans.OWN_SPECTRA),
                                                             ("input gradient", tf.conv_plans.OWN_SPECTRA)}
    assert set(times) == expected and all(len(seconds) == 2 and min(seconds) > 0 for seconds in times.values())
    assert ("input gradient", "library") not in tf.time_candidates(SMALL, "conv1", 2, "float64", "cpu", repeats=1)


def test_a_weight_gradient_that_builds_its_own_patches_after_a_library_forward(rng):
    x, weight, bias = conv_case(rng, 3, 2, channels=2, out_channels=3, size=5)
    plan = tf.ConvPlan("library", "im2col-gemm", "library")
    assert torch.autograd.gradcheck(
        lambda xx, ww, bb: tf.Convolution.apply(xx, ww, bb, 3, 2, True, plan, fresh(), "conv"), (x, weight, bias))


def test_a_pruned_measurement_still_gives_a_plan():
    """Pruning may leave only the weight gradient that builds its own patches: it stands for im2col + GEMM."""
    seconds = {("forward", "im2col-gemm"): 1.0, ("forward", "library"): 1.1,
               ("weight gradient", tf.conv_plans.OWN_PATCHES): 0.9}
    assert tf.conv_plans.choose_layer(seconds)["weight"] == "im2col-gemm"


@pytest.mark.parametrize("size", [5, 6])  # an odd size pads the phases
def test_a_spectral_plan_reuses_its_forwards_spectra_through_the_backward(rng, size):
    """All three products spectral: the backward takes the spectra the forward kept (saved for backward, so
    autograd checks that nothing overwrote them) and the weight gradient's output-gradient spectrum."""
    x, weight, bias = conv_case(rng, 3, 2, channels=2, out_channels=3, size=size)
    plan = tf.ConvPlan("spectral", "spectral", "spectral")
    assert torch.autograd.gradcheck(
        lambda xx, ww, bb: tf.Convolution.apply(xx, ww, bb, 3, 2, True, plan, fresh(), "conv"), (x, weight, bias))


def test_a_spectral_forward_is_chosen_for_what_its_backward_saves():
    """Slowest forward alone, but its spectra make both backward products cheap; after another forward they
    would cost their own-spectra times, and then im2col + GEMM throughout wins."""
    own = tf.conv_plans.OWN_SPECTRA
    seconds = {("forward", "im2col-gemm"): 1.0, ("forward", "spectral"): 1.3,
               ("weight gradient", "im2col-gemm"): 1.0, ("weight gradient", tf.conv_plans.OWN_PATCHES): 1.2,
               ("weight gradient", "spectral"): 0.4, ("weight gradient", own): 1.1,
               ("input gradient", "rows"): 1.0, ("input gradient", "spectral"): 0.4, ("input gradient", own): 1.05}
    assert tf.conv_plans.choose_layer(seconds) == {"forward": "spectral", "weight": "spectral", "input": "spectral"}
    seconds[("forward", "spectral")] = 2.5
    assert tf.conv_plans.choose_layer(seconds) == {"forward": "im2col-gemm", "weight": "im2col-gemm", "input": "rows"}
    seconds[("input gradient", own)] = 0.9  # cheaper than rows even when it builds its own spectra
    assert tf.conv_plans.choose_layer(seconds)["input"] == "spectral"


def test_the_nhwc_images_have_the_strides_of_a_fresh_nhwc_tensor():
    """For one channel, permute + contiguous keeps the NCHW memory, which oneDNN reads as NCHW."""
    images = torch.rand(3, 1, 5, 5)
    x = tf.nhwc(images)
    assert x.stride() == torch.empty(3, 5, 5, 1).stride() != images.permute(0, 2, 3, 1).contiguous().stride()
    assert torch.equal(x, images.permute(0, 2, 3, 1))


def test_a_spectral_plan_says_its_rates_are_effective(tmp_path, monkeypatch):
    monkeypatch.setenv(PLAN_CACHE_ENV, str(tmp_path))
    _, facts = tf.choose_plan(SMALL, 4, "float64", "cpu", measure=lambda *a: fake_timings("library", "rows"))
    assert "note" not in facts
    timings = fake_timings("spectral", "spectral")
    timings["primary_caps"]["weight gradient/spectral"] = 1.0  # reusing the forward's spectra
    plan, facts = tf.choose_plan(SMALL, 8, "float64", "cpu", measure=lambda *a: timings)
    assert plan.primary == tf.ConvPlan("spectral", "spectral", "spectral")
    assert facts["note"] == tf.SPECTRAL_NOTE and "effective" in facts["note"]


def test_a_smaller_batch_takes_the_plan_of_a_larger_one_planned_before(tmp_path, monkeypatch):
    """The last, partial batch of an epoch or an evaluation (104 of 128) must not measure a plan of its own:
    that measuring took 12 to 36 s inside one step.  A larger batch than any planned is planned."""
    monkeypatch.setenv(PLAN_CACHE_ENV, str(tmp_path))
    measured = []

    def measure(config, batch_size, dtype, device):
        measured.append(batch_size)
        return fake_timings("offsets", "col2im")

    monkeypatch.setattr(tf, "measure_plan", measure)
    from harness.params import init_parameters

    impl = tf.TorchFusedCapsNet(SMALL, init_parameters(SMALL), "float64")
    for batch_size in (4, 8, 3, 6):
        impl.forward(impl.to_device(synthetic_batch(SMALL, batch_size, seed=0)[0]), train=False)
    assert measured == [4, 8]  # 3 takes 4's plan (the smallest planned at least as large), 6 takes 8's
    facts = impl.plan_facts()
    assert facts["3"]["source"].startswith("batch 4's plan") and facts["6"]["source"].startswith("batch 8's plan")
    assert facts["3"]["primary_caps"] == facts["4"]["primary_caps"] and "seconds" not in facts["3"]
    assert tf.serving_batch_size(128, {32: None}) is None and tf.serving_batch_size(104, {256: 0, 128: 0}) == 128


def test_a_measured_plan_says_so_in_one_line_and_its_seconds_add_up_apart(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PLAN_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(tf, "measure_plan", lambda *a: (time.sleep(0.2), fake_timings("offsets", "col2im"))[1])
    from harness.params import init_parameters

    impl = tf.TorchFusedCapsNet(SMALL, init_parameters(SMALL), "float64")
    impl.use_plan_for(4)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("torch-fused: measuring its convolution plan for batch 4 ")
    assert str(tmp_path) in err and impl.plan_seconds >= 0.2
    second = tf.TorchFusedCapsNet(SMALL, init_parameters(SMALL), "float64")
    second.use_plan_for(4)  # from the cache: nothing said
    assert capsys.readouterr().err == "" and second.plan_seconds < 0.2
