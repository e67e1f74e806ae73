"""capsbench keep: runs copied from runs/ into results/ only when asked, nothing lost on the way."""

from __future__ import annotations

import json

from harness import keep


def write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def test_runs_are_copied_file_by_file_and_traces_and_checkpoints_stay(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    write(runs / "asv" / "vm" / "abcd1234-env.json", {"run": 1})
    write(runs / "asv" / "benchmarks.json", {"a": {}, "b": {}})
    write(runs / "asv-facts" / "vm" / "abcd1234-env.json", {"facts": 1})
    write(runs / "training" / "t.json", {"kind": "x"})
    (runs / "training" / "t.checkpoint.npz").write_bytes(b"npz")
    write(runs / "profile" / "profile.json", {})
    (runs / "profile" / "traces").mkdir()
    (runs / "profile" / "traces" / "torch.trace.json.gz").write_bytes(b"gz")
    write(results / "training" / "older.json", {"kind": "kept"})
    written = keep.keep(runs, results, sorted(keep.KINDS))
    assert sorted(str(path.relative_to(results)) for path in written) == [
        "asv-facts/vm/abcd1234-env.json", "asv/benchmarks.json", "asv/vm/abcd1234-env.json",
        "profile/profile.json", "training/t.json"]
    assert json.loads((results / "training" / "older.json").read_text()) == {"kind": "kept"}  # nothing removed


def test_benchmarks_json_becomes_the_union_and_the_newer_description_wins(tmp_path, capsys):
    """A benchmark only older runs measured keeps its description (their results keep their labels)."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    write(runs / "asv" / "benchmarks.json", {"a": {"params": ["new"]}, "c": {}, "version": 2})
    write(results / "asv" / "benchmarks.json", {"a": {"params": ["old"]}, "b": {}, "version": 2})
    assert keep.keep(runs, results, ["asv"]) == [results / "asv" / "benchmarks.json"]
    assert json.loads((results / "asv" / "benchmarks.json").read_text()) == {
        "a": {"params": ["new"]}, "b": {}, "c": {}, "version": 2}

    (results / "asv" / "benchmarks.json").write_text("{not json")
    assert keep.keep(runs, results, ["asv"]) == [results / "asv" / "benchmarks.json"]
    assert json.loads((results / "asv" / "benchmarks.json").read_text())["c"] == {}
    assert "replaced by" in capsys.readouterr().err


def test_only_one_machine(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    write(runs / "asv" / "vm" / "a-e.json", {})
    write(runs / "asv" / "gpu" / "a-e.json", {})
    written = keep.keep(runs, results, ["asv"], machine="gpu")
    assert [path.relative_to(results).as_posix() for path in written] == ["asv/gpu/a-e.json"]


def test_nothing_to_keep_is_one_line(tmp_path, capsys):
    assert keep.main(["--from", str(tmp_path / "none"), "--to", str(tmp_path / "results")]) == 1
    assert capsys.readouterr().err.strip().startswith("error: ")
