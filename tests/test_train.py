"""Training from the command line: the loss goes down on real MNIST, results are written and read back,
the NumPy and torch implementations learn the same way, and failures end with one clear line."""

import argparse
import json
import math
import os
import signal
import tempfile
import time

import numpy as np
import pytest

from harness import registry, train
from harness.results import read_training_result
from harness.spec import SMALL
from harness.threads import recorded_pools, set_threads, usable_cpu_count
from harness.training import loop
from implementations.torch.autograd import TorchCapsNet

SHORT_RUN = ["--config", "small", "--limit", "384", "--test-limit", "200", "--batch-size", "32"]


def run_train(tmp_path, mnist_path, *args, name="run.json"):
    out = tmp_path / name
    code = train.main(["--data-dir", str(mnist_path), "--out", str(out), *args])
    return code, out


def test_short_run_lowers_the_loss_and_writes_a_complete_file(tmp_path, mnist_path, capsys):
    code, out = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", "--epochs", "2", *SHORT_RUN)
    assert code == 0
    record = read_training_result(out)
    assert record["status"] == "completed"
    assert (record["train_images"], record["test_images"], record["ranks"]) == (384, 200, 1)
    assert record["best_test_accuracy"] == max(epoch["test_accuracy"] for epoch in record["epochs"])
    assert record["final_test_accuracy"] == record["epochs"][-1]["test_accuracy"]
    assert record["schedule"] == {"name": "paper", "initial": 1e-3, "decay_rate": 0.96, "decay_steps": 2000}
    threads = record["threads"]  # every pool pinned to one count (the CPUs this process may use)
    assert threads["torch"] == usable_cpu_count() and set(threads.values()) == {usable_cpu_count()}
    captured = capsys.readouterr()
    first = captured.out.splitlines()[0]
    assert "on 384 training images, evaluating on 200 test images" in first and "small network" in first
    epoch_line = next(line for line in captured.out.splitlines() if line.startswith("epoch 2:"))
    assert "training " in epoch_line and "evaluation " in epoch_line and "epoch wall time " in epoch_line
    # not a terminal: plain progress lines for the steps and the evaluation
    assert "epoch 1/2: 12/12 steps" in captured.err and "epoch 2/2 evaluation: " in captured.err
    assert record["implementation"] == "torch-vectorised" and record["config"]["conv1_channels"] == 16
    assert len(record["steps"]) == 2 * 12 and len(record["epochs"]) == 2
    first, second = record["epochs"]
    assert second["mean_loss"] < 0.9 * first["mean_loss"]
    assert 0.0 <= second["test_accuracy"] <= 1.0
    assert second["images"] == 384 and second["images_per_second"] > 0
    elapsed = [step["elapsed_seconds"] for step in record["steps"]]
    assert elapsed == sorted(elapsed)
    assert record["machine"]["versions"]["numpy"] == np.__version__


def test_numpy_learns_exactly_like_torch_from_the_same_start(tmp_path, mnist_path):
    losses = {}
    for name in ("torch-vectorised", "numpy-vectorised"):
        code, out = run_train(tmp_path, mnist_path, "--impl", name, *SHORT_RUN, name=f"{name}.json")
        assert code == 0
        losses[name] = np.array([step["loss"] for step in read_training_result(out)["steps"]])
    # float32, same parameters and batches: the loss curves agree to 1e-4 relative over the first 12 steps
    np.testing.assert_allclose(losses["numpy-vectorised"], losses["torch-vectorised"], rtol=1e-4)
    assert losses["numpy-vectorised"][-3:].mean() < losses["numpy-vectorised"][:3].mean()


