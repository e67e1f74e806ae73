"""What each asv suite profile leaves out, and why: a quick profile leaves out what compiles again in every
benchmark process and what it names for cost, runs what keeps its compiled programs between processes
(JAX's persistent cache), and docs/benchmarks.md's profile table says the same."""

import re

import pytest

from harness import registry
from harness.suite.sizes import PROFILES, profile_left_out_reason

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


def docs_profile_rows() -> dict[str, str]:
    """docs/benchmarks.md's profile table: profile name -> its whole row."""
    text = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    table = text[text.index("| profile |"):].split("\n\n")[0]
    return {match.group(1): line for line in table.splitlines() if (match := re.match(r"\| `([\w-]+)`", line))}


def test_the_docs_profile_table_names_every_profile_and_what_it_leaves_out():
    """Every profile has its row; a profile that leaves the compiling ones out names what that is (and says
    JAX runs), one that includes them says so, and each name a profile leaves out for cost is in its row."""
    rows = docs_profile_rows()
    assert set(rows) == set(PROFILES)
    for name, profile in PROFILES.items():
        said = rows[name].split(" | ")[-2]  # the column "what it leaves out"
        if profile["compiled"] and not profile.get("left_out"):
            assert said == "nothing", rows[name]
        if not profile["compiled"]:
            assert "(`*-compiled`, `*-cuda-graph`; JAX runs)" in said, rows[name]
        for left_out in profile.get("left_out", {}):
            assert f"`{left_out}`" in said, rows[name]
