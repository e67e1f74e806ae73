"""The parity gate (python -m harness.check): what it compares catches the bugs it is there for, and its
exit status says so both ways."""

from __future__ import annotations

import numpy as np
import pytest

from harness import check, registry, routing_algorithms
from harness.check import check_implementation, quantities
from harness.params import init_parameters
from harness.routing_algorithms import DIGIT_BIAS
from harness.spec import SMALL
from harness.tolerances import TOLERANCES
from implementations.numpy.capsnet import NumpyCapsNet
from implementations.torch.autograd import TorchCapsNet


class RoutingAloneStopsAtThree(TorchCapsNet):
    """Correct inside the network; its routing alone (what the routing benchmarks time) never runs more
    than 3 iterations."""

    def routing_forward(self, u_hat):
        from implementations.torch.routing import routing_vectorised

        iterations = min(self.config.routing_iterations, 3)
        return routing_vectorised(u_hat, iterations, self.config.squash_eps).detach()


class IgnoresTheSchedule(NumpyCapsNet):
    """Adam at the initial rate whatever the schedule says."""

    def set_schedule(self, schedule):
        pass


class CopiesUHatForRouting(NumpyCapsNet):
    """Routing alone on a u_hat it transposes back to (B, N, J, D) first and forgets to undo: wrong layout."""

    u_hat_layout = "BNJD"

    def prediction_vectors(self, batch):
        return super().prediction_vectors(batch).transpose(0, 2, 1, 3).copy()

    def routing_forward(self, u_hat):
        return super().routing_forward(np.ascontiguousarray(u_hat.transpose(0, 2, 1, 3)))

    def routing_backward(self, u_hat, grad_v):
        return super().routing_backward(np.ascontiguousarray(u_hat.transpose(0, 2, 1, 3)), grad_v)  # no undo


@pytest.fixture(autouse=True)
def fresh_reference(monkeypatch):
    """Every test computes the float64 reference itself: no test leans on one an earlier test cached."""
    monkeypatch.setattr(check, "_reference_cache", {})


def failed(cls, name) -> set[str]:
    with registry.registered(name, cls):
        return {row.quantity for row in check_implementation(name, SMALL, "float64") if not row.passed}


def test_routing_alone_is_checked_at_5_iterations():
    assert failed(RoutingAloneStopsAtThree, "stops-at-three") == {"routing v (5 it.)", "routing v (5 it.), W x200"}


def test_an_optimizer_that_ignores_the_learning_rate_schedule_fails():
    bad = failed(IgnoresTheSchedule, "ignores-schedule")
    assert bad and all(quantity.startswith("param ") for quantity in bad)


def test_a_routing_gradient_in_the_wrong_layout_fails():
    bad = failed(CopiesUHatForRouting, "wrong-layout")
    assert {f"routing grad u_hat ({count} it.)" for count in (1, 3, 5)} <= bad


