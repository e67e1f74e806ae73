"""What each asv suite profile leaves out, and why: a quick profile leaves out what compiles again in every
benchmark process and what it names for cost, runs what keeps its compiled programs between processes
(JAX's persistent cache), and docs/benchmarks.md's profile table says the same."""

import re

import pytest

from harness import registry
from harness.suite.sizes import (
    PROFILES,
    measured_iterations,
    profile_left_out_reason,
    routing_algorithms,
    routing_gradients,
)

from conftest import REPO_ROOT


def reason(profile: str, name: str) -> str | None:
    return profile_left_out_reason(profile, PROFILES[profile], name, registry.get(name).cls)


@pytest.mark.parametrize("profile", ["smoke", "fast"])
def test_a_quick_profile_runs_jax_vectorised_whose_compile_persists(profile):
    """jax-vectorised compiles on its first call of a shape, but JAX keeps the program on disk, so only the
    first benchmark process of a shape pays it: README's main job ranks it beside the others."""
    assert registry.get("jax-vectorised").cls.first_call_compiles
    assert registry.get("jax-vectorised").cls.compile_cache_persists
    assert reason(profile, "jax-vectorised") is None
    assert reason(profile, "torch-fused") is None and reason(profile, "numpy-looped") is None


@pytest.mark.parametrize("name", ["torch-vectorised-compiled", "torch-looped-compiled", "torch-vectorised-cuda-graph"])
def test_a_quick_profile_leaves_out_what_compiles_again_in_every_process(name):
    assert not registry.get(name).cls.compile_cache_persists
    assert reason("fast", name) == ("compiles again in every benchmark process: the fast profile leaves it out "
                                    "(CAPSBENCH_PROFILE=regular, or name it in CAPSBENCH_IMPLEMENTATIONS)")
    assert reason("regular", name) is None


def test_jax_looped_is_left_out_of_the_quick_profiles_for_its_cost_with_that_reason():
    said = reason("fast", "jax-looped")
    assert said.startswith("takes seconds a step on a CPU") and "compiles again" not in said
    assert said.endswith("the fast profile leaves it out (CAPSBENCH_PROFILE=regular, or name it in "
                         "CAPSBENCH_IMPLEMENTATIONS)")
    assert reason("smoke", "jax-looped").startswith("takes seconds")
    assert reason("regular", "jax-looped") is None and reason("large", "jax-looped") is None


def docs_profile_rows() -> dict[str, dict[str, str]]:
    """docs/benchmarks.md's profile table: profile name -> its cells by heading."""
    text = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    lines = text[text.index("| profile |"):].split("\n\n")[0].splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    return {match.group(1): dict(zip(header, (cell.strip() for cell in line.strip("|").split(" | "))))
            for line in lines[2:] if (match := re.match(r"\| `([\w-]+)`", line))}


def test_the_docs_profile_table_names_every_profile_and_what_it_leaves_out():
    """Every profile has its row; a profile that leaves the compiling ones out names what that is (and says
    JAX runs), one that includes them says so, and each name a profile leaves out for cost is in its row."""
    rows = docs_profile_rows()
    assert set(rows) == set(PROFILES)
    for name, profile in PROFILES.items():
        said = rows[name]["what it leaves out"]
        if profile["compiled"] and not profile.get("left_out"):
            assert said == "nothing", rows[name]
        if not profile["compiled"]:
            assert "(`*-compiled`, `*-cuda-graph`; JAX runs)" in said, rows[name]
        for left_out in profile.get("left_out", {}):
            assert f"`{left_out}`" in said, rows[name]


def test_the_docs_profile_table_gives_each_profile_its_routing_gradients_and_algorithms():
    rows = docs_profile_rows()
    for name, profile in PROFILES.items():
        assert rows[name]["routing gradients"] == ", ".join(routing_gradients(profile)), name
        assert rows[name]["routing algorithms"] == ", ".join(routing_algorithms(profile)), name


def test_the_cpu_profiles_measure_both_algorithms_and_the_gpu_ones_dynamic_routing_alone():
    """README's main job (fast) and the profiles the lead runs with samples measure self-attention beside
    dynamic routing; the routing-alone grid at batch 128 and 3 iterations is in fast, where the issue's
    comparison is measured; the GPU lease plan counts dynamic routing's points alone."""
    for name in ("smoke", "fast", "regular", "large"):
        assert routing_algorithms(PROFILES[name]) == ["dynamic", "self-attention"], name
    assert 128 in PROFILES["fast"]["batch_sizes"] and 3 in PROFILES["fast"]["routing_iterations"]
    for name in ("gpu", "gpu-compiled"):
        assert routing_algorithms(PROFILES[name]) == ["dynamic"], name


@pytest.mark.parametrize("grid, default, measured", [([1, 3, 5], 3, 3), ([3], 3, 3), ([1, 2], 3, 2), ([1, 5], 3, 1),
                                                     ([5, 10], 3, 5), ((10, 1, 4), 3, 4)])
def test_a_non_iterative_algorithm_is_measured_at_the_default_count_or_the_nearest_lower_on_a_tie(grid, default,
                                                                                                  measured):
    assert measured_iterations(grid, default) == measured
