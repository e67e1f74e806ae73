"""The one definition of the architecture: the paper's sizes, derived shapes, parameter counts."""

import math

import numpy as np
import pytest

from harness.params import count_parameters, init_parameters, parameter_shapes, validate_parameters
from harness.spec import PAPER, SMALL, CapsNetConfig, get_config


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
