"""The parity gate (python -m harness.check): what it compares catches the bugs it is there for, and its
exit status says so both ways."""

from __future__ import annotations

import numpy as np
import pytest

from harness import check, registry
from harness.check import check_implementation, quantities
from harness.spec import SMALL
from implementations.numpy_capsnet import NumpyCapsNet
from implementations.torch_capsnet import TorchCapsNet


class RoutingAloneStopsAtThree(TorchCapsNet):
    """Correct inside the network; its routing alone (what the routing benchmarks time) never runs more
    than 3 iterations."""

    def routing_forward(self, u_hat):
        from implementations.torch_capsnet import routing_vectorised

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


def failed(cls, name) -> set[str]:
    with registry.registered(name, cls):
        return {row.quantity for row in check_implementation(name, SMALL, "float64") if not row.passed}


def test_routing_alone_is_checked_at_5_iterations():
    assert failed(RoutingAloneStopsAtThree, "stops-at-three") == {"routing v (5 it.)"}


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


def test_the_command_exits_1_on_a_planted_disagreement(capsys):
    with registry.registered("stops-at-three", RoutingAloneStopsAtThree):
        assert check.main(["--impl", "stops-at-three", "--dtype", "float64"]) == 1
    captured = capsys.readouterr()
    assert "FAILED: 1 of" in captured.err and "routing v (5 it.)" in captured.out


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
        from implementations.torch_capsnet import routing_vectorised

        return routing_vectorised(u_hat, self.config.routing_iterations, self.config.squash_eps, gradient="full")


def test_a_plugin_that_claims_final_but_leaks_through_early_iterations_fails():
    final = SMALL.replace(routing_gradient="final")
    with registry.registered("leaks-early", LeaksThroughEarlyIterations):
        bad = {row.quantity for row in check_implementation("leaks-early", final, "float64") if not row.passed}
        assert not [row for row in check_implementation("leaks-early", SMALL, "float64") if not row.passed]
    iterations = SMALL.routing_iterations
    assert {f"routing grad u_hat ({iterations} it.)", "routing grad u_hat (5 it.)", "grad digit.weight"} <= bad
    assert "routing grad u_hat (1 it.)" not in bad  # one iteration: the two settings are one function


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


@pytest.mark.parametrize("dtype", sorted(check.TOLERANCES))
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