def test_the_command_exits_0_when_everything_agrees(capsys):
    assert check.main(["--impl", "numpy-vectorised", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert f"all {len(quantities(SMALL))} quantities within tolerance" in out
    checked = {line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in registry.names()}
    assert checked == {"numpy-vectorised"}  # the one asked for, no other


def test_the_command_exits_1_on_a_planted_disagreement(capsys):
    with registry.registered("stops-at-three", RoutingAloneStopsAtThree):
        assert check.main(["--impl", "stops-at-three", "--dtype", "float64"]) == 1
    captured = capsys.readouterr()
    assert "FAILED: 2 of" in captured.err and "routing v (5 it.)" in captured.out


def test_an_unknown_implementation_exits_2(capsys):
    assert check.main(["--impl", "numpy-vectorized"]) == 2
    assert "unknown implementation 'numpy-vectorized'" in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [(np.array([1.0, 2.0]), 0.0), (np.array([1.0, 2.5]), 0.25),
                                              (np.array([np.nan, 2.0]), np.inf)])
def test_max_relative_error_by_hand(value, expected):
    assert check.max_relative_error(value, np.array([1.0, 2.0])) == expected


def test_max_relative_error_of_an_all_zero_reference_is_the_absolute_error():
    """A quantity whose reference is exactly zero (a gradient of an unused input, say) is judged by the
    absolute error, never divided by zero; float32 values are compared in float64; shapes must agree."""
    assert check.max_relative_error(np.array([0.0, -1e-3]), np.zeros(2)) == 1e-3
    assert check.max_relative_error(np.zeros(2), np.zeros(2)) == 0.0
    assert check.max_relative_error(np.array([1.0 + 2**-20], np.float32), np.array([1.0])) == 2**-20
    with pytest.raises(ValueError, match=r"shape \(3,\) differs from the reference's \(2,\)"):
        check.max_relative_error(np.zeros(3), np.zeros(2))


class LeaksThroughEarlyIterations(TorchCapsNet):
    """Claims the routing gradient final, but its routing lets the gradient through every iteration."""

    routing_gradients = ("full", "final")

    def route(self, u_hat):
        from implementations.torch.routing import routing_vectorised

        return routing_vectorised(u_hat, self.config.routing_iterations, self.config.squash_eps, gradient="full")


def test_a_plugin_that_claims_final_but_leaks_through_early_iterations_fails():
    final = SMALL.replace(routing_gradient="final")
    with registry.registered("leaks-early", LeaksThroughEarlyIterations):
        bad = {row.quantity for row in check_implementation("leaks-early", final, "float64") if not row.passed}
        assert not [row for row in check_implementation("leaks-early", SMALL, "float64") if not row.passed]
    iterations = SMALL.routing_iterations
    assert {f"routing grad u_hat ({iterations} it.)", "routing grad u_hat (5 it.)", "grad digit.weight"} <= bad
    assert "routing grad u_hat (1 it.)" not in bad  # one iteration: the two settings are one function
    with registry.registered("leaks-early", LeaksThroughEarlyIterations):  # float32 sees it in the routing case
        bad32 = {row.quantity for row in check_implementation("leaks-early", final, "float32") if not row.passed}
    assert bad32 and all(quantity.endswith(", W x200") for quantity in bad32)
    assert {f"routing grad u_hat ({iterations} it.), W x200", "grad digit.weight, W x200"} <= bad32


class OwnRoutingFullOnly(TorchCapsNet):
    """Overrides the routing hook without declaring routing gradients: it claims full alone."""

    def route(self, u_hat):
        return super().route(u_hat)


def test_an_implementation_without_the_routing_gradient_is_skipped_with_the_reason(capsys):
    assert OwnRoutingFullOnly.routing_gradients == ("full",)
    with registry.registered("own-routing", OwnRoutingFullOnly):
        code = check.main(["--impl", "own-routing", "--routing-gradient", "final", "--dtype", "float64"])
        with pytest.raises(registry.UnsupportedRoutingGradientError, match="'final'"):
            registry.create("own-routing", SMALL.replace(routing_gradient="final"), {}, "float64")
    out = capsys.readouterr()
    assert code == 1 and "nothing was checked" in out.err
    assert "skipped     own-routing" in out.out and "full only, not 'final'" in out.out


def test_the_routing_gradient_is_validated():
    with pytest.raises(ValueError, match="routing_gradient must be one of full, final"):
        SMALL.replace(routing_gradient="last")


def perturbed(reference: check.Observation, quantity: str, relative: float) -> check.Observation:
    """The reference with one entry of ``quantity`` (its largest) moved by ``relative`` x max|reference|."""
    values = {name: value.copy() for name, value in reference.values.items()}
    entry = values[quantity].reshape(-1)  # a view: writes land in values[quantity]
    largest = int(np.argmax(np.abs(entry)))
    entry[largest] += relative * float(np.abs(entry[largest]))
    return check.Observation(values)


@pytest.mark.parametrize("dtype", sorted(TOLERANCES))
def test_every_tolerance_is_tight_from_both_sides(dtype):
    """Half the tolerance of its kind passes, twice fails naming that quantity alone: for outputs, gradients
    and parameters after Adam in both dtypes (so a tolerance loosened or tightened tenfold fails here)."""
    reference = check.reference_observation(SMALL)
    tolerance = {"float64": {"output": 1e-10, "gradient": 1e-9, "parameter": 1e-8},
                 "float32": {"output": 2e-5, "gradient": 1e-3, "parameter": 1e-2}}[dtype]
    kinds = {"lengths": "output", "loss": "output", "u_hat": "output", "routing v (3 it.)": "output",
             "routing grad u_hat (3 it.)": "gradient", "grad decoder.0.weight": "gradient",
             "param conv1.weight": "parameter"}
    assert {quantity: check.Observation.kind(quantity) for quantity in kinds} == kinds
    assert set(reference.values) == set(quantities(SMALL))
    for quantity in reference.values:
        allowed = tolerance[check.Observation.kind(quantity)]
        below = check.compare("x", dtype, perturbed(reference, quantity, 0.5 * allowed), reference)
        assert all(row.passed for row in below), quantity
        above = check.compare("x", dtype, perturbed(reference, quantity, 2 * allowed), reference)
        assert [row.quantity for row in above if not row.passed] == [quantity]
        assert next(row.error for row in above if row.quantity == quantity) == pytest.approx(2 * allowed)


def test_a_quantity_missing_or_misshapen_fails():
    reference = check.reference_observation(SMALL)
    values = dict(reference.values)
    del values["loss"]
    values["lengths"] = values["lengths"][:, :-1]
    failing = {row.quantity for row in check.compare("x", "float64", check.Observation(values), reference)
               if not row.passed}
    assert failing == {"loss", "lengths"}


def test_the_options_reach_what_the_check_runs(monkeypatch, capsys):
    """--impl, --dtype, --config, --batch-size, --device and --time, spied on in the calls they cause."""
    calls, timed = [], []

    def spy(name, config, dtype, batch_size):
        calls.append((name, config, dtype, batch_size))
        return [check.Row(name, dtype, "loss", 0.0, 1.0)]

    monkeypatch.setattr(check, "check_implementation", spy)
    monkeypatch.setattr(check, "time_train_step", lambda name, config, dtype, batch: timed.append((name, batch)) or 1.0)
    assert check.main(["--impl", "numpy-vectorised", "torch-looped", "--dtype", "float64", "--config", "paper",
                       "--batch-size", "3"]) == 0
    paper = check.get_config("paper")
    assert calls == [("numpy-vectorised", paper, "float64", 3), ("torch-looped", paper, "float64", 3)] and not timed
    calls.clear()
    assert check.main(["--impl", "numpy-vectorised", "--time"]) == 0
    assert calls == [("numpy-vectorised", SMALL, dtype, check.CHECK_BATCH_SIZE) for dtype in ("float32", "float64")]
    assert timed == [("numpy-vectorised", check.CHECK_BATCH_SIZE)] * 2
    calls.clear()
    assert check.main(["--device", "cuda", "--impl", "numpy-vectorised"]) == 1  # a CPU implementation: nothing
    assert not calls
    capsys.readouterr()


def agreeing_rows(name, config, dtype, batch_size):
    """What check_implementation gives for an implementation that agrees: one quantity, well within."""
    return [check.Row(name, dtype, "loss", 0.0, 1.0)]


def test_the_table_prints_each_quantity_its_error_and_verdict():
    rows = [check.Row("numpy-vectorised", "float32", "loss", 1.5e-6, 2e-5),
            check.Row("numpy-vectorised", "float32", "grad conv1.weight", 2.5e-3, 1e-3)]
    header = (f"{'implementation':<24} {'dtype':<8} {'quantity':<36} {'max rel error':>13} {'tolerance':>10}  "
              "status")
    assert check.format_table(rows).split("\n") == [
        header, "-" * len(header),
        f"{'numpy-vectorised':<24} {'float32':<8} {'loss':<36} {'1.500e-06':>13} {'2e-05':>10}  ok",
        f"{'numpy-vectorised':<24} {'float32':<8} {'grad conv1.weight':<36} {'2.500e-03':>13} {'1e-03':>10}  FAIL"]
    assert max(len(quantity) for quantity in quantities(check.get_config("paper"))) <= 36  # every name fits


class CountsSteps(NumpyCapsNet):
    """A training step that only records the batch size and parameter dtype it was given."""

    steps: list = []

    def train_step(self, batch):
        type(self).steps.append((len(batch.labels), self.parameters()["conv1.weight"].dtype.name))
        return 0.0


def test_the_timed_step_is_the_median_after_one_untimed_step(monkeypatch):
    """A clock reading 0, 1 | 10, 12 | 20, 23: steps of 1, 2 and 3 s, median 2; four steps run (one warm-up)."""
    import types

    readings = iter([0.0, 1.0, 10.0, 12.0, 20.0, 23.0])
    monkeypatch.setattr(CountsSteps, "steps", [])
    monkeypatch.setattr(check, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    with registry.registered("counts-steps", CountsSteps):
        assert check.time_train_step("counts-steps", SMALL, "float64", 2, repeats=3) == 2.0
    assert CountsSteps.steps == [(2, "float64")] * 4


class LossOffByOnePerMille(NumpyCapsNet):
    """Reports a loss 0.1 % too large; everything else is right."""

    def forward_loss(self, batch):
        return super().forward_loss(batch) * (1 + 1e-3)


def test_the_tracked_error_is_the_largest_of_any_quantity():
    with registry.registered("loss-off", LossOffByOnePerMille):
        assert check.max_error("loss-off", SMALL, "float64") == pytest.approx(1e-3, rel=1e-6)
        rows = check_implementation("loss-off", SMALL, "float64")
    assert {row.quantity for row in rows if not row.passed} == {"loss", "loss, W x200"}


def test_the_batch_size_reaches_the_implementation_and_the_reference():
    rows = check_implementation("numpy-vectorised", SMALL, "float64", batch_size=3)
    assert rows and all(row.passed for row in rows)
    assert check.observe("numpy-vectorised", SMALL, "float64", batch_size=3).values["lengths"].shape[0] == 3
    assert check.reference_observation(SMALL, batch_size=3).values["lengths"].shape[0] == 3


def test_every_available_implementation_by_default_and_one_crash_hides_no_other(monkeypatch, capsys):
    """No --impl: every registered implementation that can run here, in registry order, an unavailable one
    (a CUDA implementation here) skipped without ending the loop; --device all is accepted; one that
    raises is reported by name and error while the others' rows still print, and the exit status is 1."""
    calls = []

    def spy(name, config, dtype, batch_size):
        calls.append(name)
        if name == "numpy-looped":
            raise RuntimeError("boom")
        return [check.Row(name, dtype, "loss", 0.0, 1.0)]

    monkeypatch.setattr(check, "check_implementation", spy)
    runnable = [info.name for info in registry.entries() if info.availability() and info.supports("full")]
    assert check.main(["--dtype", "float64", "--device", "all"]) == 1
    assert calls == runnable and "numpy-looped" in runnable
    out = capsys.readouterr()
    assert "CRASHED     numpy-looped float64" in out.out and "RuntimeError: boom" in out.out
    assert "numpy-vectorised" in out.out and "1 run(s) crashed" in out.err
    calls.clear()
    assert check.main(["--impl", "torch-vectorised-cuda", "numpy-vectorised", "--dtype", "float64"]) == 0
    assert calls == ["numpy-vectorised"]


def test_the_timed_step_is_printed_in_milliseconds(monkeypatch, capsys):
    monkeypatch.setattr(check, "check_implementation", agreeing_rows)
    timed = []
    monkeypatch.setattr(check, "time_train_step", lambda *args: timed.append(args) or 0.25)
    assert check.main(["--impl", "numpy-vectorised", "--dtype", "float64", "--time"]) == 0
    assert timed == [("numpy-vectorised", SMALL, "float64", check.CHECK_BATCH_SIZE)]
    assert f"train step  {'numpy-vectorised float64':<32} {250.0:10.2f} ms  (batch 8, median of 5)" in (
        capsys.readouterr().out)


def test_the_first_line_says_what_is_compared_and_why_the_default_network(monkeypatch, capsys):
    monkeypatch.setattr(check, "check_implementation", agreeing_rows)
    why = check.options.config_note(check.CHECK_CONFIG, check.CHECK_CONFIG_WHY)
    assert why and check.main(["--impl", "numpy-vectorised", "--dtype", "float64"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"reference: torch-vectorised float64 on the CPU; config small (the default, {why}); batch 8; 3 Adam "
        "steps; routing algorithm dynamic; routing gradient full")
    assert check.main(["--impl", "numpy-vectorised", "--dtype", "float64", "--config", "paper", "--batch-size", "2",
                       "--routing-gradient", "final"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "reference: torch-vectorised float64 on the CPU; config paper; batch 2; 3 Adam steps; routing algorithm "
        "dynamic; routing gradient final")


def test_a_reference_that_cannot_run_here_ends_the_check_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(check, "REFERENCE", "torch-vectorised-cuda")  # no GPU in the test environment
    reason = registry.get("torch-vectorised-cuda").availability().reason
    assert reason and check.main(["--impl", "numpy-vectorised"]) == 2
    assert capsys.readouterr().err == f"error: the reference torch-vectorised-cuda cannot run here: {reason}\n"


def test_the_tracked_error_is_checked_at_the_batch_size_asked(monkeypatch):
    seen = []
    monkeypatch.setattr(check, "check_implementation", lambda *args: seen.append(args) or [
        check.Row("x", "float64", "loss", 0.5, 1.0), check.Row("x", "float64", "lengths", 0.25, 1.0)])
    assert check.max_error("numpy-vectorised", SMALL, "float64", batch_size=3) == 0.5
    assert seen == [("numpy-vectorised", SMALL, "float64", 3)]


def test_every_adam_step_of_the_check_has_a_batch_of_its_own():
    batches = check.check_batches(SMALL, batch_size=4)
    assert len(batches) == 1 + check.ADAM_STEPS and all(len(labels) == 4 for _, labels in batches)
    images = [batch[0] for batch in batches]
    assert all(not np.array_equal(images[i], images[j]) for i in range(len(images)) for j in range(i))


def test_the_error_of_an_empty_quantity_is_zero():
    assert check.max_relative_error(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


class TrainsWithThePredictedMask(NumpyCapsNet):
    """Masks the reconstruction by the predicted class in training too (the label's mask is the paper's)."""

    def forward(self, batch, train=True):
        return super().forward(batch, train=False)


class InfersWithTheLabelsMask(NumpyCapsNet):
    """Masks the reconstruction by the label at inference too, where no label may be used."""

    def forward(self, batch, train=True):
        return super().forward(batch, train=True)


def test_each_reconstruction_mask_is_checked_on_its_own():
    assert failed(TrainsWithThePredictedMask, "predicted-mask") == {"reconstructions", "reconstructions, W x200"}
    assert failed(InfersWithTheLabelsMask, "labels-mask") == {"reconstructions (inference)",
                                                              "reconstructions (inference), W x200"}


def routing_with(u_hat, iterations: int, eps: float, bug: str = ""):
    """Procedure 1 on u_hat (B, N, J, D), transcribed apart from the implementations' routing, with one plausible
    bug: "no logit update", "softmax over inputs" (the couplings normalised over the input capsules i instead of
    the output capsules j), "one too many" or "one too few" iterations (at least one)."""
    import torch

    from implementations.torch.routing import squash

    iterations = max(1, iterations + {"one too many": 1, "one too few": -1}.get(bug, 0))
    logits = u_hat.new_zeros(u_hat.shape[:3])  # b_ij
    for iteration in range(iterations):
        coupling = torch.softmax(logits, dim=1 if bug == "softmax over inputs" else 2)
        v = squash((coupling.unsqueeze(-1) * u_hat).sum(dim=1), eps)  # v_j = squash(sum_i c_ij u_hat_j|i)
        if iteration < iterations - 1 and bug != "no logit update":
            logits = logits + (u_hat * v.unsqueeze(1)).sum(dim=-1)  # b_ij += u_hat_j|i . v_j
    return v


def routing_plugin(bug: str) -> type:
    """A torch CapsNet whose routing, in the network and alone, is :func:`routing_with` that bug."""
    return type(f"Routing{bug.title().replace(' ', '')}", (TorchCapsNet,), {
        "route": lambda self, u_hat: routing_with(u_hat, self.config.routing_iterations, self.config.squash_eps, bug)})


@pytest.mark.parametrize("bug", ["no logit update", "softmax over inputs", "one too many", "one too few"])
def test_a_routing_bug_fails_in_float32_on_the_small_network(bug):
    """At the canonical parameters routing hardly moves the couplings, so a routing that never updates its
    logits, or runs one iteration more or fewer, agrees there even in float32; the routing case (digit.weight
    x ROUTING_SCALE) fails each, in the network (lengths, gradients) and in routing alone."""
    with registry.registered(f"routing-{bug}", routing_plugin(bug)):
        bad = {row.quantity for row in check_implementation(f"routing-{bug}", SMALL, "float32") if not row.passed}
    assert {"lengths, W x200", "grad digit.weight, W x200", "routing v (3 it.), W x200"} <= bad
    if bug != "softmax over inputs":  # the canonical parameters see a wrong softmax axis, and nothing else here
        assert all(quantity.endswith(", W x200") for quantity in bad)


def test_the_transcription_the_routing_bugs_are_planted_in_passes_in_float32():
    """:func:`routing_with` without a bug agrees with the reference: the failures above are the bugs'."""
    with registry.registered("routing-as-written", routing_plugin("")):
        rows = check_implementation("routing-as-written", SMALL, "float32")
    assert [row.quantity for row in rows] == quantities(SMALL) and all(row.passed for row in rows)


# Routing algorithms: the check per algorithm (--routing-algorithm), self-attention's own case, a plugin's algorithm

SELF_ATTENTION = SMALL.replace(routing_algorithm="self-attention")


def self_attention_with(u_hat, bias, eps: float, bug: str = ""):
    """Self-attention routing (harness.spec) on u_hat (B, N, J, D) with ``bias`` b (J, N), transcribed with
    broadcasting over (B, N, J), apart from the implementations' routing, with one plausible bug: "softmax over
    inputs" (normalised over the input capsules i, as transformer attention does, not over the outputs j),
    "bias before softmax" (softmax_j(a_ij + b_ji)), "bias reshaped" (b read as an (N, J) array, the layout of
    the couplings, instead of transposed), "sum without i" (the agreement of i with the other predictions only),
    "dynamic squash" (Sabour's squash instead of Efficient-CapsNet's)."""
    import torch

    from implementations.torch.routing import squash

    total = u_hat.sum(dim=1, keepdim=True)  # sum_k u_hat_j|k, (B, 1, J, D)
    if bug == "sum without i":
        total = total - u_hat
    logits = (u_hat * total).sum(dim=-1) / u_hat.shape[-1] ** 0.5  # a_ij, (B, N, J)
    n_out, n_in = bias.shape
    by_input = bias.reshape(n_in, n_out) if bug == "bias reshaped" else bias.T  # b_ji at [i, j]
    if bug == "bias before softmax":
        coupling = torch.softmax(logits + by_input, dim=2)
    else:
        coupling = torch.softmax(logits, dim=1 if bug == "softmax over inputs" else 2) + by_input
    s = (coupling.unsqueeze(-1) * u_hat).sum(dim=1)  # s_j = sum_i c_ij u_hat_j|i, (B, J, D)
    if bug == "dynamic squash":
        return squash(s, eps)
    norm = torch.sqrt((s * s).sum(dim=-1, keepdim=True) + eps)
    return -torch.expm1(-norm) * s / norm


def self_attention_plugin(bug: str) -> type:
    """A torch CapsNet that computes self-attention (alone) by :func:`self_attention_with` that bug."""
    return type(f"SelfAttention{bug.title().replace(' ', '')}", (TorchCapsNet,), {
        "routing_algorithms": ("self-attention",),
        "route": lambda self, u_hat: self_attention_with(u_hat, self.params[DIGIT_BIAS], self.config.squash_eps, bug)})


def failed_under(cls, name: str, config, dtype: str = "float32") -> set[str]:
    with registry.registered(name, cls):
        return {row.quantity for row in check_implementation(name, config, dtype) if not row.passed}


def test_a_non_iterative_algorithm_has_routing_alone_checked_once_without_an_iteration_count():
    names = quantities(SELF_ATTENTION)
    assert check.routing_iteration_counts(SELF_ATTENTION) == [None]
    routing = [quantity for quantity in names if quantity.startswith("routing ")]
    assert routing == ["routing v", "routing grad u_hat", "routing v, W x200", "routing grad u_hat, W x200"]
    assert not [quantity for quantity in names if " it.)" in quantity]
    assert {"grad digit.bias", "param digit.bias", "grad digit.bias, W x200"} <= set(names)
    assert check.routing_iteration_counts(SMALL) == [1, 3, 5]  # dynamic routing iterates: as before


def test_the_self_attention_transcription_the_bugs_are_planted_in_passes_in_float32():
    """:func:`self_attention_with` without a bug agrees with the reference, every quantity named as
    :func:`quantities` says: the failures below are the bugs'."""
    with registry.registered("attention-as-written", self_attention_plugin("")):
        rows = check_implementation("attention-as-written", SELF_ATTENTION, "float32")
    assert [row.quantity for row in rows] == quantities(SELF_ATTENTION) and all(row.passed for row in rows)


@pytest.mark.parametrize("bug", ["softmax over inputs", "bias before softmax", "bias reshaped", "sum without i",
                                 "dynamic squash"])
def test_a_self_attention_bug_fails_in_float32_on_the_small_network(bug):
    """Each fails routing alone and the network's outputs of the routing case (digit.weight x200, digit.bias
    drawn), in float32, errors 0.04 to 0.9 against tolerances of 2e-5."""
    bad = failed_under(self_attention_plugin(bug), f"attention-{bug}", SELF_ATTENTION)
    assert {"routing v, W x200", "routing grad u_hat, W x200", "lengths, W x200", "grad digit.weight, W x200",
            "grad digit.bias, W x200"} <= bad


@pytest.mark.parametrize("bug", ["bias before softmax", "bias reshaped"])
def test_a_zero_bias_cannot_tell_where_the_bias_goes_the_routing_case_draws_it(bug, monkeypatch):
    """At digit.bias = 0 (its initial value) a bias added before the softmax, or read in the couplings' layout,
    computes the right outputs and v: only the bias's own gradient and value after Adam see it.  The routing
    case's drawn bias makes routing alone and every output see it too."""
    monkeypatch.setattr(check, "ROUTING_PARAMETER_STD", 0.0)
    assert failed_under(self_attention_plugin(bug), f"zero-bias-{bug}", SELF_ATTENTION) == {
        "grad digit.bias", "param digit.bias", "grad digit.bias, W x200"}
    monkeypatch.setattr(check, "ROUTING_PARAMETER_STD", 0.05)
    monkeypatch.setattr(check, "_reference_cache", {})
    assert {"routing v, W x200", "lengths, W x200"} <= failed_under(self_attention_plugin(bug), f"drawn-{bug}",
                                                                      SELF_ATTENTION)


def softmax_couplings(config, params) -> np.ndarray:
    """softmax_j(a_ij) of self-attention (harness.spec) on the check's batch, in NumPy from torch-vectorised's
    u_hat: (B, N, J)."""
    impl = registry.create("torch-vectorised", config, params, "float64")
    images, labels = check.check_batches(config)[0]
    u_hat = impl.canonical_u_hat(impl.prediction_vectors(impl.to_device(images, labels)))  # (B, N, J, D)
    logits = np.einsum("bnjd,bjd->bnj", u_hat, u_hat.sum(axis=1)) / np.sqrt(config.digit_caps_dim)
    exps = np.exp(logits - logits.max(axis=2, keepdims=True))
    return exps / exps.sum(axis=2, keepdims=True)


def test_the_routing_case_makes_self_attention_route_and_draws_its_bias():
    """At the canonical parameters the couplings are 1/J to 2e-4 of it (nothing routes); in the routing case
    (x200) they range from below 0.01 to above 0.9 (docs/correctness.md: 4e-4 to 0.96), so the routing case
    holds self-attention to routing that routes.  Its digit.bias is drawn, N(0, 0.05^2), the same in every
    call; every other parameter is the dynamic routing case's."""
    canonical = softmax_couplings(SELF_ATTENTION, init_parameters(SELF_ATTENTION, dtype=np.float64))
    assert np.abs(canonical - 0.1).max() < 2e-5
    params = check.routing_case_parameters(SELF_ATTENTION, "float64")
    routed = softmax_couplings(SELF_ATTENTION, params)
    assert routed.min() < 0.01 and routed.max() > 0.9
    bias = params[DIGIT_BIAS]
    assert bias.shape == (SMALL.num_classes, SMALL.num_primary_caps) and 0.045 < bias.std() < 0.055
    np.testing.assert_array_equal(bias, check.routing_case_parameters(SELF_ATTENTION, "float64")[DIGIT_BIAS])
    dynamic = check.routing_case_parameters(SMALL, "float64")
    assert list(params) == [*dynamic, DIGIT_BIAS]
    for name, value in dynamic.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    canonical_weight = init_parameters(SMALL, dtype=np.float64)["digit.weight"]
    np.testing.assert_array_equal(dynamic["digit.weight"], check.ROUTING_SCALE * canonical_weight)


def test_self_attention_routes_on_the_paper_network_at_its_own_scale_without_saturating():
    """Self-attention's routing case shrinks its scale with the inputs, (144 / N)^(2/3): x50 on the paper network
    (at x200 its couplings are one-hot, every capsule is 1 long and the float32 reference fails against its
    float64 self; docs/correctness.md), where the couplings still range from below 0.02 to above 0.5 and no
    capsule is longer than 0.999; the quantities say which scale."""
    paper = check.get_config("paper").replace(routing_algorithm="self-attention")
    assert [check.routing_scale(config) for config in (SELF_ATTENTION, paper, check.get_config("paper"))] == [
        200, 50, 200]
    assert "lengths, W x50" in quantities(paper) and "lengths, W x200" in quantities(check.get_config("paper"))
    params = check.routing_case_parameters(paper, "float64")
    couplings = softmax_couplings(paper, params)
    assert couplings.min() < 0.02 and couplings.max() > 0.5
    impl = registry.create("torch-vectorised", paper, params, "float64")
    v = impl.routing_forward(impl.prediction_vectors(impl.to_device(*check.check_batches(paper)[0])))
    assert np.linalg.norm(impl.to_numpy(v), axis=-1).max() < 0.999


def test_the_command_checks_the_algorithm_asked_and_skips_an_implementation_without_it(monkeypatch, capsys):
    """--routing-algorithm reaches the config of every check; an implementation that does not compute the
    algorithm is skipped with the reason computes(config) gives; the first lines say the algorithm and that
    routing alone runs once."""
    calls = []
    monkeypatch.setattr(check, "check_implementation", lambda *args: calls.append(args) or agreeing_rows(*args))
    with registry.registered("own-routing", OwnRoutingFullOnly):
        assert check.main(["--routing-algorithm", "self-attention", "--impl", "own-routing", "torch-looped",
                           "--dtype", "float64"]) == 0
        reason = registry.get("own-routing").computes(SELF_ATTENTION).reason
    out = capsys.readouterr().out
    assert calls == [("torch-looped", SELF_ATTENTION, "float64", check.CHECK_BATCH_SIZE)]
    assert reason == "computes the routing algorithm dynamic only, not 'self-attention'"
    assert f"skipped     {'own-routing':<32} {reason}" in out.splitlines()
    first, second = out.splitlines()[:2]
    assert first.endswith("3 Adam steps; routing algorithm self-attention; routing gradient full")
    assert "digit.bias drawn N(initial, 0.05^2)" in second and second.endswith(
        "routing alone once (self-attention does not iterate)")
    assert check.main(["--impl", "torch-looped", "--dtype", "float64"]) == 0  # dynamic by default
    assert calls[-1] == ("torch-looped", SMALL, "float64", check.CHECK_BATCH_SIZE)
    assert capsys.readouterr().out.splitlines()[1].endswith("routing alone at 1, 3, 5 iterations")


def test_an_unknown_algorithm_is_one_line_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit:
        check.main(["--routing-algorithm", "self_attention"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert ("argument --routing-algorithm: unknown routing algorithm 'self_attention'; known routing algorithms: "
            "dynamic, self-attention") in err.splitlines()[-1]


def test_a_routing_gradient_without_meaning_under_the_algorithm_is_one_line_before_any_check(monkeypatch, capsys):
    monkeypatch.setattr(check, "check_implementation", lambda *args: pytest.fail("nothing may be checked"))
    assert check.main(["--routing-algorithm", "self-attention", "--routing-gradient", "final"]) == 2
    captured = capsys.readouterr()
    assert not captured.out and captured.err.count("\n") == 1
    assert captured.err.startswith("error: routing_gradient 'final' has no meaning under the routing algorithm "
                                   "'self-attention'")


def test_registered_routing_algorithm_refuses_a_taken_name_and_restores_the_known_ones():
    before = routing_algorithms.names()
    with routing_algorithms.registered_routing_algorithm(MEAN) as algorithm:
        assert routing_algorithms.get("test-mean") is algorithm and routing_algorithms.names() == [*before, "test-mean"]
    assert routing_algorithms.names() == before
    with pytest.raises(ValueError, match="'dynamic' is already registered"):
        with routing_algorithms.registered_routing_algorithm(routing_algorithms.RoutingAlgorithm("dynamic", "", True)):
            pass
    assert routing_algorithms.get("dynamic").source == "builtin"


# A plugin's routing algorithm: v_j = squash_e((1 + g_j) mean_i u_hat_j|i), with its own parameter g (J,), zero at
# the start; its reference is a torch function, so torch-vectorised computes it, and a plugin's implementation is
# checked against that.

GAIN = "test.gain"


def mean_routing(u_hat, gain, eps: float, stable: bool = True):
    """The plugin algorithm: (B, N, J, D) -> (B, J, D), with Efficient-CapsNet's squash; ``stable`` False writes
    its 1 - exp(-n) as the authors do, which loses float32's precision for short capsules (n ~ 3e-4 at the
    canonical parameters: an ulp of exp(-n) is 2e-4 of 1 - exp(-n)), where torch.expm1 keeps it."""
    import torch

    s = (1.0 + gain)[:, None] * u_hat.mean(dim=1)
    norm = torch.sqrt((s * s).sum(dim=-1, keepdim=True) + eps)
    return (-torch.expm1(-norm) if stable else 1.0 - torch.exp(-norm)) * s / norm


def mean_reference(u_hat, params, config):
    return mean_routing(u_hat, params[GAIN], config.squash_eps)


def unstable_mean_reference(u_hat, params, config):
    return mean_routing(u_hat, params[GAIN], config.squash_eps, stable=False)


def mean_algorithm(name: str = "test-mean", reference=mean_reference) -> routing_algorithms.RoutingAlgorithm:
    return routing_algorithms.RoutingAlgorithm(
        name, "a test's", iterative=False, parameters=lambda config: {GAIN: (config.num_classes,)},
        reference=reference, source="tests/test_check.py")


MEAN = mean_algorithm()


class MeanRouting(TorchCapsNet):
    """A plugin's implementation of the test-mean algorithm, its own code (an einsum), not the reference."""

    routing_algorithms = ("test-mean",)
    gain_after_squash = False

    def route(self, u_hat):
        import torch

        gain = 1.0 + self.params[GAIN]
        s = torch.einsum("bnjd->bjd", u_hat) / u_hat.shape[1]
        if not self.gain_after_squash:
            s = s * gain[:, None]
        norm = torch.sqrt((s * s).sum(dim=-1, keepdim=True) + self.config.squash_eps)
        v = -torch.expm1(-norm) * s / norm
        return v * gain[:, None] if self.gain_after_squash else v


class MeanRoutingGainAfterSquash(MeanRouting):
    """The gain applied to v instead of s: the same function while the gain is zero, its initial value."""

    gain_after_squash = True


def test_a_plugin_algorithm_is_checked_against_its_reference_in_torch_vectorised(capsys):
    """The plugin's implementation passes against torch-vectorised (which computes the algorithm by its
    reference), routing alone once (it does not iterate), its parameter drawn in the routing case; one that
    applies its parameter in the wrong place fails there; an implementation without the algorithm is skipped
    with the reason."""
    with routing_algorithms.registered_routing_algorithm(MEAN), registry.registered("mean-routing", MeanRouting), \
            registry.registered("mean-gain-after", MeanRoutingGainAfterSquash):
        config = SMALL.replace(routing_algorithm="test-mean")
        assert check.routing_case_parameters(config, "float64")[GAIN].std() > 0.01
        assert check.main(["--routing-algorithm", "test-mean", "--impl", "mean-routing", "torch-looped",
                           "--dtype", "float64", "--dtype", "float32"]) == 0
        out = capsys.readouterr().out
        bad = {row.quantity for row in check_implementation("mean-gain-after", config, "float64") if not row.passed}
        count = len(quantities(config))
    assert f"all {2 * count} quantities within tolerance" in out
    assert "skipped     torch-looped" in out and "not 'test-mean'" in out
    assert {"grad test.gain", "routing v, W x200", "lengths, W x200"} <= bad
    assert "routing v" not in bad  # at its initial zero the gain changes nothing: only the drawn one shows it


def test_a_plugin_algorithm_without_a_reference_is_rejected_before_any_check(monkeypatch, capsys):
    monkeypatch.setattr(check, "check_implementation", lambda *args: pytest.fail("nothing may be checked"))
    with routing_algorithms.registered_routing_algorithm(mean_algorithm("test-unreferenced", reference=None)):
        assert check.main(["--routing-algorithm", "test-unreferenced"]) == 2
    captured = capsys.readouterr()
    assert not captured.out and captured.err == (
        "error: routing algorithm 'test-unreferenced' (tests/test_check.py) cannot be checked: it has no reference "
        "(RoutingAlgorithm.reference, the torch function of u_hat, its parameters and the config that "
        "torch-vectorised computes it by)\n")


def test_a_plugin_algorithm_whose_reference_disagrees_with_itself_across_dtypes_is_rejected(monkeypatch, capsys):
    """1 - exp(-n) in place of -expm1(-n): at the canonical parameters v is 3.4e-4 long and its float32 error
    7e-5, above the output tolerance 2e-5 (measured); the stable form agrees (the test before this one)."""
    monkeypatch.setattr(check, "check_implementation", lambda *args: pytest.fail("nothing may be checked"))
    with routing_algorithms.registered_routing_algorithm(mean_algorithm("test-unstable", unstable_mean_reference)):
        assert check.main(["--routing-algorithm", "test-unstable", "--dtype", "float64"]) == 1
        config = SMALL.replace(routing_algorithm="test-unstable")
        rows = check.compare("x", "float32", check.observe("torch-vectorised", config, "float32"),
                             check.reference_observation(config))
    captured = capsys.readouterr()
    worst = max((row for row in rows if not row.passed), key=lambda row: row.error / row.tolerance)
    assert not captured.out and captured.err.count("\n") == 1
    assert captured.err.startswith(
        "error: routing algorithm 'test-unstable' (tests/test_check.py) rejected: reference disagrees with itself "
        f"across dtypes: {worst.quantity} error {worst.error:.3e} > tolerance {worst.tolerance:.0e} (and ")
    assert captured.err.endswith("(torch-vectorised float32 against float64, the same inputs)\n")
    assert worst.quantity in ("lengths", "routing v") and worst.error > 2 * worst.tolerance  # not borderline
    with routing_algorithms.registered_routing_algorithm(MEAN):  # the same function computed stably is accepted
        check.validate_routing_algorithm(SMALL.replace(routing_algorithm="test-mean"))
