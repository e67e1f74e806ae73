"""The one definition of the architecture: the paper's sizes, derived shapes, parameter counts."""

import math

import numpy as np
import pytest

from harness.params import count_parameters, init_parameters, parameter_shapes, validate_parameters
from harness.spec import PAPER, SCHEDULES, SMALL, CapsNetConfig, LearningRateSchedule, get_config


def test_paper_derived_shapes():
    assert PAPER.conv1_size == 20
    assert PAPER.primary_size == 6
    assert PAPER.primary_conv_channels == 256
    assert PAPER.num_primary_caps == 1152
    assert PAPER.decoder_sizes == (160, 512, 1024, 784)
    assert PAPER.u_hat_shape == (1152, 10, 16)
    assert PAPER.routing_iterations == 3


def test_paper_parameter_counts():
    assert count_parameters(PAPER) == 8_215_568
    assert count_parameters(PAPER, include_decoder=False) == 6_804_224


def test_paper_parameter_shapes():
    shapes = parameter_shapes(PAPER)
    assert shapes["digit.weight"] == (1152, 10, 16, 8)
    assert shapes["primary.weight"] == (256, 256, 9, 9)
    assert shapes["decoder.2.weight"] == (784, 1024)


def test_derived_shapes_follow_the_fields():
    config = CapsNetConfig(image_size=32, conv1_kernel=5, primary_kernel=4, primary_stride=3, primary_caps_channels=7)
    assert config.conv1_size == 28
    assert config.primary_size == 9
    assert config.num_primary_caps == 9 * 9 * 7


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="routing_iterations"):
        CapsNetConfig(routing_iterations=0)
    with pytest.raises(ValueError, match="too small"):
        CapsNetConfig(image_size=12)
    with pytest.raises(ValueError, match="unknown config 'huge'.*paper, small"):
        get_config("huge")
    with pytest.raises(ValueError, match=r"^routing_gradient must be one of full, final, got 'half'$"):
        CapsNetConfig(routing_gradient="half")


def test_canonical_parameters_are_seeded_and_laid_out():
    first, again, other = init_parameters(SMALL, seed=3), init_parameters(SMALL, seed=3), init_parameters(SMALL, seed=4)
    assert list(first) == list(parameter_shapes(SMALL))
    for name in first:
        assert first[name].dtype == np.float32 and first[name].flags.c_contiguous
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name])
    validate_parameters(first, SMALL)


def test_initial_distributions():
    params = init_parameters(PAPER, dtype=np.float64)
    w = params["digit.weight"]
    assert abs(w.std() - PAPER.digit_weight_std) < 0.01 * PAPER.digit_weight_std
    assert abs(w.mean()) < 1e-4
    bound = 1 / math.sqrt(256 * 81)
    primary = params["primary.weight"]
    assert primary.max() <= bound and primary.min() >= -bound
    assert primary.max() > 0.99 * bound
    assert abs(params["decoder.0.bias"]).max() <= 1 / math.sqrt(160)


def test_validate_parameters_names_the_problem():
    params = init_parameters(SMALL)
    params["conv1.weight"] = params["conv1.weight"][:1]
    with pytest.raises(ValueError, match="conv1.weight has shape"):
        validate_parameters(params, SMALL)
    del params["conv1.bias"]
    with pytest.raises(ValueError, match="missing \\['conv1.bias'\\]"):
        validate_parameters(params, SMALL)


def test_the_smallest_valid_configs_are_accepted():
    assert CapsNetConfig(routing_iterations=1).routing_iterations == 1
    assert CapsNetConfig(image_size=17).primary_size == 1  # Conv1 9x9 -> 9x9, PrimaryCaps 9x9 stride 2 -> 1x1
    with pytest.raises(ValueError, match="too small"):
        CapsNetConfig(image_size=16)


def test_replace_and_as_dict():
    fewer = PAPER.replace(routing_iterations=2)
    assert fewer.routing_iterations == 2 and PAPER.routing_iterations == 3
    assert {**fewer.as_dict(), "routing_iterations": 3} == PAPER.as_dict()
    assert PAPER.as_dict()["conv1_channels"] == 256 and PAPER.as_dict()["image_size"] == 28


def test_the_learning_rate_schedules_by_hand():
    """The paper's: 1e-3 x 0.96^(step / 2000), the first update being step 0; constant: 1e-3 throughout."""
    paper, constant = SCHEDULES["paper"], SCHEDULES["constant"]
    assert paper.rate(0) == 1e-3 and paper.rate(2000) == pytest.approx(0.96e-3, rel=1e-15)
    assert paper.rate(1000) == pytest.approx(1e-3 * 0.9797958971132712, rel=1e-15)  # sqrt(0.96)
    assert paper.factor(4000) == pytest.approx(0.9216, rel=1e-15)
    assert constant.rate(0) == constant.rate(10**6) == 1e-3
    assert paper.as_dict() == {"name": "paper", "initial": 1e-3, "decay_rate": 0.96, "decay_steps": 2000}


@pytest.mark.parametrize("fields", [dict(initial=0.0), dict(decay_rate=0.0), dict(decay_rate=1.5),
                                    dict(decay_steps=0), dict(decay_rate=0.5, decay_steps=0)])
def test_an_impossible_schedule_is_rejected(fields):
    with pytest.raises(ValueError, match="decay_steps >= 1 are required"):
        LearningRateSchedule("bad", **fields)
    assert LearningRateSchedule("fine", decay_rate=1.0, decay_steps=1).rate(5) == 1e-3
