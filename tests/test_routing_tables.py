"""The implementations by framework: each framework a package of implementations/ whose routing.py holds
every routing of that framework in one table, ROUTING, keyed the same way in every framework: (routing
algorithm, routing variant, routing gradient), each gradient only under an algorithm where it means something."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import implementations
from harness.contract import ROUTING_VARIANTS
from harness.spec import ROUTING_ALGORITHM_GRADIENTS, ROUTING_ALGORITHMS

FRAMEWORKS = sorted(module.name for module in pkgutil.iter_modules(implementations.__path__) if module.ispkg)


def test_every_implementation_lives_in_a_framework_package():
    assert FRAMEWORKS == ["cupy", "jax", "numpy", "torch"]
    assert [module.name for module in pkgutil.iter_modules(implementations.__path__) if not module.ispkg] == []


def test_the_framework_packages_shadow_no_framework():
    """implementations/torch/ and the others are reached only as implementations.X: ``import torch`` still
    finds PyTorch (nothing puts implementations/ itself on sys.path)."""
    for name in ("torch", "numpy", "jax", "cupy"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            assert "implementations" not in Path(spec.origin).parts, (name, spec.origin)


# cupy's table holds its fused kernels, which compute dynamic routing alone (cupy-vectorised and cupy-looped
# run NumPy's table on the GPU)
ALGORITHMS = {"cupy": ("dynamic",)}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_each_routing_table_is_keyed_by_algorithm_variant_then_gradient(framework):
    table = importlib.import_module(f"implementations.{framework}.routing").ROUTING
    assert table
    for key in table:
        algorithm, variant, gradient = key
        assert algorithm in ROUTING_ALGORITHMS and variant in ROUTING_VARIANTS, key
        assert gradient in ROUTING_ALGORITHM_GRADIENTS[algorithm], key
    for algorithm in ALGORITHMS.get(framework, ROUTING_ALGORITHMS):
        assert {gradient for name, _, gradient in table if name == algorithm} == set(
            ROUTING_ALGORITHM_GRADIENTS[algorithm]), (framework, algorithm)
