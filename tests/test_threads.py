"""Thread counts: the CPUs this process may use (affinity, cgroup quota), and every pool pinned alike."""

from __future__ import annotations

import pytest

from harness import threads


@pytest.mark.parametrize("text, expected", [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000", 1),
                                            ("400000 100000", 4)])
def test_cgroup_quota_by_hand(tmp_path, text, expected):
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert threads.cgroup_cpu_limit(path) == expected
    assert threads.cgroup_cpu_limit(tmp_path / "absent") is None


def test_usable_cpus_follow_the_affinity_mask_and_the_quota(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.usable_cpu_count() == 3
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2)
    assert threads.usable_cpu_count() == 2


def test_every_pool_is_pinned_to_one_count():
    import torch  # noqa: F401  (loaded, so that its pool is pinned too)

    threads.set_threads(1)
    facts = threads.thread_facts()
    assert facts["torch"] == 1
    settable = {pool: count for pool, count in facts.items() if pool not in threads.recorded_pools()}
    assert [count for pool, count in settable.items() if pool != "torch"] and set(settable.values()) == {1}
    threads.set_threads(threads.usable_cpu_count())


def test_a_pool_no_setting_reaches_is_recorded_as_it_is(monkeypatch):
    monkeypatch.setattr(threads, "_other_pools", {})
    threads.register_thread_pool("xla:cpu", lambda: 3)
    threads.register_thread_pool("absent", lambda: None)
    threads.set_threads(1)
    facts = threads.thread_facts()
    assert facts["xla:cpu"] == 3 and "absent" not in facts and threads.recorded_pools() == {"xla:cpu", "absent"}
    threads.set_threads(threads.usable_cpu_count())