class Diverging(TorchCapsNet):
    def train_step(self, batch):
        self._steps = getattr(self, "_steps", 0) + 1
        return float("nan") if self._steps == 3 else super().train_step(batch)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_file(tmp_path, mnist_path, capsys):
    with registry.registered("diverging", Diverging):
        code, out = run_train(tmp_path, mnist_path, "--impl", "diverging", *SHORT_RUN)
    assert code == 1
    error = capsys.readouterr().err.strip()
    assert "training diverged: loss is nan at epoch 1, step 3" in error and str(out) in error
    record = json.loads(out.read_text())
    assert record["status"] == "stopped"
    assert len(record["steps"]) == 3 and math.isnan(record["steps"][-1]["loss"])


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    code = train.main(["--impl", "torch-vectorised", "--data-dir", str(tmp_path / "none"),
                       "--out", str(tmp_path / "x.json")])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: MNIST folder") and "--data-dir" in error and "\n" not in error
    assert not (tmp_path / "x.json").exists()


def test_unknown_implementation_lists_the_known(tmp_path, mnist_path, capsys):
    code, _ = run_train(tmp_path, mnist_path, "--impl", "tensorflow")
    assert code == 2
    assert "unknown implementation 'tensorflow'; known implementations: " in capsys.readouterr().err


def test_an_earlier_results_file_is_only_replaced_by_a_complete_one(tmp_path, mnist_path, monkeypatch):
    out = tmp_path / "run.json"
    out.write_text('{"kind": "capsbench-training", "implementation": "old", "epochs": [], "steps": []}')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_epochs", interrupted)
    code, out = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", "--overwrite", *SHORT_RUN)
    assert code == 130
    record = read_training_result(out)
    assert record["status"] == "interrupted" and record["implementation"] == "torch-vectorised"
    assert not list(tmp_path.glob(".run.json.*"))  # no temporary file left behind


def test_the_learning_rate_follows_the_schedule_and_the_flag_keeps_it_constant(tmp_path, mnist_path):
    """After 12 steps torch's learning rate is 1e-3 x 0.96^(12/2000) with the paper's schedule, 1e-3 with
    --schedule constant (checked on the optimizer itself)."""
    rates = {}
    original = train.train_epochs

    def spy(impl, *args, **kwargs):
        result = original(impl, *args, **kwargs)
        rates[impl.schedule.name] = impl.optimizer.param_groups[0]["lr"]
        return result

    train.train_epochs = spy
    try:
        for schedule in ("paper", "constant"):
            code, out = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", "--schedule", schedule,
                                  *SHORT_RUN, name=f"{schedule}.json")
            assert code == 0 and read_training_result(out)["schedule"]["name"] == schedule
    finally:
        train.train_epochs = original
    assert rates["paper"] == pytest.approx(1e-3 * 0.96 ** (12 / 2000), rel=1e-12)
    assert rates["constant"] == 1e-3


class InterruptedInEpoch2(TorchCapsNet):
    """Stops with Ctrl-C at the 5th step of the second epoch (step 17 of the run)."""

    steps = 0

    def train_step(self, batch):
        InterruptedInEpoch2.steps += 1
        if InterruptedInEpoch2.steps == 17:
            raise KeyboardInterrupt
        return super().train_step(batch)


def test_an_interrupted_run_resumes_to_the_parameters_of_an_uninterrupted_one(tmp_path, mnist_path, capsys):
    run = ["--epochs", "3", *SHORT_RUN]
    code, whole = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", *run, name="whole.json")
    assert code == 0
    with registry.registered("interrupted-torch", InterruptedInEpoch2):
        code, broken = run_train(tmp_path, mnist_path, "--impl", "interrupted-torch", *run, name="broken.json")
    assert code == 130
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert hint == (f"interrupted by the user; the results up to epoch 1 (the last completed) are in {broken} "
                    f"(continue with --resume {broken})")
    record = read_training_result(broken)
    assert record["status"] == "interrupted" and len(record["epochs"]) == 1 and len(record["steps"]) == 16
    # on the same class without the interruption
    assert train.main(["--data-dir", str(mnist_path), "--resume", str(broken), "--impl", "torch-vectorised"]) == 0
    resumed, reference = read_training_result(broken), read_training_result(whole)
    assert resumed["status"] == "completed" and len(resumed["epochs"]) == 3 and len(resumed["steps"]) == 36
    assert [step["loss"] for step in resumed["steps"]] == pytest.approx([step["loss"] for step in reference["steps"]],
                                                                        rel=1e-6)
    _, params, adam = loop.load_checkpoint(broken)
    _, expected, expected_adam = loop.load_checkpoint(whole)
    for name, value in expected.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-6, atol=1e-9, err_msg=name)
    assert int(adam["step"]) == int(expected_adam["step"]) == 36


