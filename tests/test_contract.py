"""The Implementation contract (harness.contract), held against every implementation the registry knows that
can run here, built-in or plugin, as timm tests every model of ``list_models()``: a new implementation is
covered by adding nothing.  GPU classes whose array module can be NumPy also run here, as CPU stand-ins.
What routing touches (parity, backward twice, every parameter moving, the routing tensors' finite differences,
routing alone, u_hat's layout, Adam's state) is held under every routing algorithm each implementation declares
(``routing_algorithms``, harness.routing_algorithms): a test id names the algorithm unless it is dynamic.

Each test names the contract clause it checks; counts come from the definition (``init_parameters``,
``harness.check.quantities``), never typed literals.
"""

from __future__ import annotations

import contextlib
import tracemalloc

import numpy as np
import pytest

from harness import registry, routing_algorithms
from harness.check import check_implementation, quantities, routing_case_parameters
from harness.data import synthetic_batch
from harness.decoder import mask_to_classes
from harness.params import DIGIT_WEIGHT, init_parameters, parameter_shapes, routing_parameter_shapes
from harness.spec import DEFAULT_ROUTING_ALGORITHM, SMALL, LearningRateSchedule
from implementations.numpy.capsnet import NumpyCapsNet
from implementations.torch.autograd import TorchCapsNet

from gradcheck_util import finite_difference_errors, finite_difference_failures, livelier_parameters


def cpu_stand_ins() -> dict[str, type]:
    """For each GPU implementation built on the NumPy code that cannot run here: its own class with NumPy as
    the array module, so everything but its GPU-only kernels runs on the CPU."""
    stand_ins = {}
    for info in registry.entries():
        if info.device == "cuda" and issubclass(info.cls, NumpyCapsNet) and not info.availability():
            stand_ins[f"{info.name}-on-numpy"] = type(f"{info.cls.__name__}OnNumpy", (info.cls,), {
                "array_module": classmethod(lambda cls: np),
                "availability": classmethod(lambda cls, device: registry.Availability.ok()),
            })
    return stand_ins


STAND_INS = cpu_stand_ins()
STAND_IN_VARIANTS = {name: registry.get(name[: -len("-on-numpy")]).routing_variant for name in STAND_INS}
IMPLEMENTATIONS = registry.available() + sorted(STAND_INS)
DTYPES = list(registry.DTYPES)


def declared_algorithms(name: str) -> list[str]:
    """The known routing algorithms implementation ``name`` computes (harness.contract.routing_algorithm_support:
    its own, and a plugin's it runs by the reference)."""
    if name in STAND_INS:
        cls, variant = STAND_INS[name], STAND_IN_VARIANTS[name]
    else:
        cls, variant = registry.get(name).cls, registry.get(name).routing_variant
    return [algorithm for algorithm in routing_algorithms.names()
            if registry.routing_algorithm_support(cls, algorithm, variant)]


# (implementation, routing algorithm) for every algorithm each declares; the id is the implementation's name for
# dynamic routing (as before there were algorithms: tests/planted_bugs.py names them), NAME-ALGORITHM otherwise
CASES = [pytest.param(name, algorithm, id=name if algorithm == DEFAULT_ROUTING_ALGORITHM else f"{name}-{algorithm}")
         for name in IMPLEMENTATIONS for algorithm in declared_algorithms(name)]


def routed_by(algorithm: str, **changes):
    """The small network routing with ``algorithm`` (and ``changes``)."""
    return SMALL.replace(routing_algorithm=algorithm, **changes)


@pytest.fixture(scope="module", autouse=True)
def stand_ins_registered():
    with contextlib.ExitStack() as stack:
        for name, cls in STAND_INS.items():
            stack.enter_context(registry.registered(name, cls, device="cpu", routing_variant=STAND_IN_VARIANTS[name]))
        yield


