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


def test_a_benchmarks_json_describing_fewer_benchmarks_is_not_kept(tmp_path, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    write(runs / "asv" / "benchmarks.json", {"a": {}})
    write(results / "asv" / "benchmarks.json", {"a": {}, "b": {}})
    assert keep.keep(runs, results, ["asv"]) == []
    assert json.loads((results / "asv" / "benchmarks.json").read_text()) == {"a": {}, "b": {}}
    assert "describes fewer benchmarks" in capsys.readouterr().err


def test_only_one_machine(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    write(runs / "asv" / "vm" / "a-e.json", {})
    write(runs / "asv" / "gpu" / "a-e.json", {})
    written = keep.keep(runs, results, ["asv"], machine="gpu")
    assert [path.relative_to(results).as_posix() for path in written] == ["asv/gpu/a-e.json"]


def test_nothing_to_keep_is_one_line(tmp_path, capsys):
    assert keep.main(["--from", str(tmp_path / "none"), "--to", str(tmp_path / "results")]) == 1
    assert capsys.readouterr().err.strip().startswith("error: ")