def test_resuming_without_a_checkpoint_is_one_line(tmp_path, mnist_path, capsys):
    code, out = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", *SHORT_RUN)
    assert code == 0
    loop.checkpoint_path(out).unlink()
    capsys.readouterr()
    assert train.main(["--data-dir", str(mnist_path), "--resume", str(out), "--epochs", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "no checkpoint beside" in error and "\n" not in error


def test_every_thread_pool_is_pinned_to_the_count_asked_for(tmp_path, mnist_path):
    try:
        code, out = run_train(tmp_path, mnist_path, "--impl", "numpy-vectorised", "--config", "small", "--limit",
                              "64", "--test-limit", "32", "--batch-size", "32", "--threads", "1")
    finally:
        set_threads(usable_cpu_count())  # the rest of the tests run with every CPU again
    assert code == 0
    threads = read_training_result(out)["threads"]
    settable = {pool: count for pool, count in threads.items() if pool not in recorded_pools()}  # XLA's: as it is
    assert settable["torch"] == 1 and set(settable.values()) == {1} and len(settable) > 1


class FullGradientOnly(TorchCapsNet):
    """A torch implementation that computes the routing gradient ``full`` alone (its own routing)."""

    def route(self, u_hat):
        return super().route(u_hat)


class BuiltSettings(TorchCapsNet):
    """torch-vectorised that notes the routing gradient of every network it is built with."""

    seen: list[str] = []

    def __init__(self, config, *args, **kwargs):
        BuiltSettings.seen.append(config.routing_gradient)
        super().__init__(config, *args, **kwargs)


def test_a_final_routing_gradient_run_records_it_and_resumes_with_it(tmp_path, mnist_path, capsys):
    """--routing-gradient final: the network is built with it, the results file and its config say so, the
    first line too; a resumed run takes the setting from the file (none given on its command line)."""
    BuiltSettings.seen = []
    with registry.registered("built-settings", BuiltSettings):
        code, out = run_train(tmp_path, mnist_path, "--impl", "built-settings", "--routing-gradient", "final",
                              *SHORT_RUN, "--limit", "64", "--test-limit", "32")
        assert code == 0
        record = read_training_result(out)
        assert record["routing_gradient"] == record["config"]["routing_gradient"] == "final"
        assert "routing gradient final" in capsys.readouterr().out
        assert train.main(["--data-dir", str(mnist_path), "--resume", str(out), "--epochs", "2"]) == 0
    record = read_training_result(out)
    assert len(record["epochs"]) == 2 and record["routing_gradient"] == "final"
    assert "routing gradient final" in capsys.readouterr().out
    assert BuiltSettings.seen == ["final", "final"]


def test_an_implementation_without_the_routing_gradient_is_refused_in_one_line(tmp_path, mnist_path, capsys):
    with registry.registered("full-gradient-only", FullGradientOnly):
        code, out = run_train(tmp_path, mnist_path, "--impl", "full-gradient-only", "--routing-gradient", "final",
                              *SHORT_RUN)
    assert code == 2 and not out.exists()
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "'final'" in error and "\n" not in error


def test_a_new_run_onto_an_existing_results_file_is_refused_and_the_file_kept(tmp_path, mnist_path, capsys):
    out = tmp_path / "finished.json"
    out.write_text('{"kind": "capsbench-training", "status": "completed"}')
    code = train.main(["--impl", "torch-vectorised", "--data-dir", str(mnist_path), "--out", str(out), *SHORT_RUN])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: {out} already exists: continue that run with --resume {out}, or replace it with "
                     "--overwrite (or choose another --out)")
    assert out.read_text() == '{"kind": "capsbench-training", "status": "completed"}'
    # a checkpoint left alone counts too: it belongs to a run
    out.unlink()
    loop.checkpoint_path(out).write_bytes(b"x")
    assert train.main(["--impl", "torch-vectorised", "--data-dir", str(mnist_path), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and loop.checkpoint_path(out).read_bytes() == b"x"


class TerminatedAtStep2(TorchCapsNet):
    """Receives SIGTERM (as from `timeout`, a scheduler or CI) during its second step."""

    def train_step(self, batch):
        self._steps = getattr(self, "_steps", 0) + 1
        if self._steps == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_step(batch)


def test_sigterm_ends_the_run_as_ctrl_c_does_and_says_nothing_was_completed(tmp_path, mnist_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    with registry.registered("terminated-torch", TerminatedAtStep2):
        code, out = run_train(tmp_path, mnist_path, "--impl", "terminated-torch", *SHORT_RUN)
    assert code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the run's only
    record = read_training_result(out)
    assert record["status"] == "interrupted" and record["message"] == "terminated by signal 15"
    assert record["epochs"] == [] and record["pid"] == os.getpid()
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert hint == (f"terminated by signal 15 before epoch 1 completed: nothing was completed or saved; "
                    f"--resume {out} starts the run again from the beginning, with its options")


@pytest.mark.parametrize("option, message", [
    (["--batch-size", "16"], "(--batch-size 32); --batch-size 16 differs"),
    (["--no-augment"], "(with augmentation); --no-augment differs"),
    (["--dtype", "float64"], "(--dtype float32); --dtype float64 differs"),
    (["--limit", "100"], "(--limit 384); --limit 100 differs"),
])
def test_a_resume_refuses_an_option_that_differs_from_the_run(tmp_path, mnist_path, capsys, option, message):
    with registry.registered("terminated-torch", TerminatedAtStep2):
        code, out = run_train(tmp_path, mnist_path, "--impl", "terminated-torch", *SHORT_RUN)
        assert code == 128 + signal.SIGTERM
        capsys.readouterr()
        code = train.main(["--data-dir", str(mnist_path), "--resume", str(out), *option])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: --resume {out} continues that run as it was started {message}: drop it, or start "
                     "a new run with another --out")
    assert read_training_result(out)["status"] == "interrupted"  # untouched


def test_a_resume_refuses_overwrite_another_out_and_fewer_epochs_than_done(tmp_path, mnist_path, capsys):
    code, out = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", "--epochs", "2", *SHORT_RUN)
    assert code == 0
    capsys.readouterr()
    for option, expected in ((["--overwrite"], "--overwrite replaces a run and --resume continues one"),
                             (["--out", str(tmp_path / "other.json")], "writes to that file; --out "),
                             (["--epochs", "1"], "--epochs 1 is fewer than the 2 epoch(s)")):
        assert train.main(["--data-dir", str(mnist_path), "--resume", str(out), *option]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and expected in error and "\n" not in error


def test_the_first_line_says_when_a_limit_is_more_than_the_images():
    args = argparse.Namespace(dtype="float32", config="small", schedule="paper", batch_size=32, epochs=1,
                              limit=100_000, test_limit=200, routing_gradient="full")
    line = loop.start_line("torch-vectorised", args, 60_000, 200, "runs/x.json")
    assert "on 60,000 training images (all there are: the limit 100,000 is more), evaluating on 200 test images," \
        in line
    args.limit = 60_000
    assert "(all there are" not in loop.start_line("torch-vectorised", args, 60_000, 200, "runs/x.json")


def equal_timings(config, batch_size, dtype, device):
    """What torch-fused's measure_plan returns, every candidate equally fast."""
    from implementations.torch import fused as tf

    def layer(with_input: bool) -> dict:
        phases = [("forward", tf.FORWARD), ("weight gradient", tf.WEIGHT_GRADIENT)]
        phases += [("input gradient", tf.INPUT_GRADIENT)] if with_input else []
        return {f"{phase}/{name}": 1.0 for phase, table in phases for name in table}
    return {"conv1": layer(False), "primary_caps": layer(True)}


def test_the_convolution_plan_is_set_up_before_the_first_step_and_kept_out_of_every_time(tmp_path, mnist_path,
                                                                                          monkeypatch, capsys):
    """torch-fused's plan took 12 to 36 s inside the first step and again inside the last, partial batch
    (README's first run: a 104-image evaluation batch of 44 s).  Here measuring takes SETUP s: no step, no
    epoch's training or evaluation time holds it; it is recorded apart, once, and said in one line."""
    from implementations.torch import fused as tf

    setup = 1.0
    measured = []

    def slow_measure(config, batch_size, dtype, device):
        measured.append(batch_size)
        time.sleep(setup)
        return equal_timings(config, batch_size, dtype, device)

    monkeypatch.setenv("CAPSBENCH_PLAN_CACHE", str(tmp_path / "plans"))
    monkeypatch.setattr(tf, "measure_plan", slow_measure)
    # 40 training and 40 test images at batch 32: a partial batch of 8 in both
    code, out = run_train(tmp_path, mnist_path, "--impl", "torch-fused", "--config", "small", "--limit", "40",
                          "--test-limit", "40", "--batch-size", "32")
    assert code == 0
    record = read_training_result(out)
    assert measured == [32]
    assert record["plan_seconds"] >= setup and list(record["plans"]) == ["32"]
    assert record["plans"]["32"]["source"] == "measured"
    elapsed = [0.0] + [step["elapsed_seconds"] for step in record["steps"]]
    assert max(b - a for a, b in zip(elapsed, elapsed[1:])) < setup
    epoch = record["epochs"][0]
    assert max(epoch["train_seconds"], epoch["eval_seconds"], epoch["wall_seconds"]) < setup
    assert capsys.readouterr().err.count("measuring its convolution plan") == 1


@pytest.mark.parametrize("where", ["parent is a file", "folder read-only", "resumed file's folder read-only"])
def test_an_output_that_cannot_be_written_is_one_line_before_any_training(tmp_path, mnist_path, monkeypatch, capsys,
                                                                          where):
    """`--out` into a folder that cannot be written ended in a traceback (at the checkpoint's unlink, or at the
    first write of the results).  Root ignores chmod, so a read-only folder is a temporary file that cannot be
    created, as in a read-only folder."""
    out = tmp_path / "results" / "run.json"
    argv = ["--impl", "numpy-vectorised", *SHORT_RUN]
    if where == "parent is a file":
        (tmp_path / "results").write_text("not a folder")
    elif where.startswith("resumed"):
        assert train.main(["--data-dir", str(mnist_path), "--out", str(out), *argv]) == 0
        argv = ["--resume", str(out), "--epochs", "2"]
        out = None
    trained = []
    monkeypatch.setattr(train, "train_epochs", lambda *a, **k: trained.append(1))
    if where != "parent is a file":
        def read_only(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", read_only)  # what every atomic write of a file starts with
    capsys.readouterr()
    code = train.main(["--data-dir", str(mnist_path), *(["--out", str(out)] if out else []), *argv])
    assert code == 2 and trained == []
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"error: cannot write the results into {tmp_path / 'results'}: ")
    assert f"{tmp_path / 'results'} is a file, not a folder" in error if where == "parent is a file" else \
        "Permission denied" in error
    assert error.rstrip().endswith("; choose another --out")


def test_an_interrupted_run_resumes_with_its_file_alone(tmp_path, mnist_path, monkeypatch, capsys):
    """The interrupted-run message says `--resume FILE`; that command failed with "no MNIST folder given"."""
    monkeypatch.delenv("CAPSBENCH_DATA_DIR", raising=False)
    with registry.registered("interrupted-torch", InterruptedInEpoch2):
        InterruptedInEpoch2.steps = 0
        code, out = run_train(tmp_path, mnist_path, "--impl", "interrupted-torch", "--epochs", "2", *SHORT_RUN)
    assert code == 130
    command = capsys.readouterr().err.strip().splitlines()[-1].split("(continue with ")[1].rstrip(")")
    assert command == f"--resume {out}"
    assert read_training_result(out)["data_dir"] == str(mnist_path.resolve())
    assert train.main(["--resume", str(out), "--impl", "torch-vectorised"]) == 0
    assert read_training_result(out)["status"] == "completed"


def test_a_run_resumed_on_another_implementation_learns_as_the_uninterrupted_one_and_says_which_ran_what(
        tmp_path, mnist_path, capsys):
    """README: "a run saved by one can be resumed by another".  The canonical parameters and Adam's state
    (moments and step count) carry over: epoch 2 on NumPy follows the loss an uninterrupted torch run has
    (float32: 1e-4, as the two agree from the same start); without them (a fresh Adam, or the initial
    parameters) the losses part at once."""
    code, whole = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", "--epochs", "2", *SHORT_RUN,
                            name="whole.json")
    assert code == 0
    code, switched = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", "--epochs", "1", *SHORT_RUN,
                               name="switched.json")
    assert code == 0
    capsys.readouterr()
    assert train.main(["--resume", str(switched), "--impl", "numpy-vectorised", "--epochs", "2"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("training numpy-vectorised ")
    assert "resuming after epoch 1 (which ran on torch-vectorised)" in first
    record, reference = read_training_result(switched), read_training_result(whole)
    assert [epoch["implementation"] for epoch in record["epochs"]] == ["torch-vectorised", "numpy-vectorised"]
    assert [step["loss"] for step in record["steps"]] == pytest.approx([step["loss"] for step in reference["steps"]],
                                                                       rel=1e-4)
    assert train.main(["--resume", str(switched), "--epochs", "3"]) == 0  # goes on where it was: NumPy
    assert [epoch["implementation"] for epoch in read_training_result(switched)["epochs"]][2] == "numpy-vectorised"


# Routing algorithms ------------------------------------------------------------------------------------------

TINY_RUN = [*SHORT_RUN, "--limit", "64", "--test-limit", "32"]


class BuiltAlgorithms(TorchCapsNet):
    """torch-vectorised that notes the routing algorithm of every network it is built with."""

    seen: list[str] = []

    def __init__(self, config, *args, **kwargs):
        BuiltAlgorithms.seen.append(config.routing_algorithm)
        super().__init__(config, *args, **kwargs)


class DynamicOnly(TorchCapsNet):
    """A torch implementation with a routing of its own, which computes dynamic routing alone."""

    def route(self, u_hat):
        return super().route(u_hat)


def saved(path):
    """The checkpoint beside the results file ``path``, as a dict of arrays."""
    with np.load(loop.checkpoint_path(path)) as arrays:
        return {key: arrays[key] for key in arrays.files}


def test_a_self_attention_run_records_its_algorithm_names_its_file_and_resumes_with_it(tmp_path, mnist_path,
                                                                                       monkeypatch, capsys):
    """--routing-algorithm self-attention: the network is built with it (and trains digit.bias), the results
    file, its config and the checkpoint say so, the first line too, the default file name carries it; a
    resumed run takes it from the file, on the same implementation or on another that computes it."""
    BuiltAlgorithms.seen = []
    monkeypatch.setattr(loop, "TRAINING_RUNS_DIR", tmp_path)
    with registry.registered("built-algorithms", BuiltAlgorithms), \
            registry.registered("built-algorithms-too", BuiltAlgorithms):
        assert train.main(["--data-dir", str(mnist_path), "--impl", "built-algorithms", "--routing-algorithm",
                           "self-attention", *TINY_RUN]) == 0
        [out] = tmp_path.glob("*.json")
        assert out.name.startswith("built-algorithms-self-attention_small_")
        record = read_training_result(out)
        assert record["routing_algorithm"] == record["config"]["routing_algorithm"] == "self-attention"
        assert "routing algorithm self-attention, routing gradient full" in capsys.readouterr().out
        arrays = saved(out)
        assert str(arrays["routing_algorithm"]) == "self-attention"
        bias = arrays["param/digit.bias"]
        assert bias.shape == (SMALL.num_classes, SMALL.num_primary_caps) and np.abs(bias).max() > 0  # trained
        assert train.main(["--resume", str(out), "--epochs", "2"]) == 0
        assert train.main(["--resume", str(out), "--epochs", "3", "--impl", "built-algorithms-too"]) == 0
    record = read_training_result(out)
    assert [epoch["implementation"] for epoch in record["epochs"]] == ["built-algorithms"] * 2 + [
        "built-algorithms-too"]
    assert record["routing_algorithm"] == "self-attention"
    assert "routing algorithm self-attention" in capsys.readouterr().out
    assert BuiltAlgorithms.seen == ["self-attention"] * 3


def test_a_resume_refuses_another_routing_algorithm_and_an_implementation_without_it_touching_nothing(
        tmp_path, mnist_path, capsys):
    code, out = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", "--routing-algorithm",
                          "self-attention", *TINY_RUN)
    assert code == 0
    before, checkpoint = out.read_bytes(), loop.checkpoint_path(out).read_bytes()
    capsys.readouterr()
    assert train.main(["--resume", str(out), "--routing-algorithm", "dynamic", "--epochs", "2"]) == 2
    assert capsys.readouterr().err == (
        f"error: --resume {out} continues that run as it was started (--routing-algorithm self-attention); "
        "--routing-algorithm dynamic differs: drop it, or start a new run with another --out\n")
    with registry.registered("dynamic-only", DynamicOnly) as info:
        assert train.main(["--resume", str(out), "--impl", "dynamic-only", "--epochs", "2"]) == 2
        reason = info.computes(SMALL.replace(routing_algorithm="self-attention")).reason
    assert capsys.readouterr().err == f"error: implementation 'dynamic-only' {reason}\n"
    assert "'self-attention'" in reason
    assert out.read_bytes() == before and loop.checkpoint_path(out).read_bytes() == checkpoint


def test_a_new_run_on_an_implementation_without_the_algorithm_is_refused_before_any_work(tmp_path, mnist_path,
                                                                                         monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(train, "load_mnist", lambda *args: loaded.append(args))
    with registry.registered("dynamic-only", DynamicOnly) as info:
        code, out = run_train(tmp_path, mnist_path, "--impl", "dynamic-only", "--routing-algorithm",
                              "self-attention", *TINY_RUN)
        reason = info.computes(SMALL.replace(routing_algorithm="self-attention")).reason
    assert code == 2 and not out.exists() and not loop.checkpoint_path(out).exists() and loaded == []
    assert capsys.readouterr().err == f"error: implementation 'dynamic-only' {reason}\n"
    code, out = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", "--routing-algorithm",
                          "self-attention", "--routing-gradient", "final", *TINY_RUN)
    assert code == 2 and not out.exists() and loaded == []
    assert capsys.readouterr().err == (
        "error: --routing-gradient final has no meaning under --routing-algorithm self-attention (it has no "
        "iterations before its last): use --routing-gradient full\n")


def test_a_run_from_before_the_setting_resumes_as_dynamic_routing(tmp_path, mnist_path, capsys):
    """A results file and checkpoint written before --routing-algorithm existed (neither says an algorithm)
    continue with dynamic routing, refuse another algorithm, and carry the field from then on."""
    BuiltAlgorithms.seen = []
    with registry.registered("built-algorithms", BuiltAlgorithms):
        code, out = run_train(tmp_path, mnist_path, "--impl", "built-algorithms", *TINY_RUN)
        assert code == 0
        record = json.loads(out.read_text())
        del record["routing_algorithm"], record["config"]["routing_algorithm"]
        out.write_text(json.dumps(record))
        arrays = saved(out)
        del arrays["routing_algorithm"]
        with open(loop.checkpoint_path(out), "wb") as stream:
            np.savez(stream, **arrays)
        capsys.readouterr()
        assert train.main(["--resume", str(out), "--routing-algorithm", "self-attention", "--epochs", "2"]) == 2
        assert "(--routing-algorithm dynamic); --routing-algorithm self-attention differs" in capsys.readouterr().err
        assert train.main(["--resume", str(out), "--epochs", "2"]) == 0
    assert BuiltAlgorithms.seen == ["dynamic", "dynamic"]
    record = read_training_result(out)
    assert len(record["epochs"]) == 2 and record["routing_algorithm"] == "dynamic"
    assert str(saved(out)["routing_algorithm"]) == "dynamic"