def build(name: str, dtype: str = "float64", params=None, config=SMALL):
    params = init_parameters(config, dtype=dtype) if params is None else params
    return registry.create(name, config, params, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, algorithm", CASES)
def test_parity_with_the_float64_reference(name, algorithm, dtype):
    """Outputs, loss, gradients, parameters after Adam, u_hat and routing alone at 1, 3 and 5 iterations (once
    for an algorithm that does not iterate), and the routing case (harness.check.ROUTING_SCALE, the algorithm's
    own parameters drawn), where routing bugs fail in float32 too; against the reference computing the same
    algorithm."""
    config = routed_by(algorithm)
    rows = check_implementation(name, config, dtype)
    assert [row.quantity for row in rows] == quantities(config)
    assert all(row.passed for row in rows), [row for row in rows if not row.passed]


FINAL = SMALL.replace(routing_gradient="final")
FINAL_IMPLEMENTATIONS = [name for name in IMPLEMENTATIONS if "final" in (
    STAND_INS[name] if name in STAND_INS else registry.get(name).cls).routing_gradients]
# Compiling implementations compile their graphs again for the final network (minutes on a CPU): their routing
# is torch-vectorised's own function, traced; `python -m harness.check --routing-gradient final` checks them.
FINAL_PARITY = [name for name in FINAL_IMPLEMENTATIONS
                if name in STAND_INS or not registry.get(name).cls.first_call_compiles]


@pytest.mark.parametrize("name", FINAL_PARITY)
def test_parity_with_the_float64_reference_under_the_final_routing_gradient(name):
    """The same check with the early routing iterations' gradient stopped, against the reference computing
    the same (in float64, where the two settings' gradients are told apart; see harness.check)."""
    rows = check_implementation(name, FINAL, "float64")
    assert [row.quantity for row in rows] == quantities(FINAL)
    assert all(row.passed for row in rows), [row for row in rows if not row.passed]


def two_by_two_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Routing with two input capsules that carry anything (the rest zero), two output capsules of
    dimension 1 and two iterations, its final-gradient d v_1 / d u_hat worked out by hand.

    u_hat_1|1 = u_hat_2|2 = 1, u_hat_2|1 = u_hat_1|2 = 0.  Iteration 1: c = 1/2, s_j = 1/2, and with
    squash(s) = s |s| / (1 + s^2) (eps 0), v_j = 0.2.  Logits b_11 = b_22 = 0.2, b_12 = b_21 = 0, so
    c_11 = c_22 = p = e^0.2 / (1 + e^0.2) and c_12 = c_21 = 1 - p; a zero capsule i > 2 keeps c = 1/2.
    Iteration 2: s_1 = s_2 = p.  Under ``final`` c is a constant there and v_1 = squash(s_1) depends on
    u_hat_j|i only through s_1 = sum_i c_i1 u_hat_1|i, with squash'(p) = 2p / (1 + p^2)^2: so
    d v_1 / d u_hat_1|i = c_i1 * 2p / (1 + p^2)^2 and d v_1 / d u_hat_2|i = 0.
    """
    config = SMALL.replace(num_classes=2, digit_caps_dim=1, routing_iterations=2, squash_eps=0.0,
                           routing_gradient="final")
    u_hat = np.zeros((1, config.num_primary_caps, 2, 1))
    u_hat[0, 0, 0, 0] = u_hat[0, 1, 1, 0] = 1.0
    p = np.exp(0.2) / (1.0 + np.exp(0.2))
    slope = 2.0 * p / (1.0 + p * p) ** 2
    expected = np.zeros_like(u_hat)
    expected[0, :, 0, 0] = 0.5 * slope
    expected[0, 0, 0, 0], expected[0, 1, 0, 0] = p * slope, (1.0 - p) * slope
    return u_hat, np.array([[[1.0], [0.0]]]), expected


@pytest.mark.parametrize("name", FINAL_IMPLEMENTATIONS)
def test_final_routing_gradient_of_the_hand_worked_two_by_two_case(name):
    u_hat, grad_v, expected = two_by_two_case()
    config = SMALL.replace(num_classes=2, digit_caps_dim=1, routing_iterations=2, squash_eps=0.0,
                           routing_gradient="final")
    impl = build(name, config=config)
    own = impl.from_numpy(np.ascontiguousarray(u_hat.transpose(["BNJD".index(axis) for axis in impl.u_hat_layout])))
    grad = impl.canonical_u_hat(impl.routing_backward(own, impl.from_numpy(grad_v)))
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15)
    full = registry.create("torch-vectorised", config.replace(routing_gradient="full"),
                           init_parameters(config, dtype="float64"), "float64")
    assert not np.allclose(full.canonical_u_hat(full.routing_backward(full.from_numpy(u_hat), full.from_numpy(grad_v))),
                           expected, rtol=1e-3), "the case must tell the full gradient from the final one"


@pytest.mark.parametrize("name, algorithm", CASES)
def test_backward_twice_gives_the_same_gradients_not_their_sum(name, algorithm):
    config = routed_by(algorithm)
    impl = build(name, params=livelier_parameters(config), config=config)
    impl.forward_loss(impl.to_device(*synthetic_batch(config, 2)))
    impl.backward()
    first = impl.gradients()
    impl.backward()
    again = impl.gradients()
    assert list(again) == list(parameter_shapes(config))
    for param_name, gradient in again.items():
        assert gradient.shape == parameter_shapes(config)[param_name]
        assert np.any(gradient != 0), f"{param_name} has no gradient"
        np.testing.assert_array_equal(gradient, first[param_name], err_msg=param_name)


@pytest.mark.parametrize("name, algorithm", CASES)
def test_every_parameter_moves_in_training(name, algorithm):
    """Every canonical parameter, the routing algorithm's own included (self-attention's digit.bias), moves in
    three Adam steps."""
    config = routed_by(algorithm)
    start = livelier_parameters(config)
    impl = build(name, "float32", {key: value.astype(np.float32) for key, value in start.items()}, config=config)
    losses = [impl.train_step(impl.to_device(*synthetic_batch(config, 4, seed=seed))) for seed in range(3)]
    assert all(isinstance(loss, float) and np.isfinite(loss) for loss in losses)
    moved = impl.parameters()
    assert list(moved) == list(parameter_shapes(config))
    for param_name, value in moved.items():
        assert not np.allclose(value, start[param_name], rtol=0, atol=1e-7), f"{param_name} never changed"


@pytest.mark.parametrize("name, algorithm", CASES)
def test_whole_model_gradients_against_finite_differences(name, algorithm):
    """Central finite differences of the whole loss in float64: every tensor under dynamic routing; under
    another algorithm the tensors its routing reads, digit.weight and its own parameters (self-attention's
    digit.bias, drawn non-zero), the rest of the network being the same code under every algorithm."""
    config = routed_by(algorithm, reconstruction_weight=0.5)  # decoder gradients large enough for differences
    routing = [DIGIT_WEIGHT, *routing_parameter_shapes(config)]
    tensors = None if algorithm == DEFAULT_ROUTING_ALGORITHM else routing
    errors = finite_difference_errors(name, config, per_tensor=3, tensors=tensors)
    assert list(errors) == list(tensors or init_parameters(config))
    failures = finite_difference_failures(errors)
    assert not failures, "\n" + failures


@pytest.mark.parametrize("name, algorithm", CASES)
def test_routing_alone_agrees_with_the_routing_inside_the_forward_pass(name, algorithm):
    """In the check's routing case (digit.weight x ROUTING_SCALE, the algorithm's parameters drawn), where one
    routing iteration more or fewer, logits never updated, or a bias left out of routing alone, changes v by
    more than a tenth, far beyond the 1e-12 allowed here."""
    config = routed_by(algorithm)
    impl = build(name, params=routing_case_parameters(config, "float64"), config=config)
    batch = impl.to_device(*synthetic_batch(config, 3))
    lengths, _ = impl.forward(batch, train=False)
    v = impl.to_numpy(impl.routing_forward(impl.prediction_vectors(batch)))
    assert v.shape == (3, config.num_classes, config.digit_caps_dim)
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), impl.to_numpy(lengths), rtol=1e-12)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_decoding_the_forward_pass_own_masked_capsules_gives_its_reconstruction(name):
    """decode(capsules) at the inference mask (the longest capsule) is the forward pass's reconstruction, and
    decodes what it is given: another class's capsule gives another image."""
    impl = build(name, params=livelier_parameters(SMALL))
    batch = impl.to_device(*synthetic_batch(SMALL, 3))
    lengths, reconstructions = impl.forward(batch, train=False)
    v = impl.to_numpy(impl.routing_forward(impl.prediction_vectors(batch)))
    longest = impl.to_numpy(lengths).argmax(axis=1)
    decoded = impl.decode(mask_to_classes(v, longest))
    assert isinstance(decoded, np.ndarray) and decoded.shape == (3, SMALL.image_pixels)
    np.testing.assert_allclose(decoded, impl.to_numpy(reconstructions), rtol=1e-9, atol=1e-12)
    another = impl.decode(mask_to_classes(v, (longest + 1) % SMALL.num_classes))
    assert np.abs(another - decoded).max() > 1e-6  # far above the 1e-12 the equality above allows


@pytest.mark.parametrize("name, algorithm", CASES)
def test_u_hat_comes_in_the_layout_its_routing_consumes(name, algorithm):
    """prediction_vectors returns u_hat as the implementation's routing reads it (its axes named by
    u_hat_layout), so the timed routing_forward converts nothing: for an implementation on NumPy it
    allocates far less than a copy of u_hat."""
    config = routed_by(algorithm, digit_caps_dim=32)  # u_hat 32x the routing's own per-capsule arrays
    impl = build(name, "float32", config=config)
    u_hat = impl.prediction_vectors(impl.to_device(*synthetic_batch(config, 4)))
    assert sorted(impl.u_hat_layout) == sorted("BNJD")
    shape = dict(zip(impl.u_hat_layout, u_hat.shape))
    assert shape == {"B": 4, "N": config.num_primary_caps, "J": config.num_classes, "D": config.digit_caps_dim}
    assert impl.canonical_u_hat(u_hat).shape == (4, *config.u_hat_shape)
    if isinstance(u_hat, np.ndarray):
        assert u_hat.flags.c_contiguous
        tracemalloc.start()
        impl.routing_forward(u_hat)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < u_hat.nbytes / 2, f"routing_forward allocated {peak} bytes for a u_hat of {u_hat.nbytes}"


@pytest.mark.parametrize("name, algorithm", CASES)
def test_adam_state_resumes_a_run_exactly(name, algorithm):
    """adam_state / load_adam_state: an implementation rebuilt from saved parameters and Adam state takes
    the same next step as the one that kept running, learning-rate schedule included (the moments of the
    routing algorithm's own parameters too)."""
    config = routed_by(algorithm)
    schedule = LearningRateSchedule("fast", decay_rate=0.5, decay_steps=1)
    batches = [synthetic_batch(config, 4, seed=seed) for seed in range(3)]
    running = build(name, config=config)
    running.set_schedule(schedule)
    for images, labels in batches[:2]:
        running.train_step(running.to_device(images, labels))
    state = running.adam_state()
    assert int(state["step"]) == 2
    assert {key for key in state if key != "step"} == {f"{kind}/{param}" for kind in ("first", "second")
                                                       for param in parameter_shapes(config)}
    resumed = build(name, params=running.parameters(), config=config)
    resumed.set_schedule(schedule)
    resumed.load_adam_state(state)
    for impl in (running, resumed):
        impl.train_step(impl.to_device(*batches[2]))
    for param_name, value in running.parameters().items():
        np.testing.assert_allclose(resumed.parameters()[param_name], value, rtol=1e-12, atol=1e-15, err_msg=param_name)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_a_training_forward_pass_needs_labels(name):
    impl = build(name)
    images, _ = synthetic_batch(SMALL, 2)
    with pytest.raises(ValueError, match="labels"):
        impl.forward(impl.to_device(images), train=True)


class WrongConvGradient(TorchCapsNet):
    """A wrong plugin: its conv1 weight gradient is twice the true one."""

    def gradients(self):
        gradients = super().gradients()
        gradients["conv1.weight"] = 2 * gradients["conv1.weight"]
        return gradients


def test_a_wrong_gradient_fails_with_the_quantity_and_its_error_named():
    with registry.registered("wrong-conv-gradient", WrongConvGradient):
        errors = finite_difference_errors("wrong-conv-gradient", SMALL.replace(reconstruction_weight=0.5),
                                          per_tensor=1)
    lines = finite_difference_failures(errors).splitlines()
    assert lines[0] == (f"1 of {len(init_parameters(SMALL))} parameter gradients disagree with central finite "
                        "differences of the loss (float64; error relative to the tensor's largest gradient):")
    # |g - 2g| / max |2g| = 0.5
    assert lines[1].startswith("gradient of conv1.weight against finite differences: relative error 5.000e-01")
    assert lines[1].endswith(" > tolerance 1e-05  FAIL") and len(lines) == 2
    assert finite_difference_failures({"conv1.weight": 1e-9}) == ""
