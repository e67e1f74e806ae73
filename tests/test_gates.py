"""The gates pinned with known answers: the test accuracy training reports (one process and the data-parallel
shards) for an implementation whose answers are fixed per image, the best / final accuracy, mean loss, epoch
numbers and times of a record whose accuracy is not monotone, before and after a resume, and the training
options reaching what they configure (spied on in the batches, the evaluation and the implementation built)."""

from __future__ import annotations

import argparse
import functools
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from harness import registry, train
from harness.data import load_mnist
from harness.params import init_parameters
from harness.results import TRAINING_KIND, ResultsFileError, read_training_result, write_json_atomic
from harness.spec import CONFIGS, SCHEDULES
from harness.training import loop
from harness.training.checkpoint import checkpoint_path
from implementations.numpy.capsnet import NumpyCapsNet

LIMIT, TEST_LIMIT, BATCH = 64, 50, 32  # 2 training steps per epoch; evaluation in batches of 32 and 18
STEPS_PER_EPOCH = 2
LOSSES = (4.0, 2.0, 3.0, 1.0, 5.0, 7.0)  # per step: epoch means 3, 2, 6
# epoch e answers right on the test images whose index is a multiple of RIGHT_EVERY[e - 1], wrong elsewhere:
# of the indices 0..49, 17 are multiples of 3, 25 of 2, 10 of 5
RIGHT_EVERY = (3, 2, 5)
ACCURACIES = (17 / 50, 25 / 50, 10 / 50)  # counted by hand: best (epoch 2) is not the last


class KnownAnswers(NumpyCapsNet):
    """Trains without computing anything: step k of the run (counted by Adam's step, which a checkpoint
    keeps) returns LOSSES[k - 1]; evaluation after epoch e gives the longest capsule to the true class of
    the test images whose index is a multiple of RIGHT_EVERY[e - 1] and to the next class for the others.
    Every batch it is given is recorded."""

    test_set = None  # the first TEST_LIMIT test images, set by the tests
    interrupt_after = None  # steps after which the next train_step raises KeyboardInterrupt (once)
    built: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained, self.evaluated = [], []
        self._images = self._labels = None
        KnownAnswers.built.append(self)
        self.index = {image.tobytes(): i for i, image in enumerate(KnownAnswers.test_set.images)}
        assert len(self.index) == TEST_LIMIT  # no two of these test images are the same

    def to_device(self, images, labels=None):
        self._images, self._labels = np.array(images), None if labels is None else np.array(labels)
        return super().to_device(images, labels)

    def train_step(self, batch):
        if KnownAnswers.interrupt_after == self._adam_steps:
            KnownAnswers.interrupt_after = None
            raise KeyboardInterrupt
        self.trained.append((self._images, self._labels))
        self._adam_steps += 1
        return LOSSES[self._adam_steps - 1]

    def forward(self, batch, train=True):
        assert not train
        self.evaluated.append(self._images)
        every = RIGHT_EVERY[self._adam_steps // STEPS_PER_EPOCH - 1]
        lengths = np.full((len(self._images), 10), 0.1)
        for row, image in enumerate(self._images):
            index = self.index[image.tobytes()]
            label = KnownAnswers.test_set.labels[index]
            lengths[row, label if index % every == 0 else (label + 1) % 10] = 0.9
        return lengths, None


@functools.cache
def cached_mnist(data_dir, split):
    return load_mnist(data_dir, split)


@pytest.fixture
def known_answers(mnist_path, monkeypatch):
    monkeypatch.setattr(train, "load_mnist", cached_mnist)  # read once for the whole file
    KnownAnswers.test_set = cached_mnist(str(mnist_path), "test").head(TEST_LIMIT)
    KnownAnswers.built, KnownAnswers.interrupt_after = [], None
    with registry.registered("known-answers", KnownAnswers):
        yield KnownAnswers


def run(tmp_path, mnist_path, *args, name="run.json"):
    out = tmp_path / name
    code = train.main(["--impl", "known-answers", "--data-dir", str(mnist_path), "--out", str(out), "--config",
                       "small", "--limit", str(LIMIT), "--test-limit", str(TEST_LIMIT), "--batch-size", str(BATCH),
                       *args])
    return code, out


def assert_bookkeeping(record):
    """What a 3-epoch run of KnownAnswers must record, from the hand-counted figures."""
    assert [epoch["epoch"] for epoch in record["epochs"]] == [1, 2, 3]
    assert [epoch["test_accuracy"] for epoch in record["epochs"]] == pytest.approx(ACCURACIES, abs=0)
    assert record["best_test_accuracy"] == 0.5 and record["final_test_accuracy"] == 0.2
    assert [epoch["mean_loss"] for epoch in record["epochs"]] == [3.0, 2.0, 6.0]
    assert [(step["epoch"], step["step"], step["loss"]) for step in record["steps"]] == [
        (1, 1, 4.0), (1, 2, 2.0), (2, 1, 3.0), (2, 2, 1.0), (3, 1, 5.0), (3, 2, 7.0)]
    elapsed = [step["elapsed_seconds"] for step in record["steps"]]
    assert all(0 < a <= b for a, b in zip(elapsed, elapsed[1:]))  # one clock over the run, never restarted
    for number, epoch in enumerate(record["epochs"], start=1):
        assert epoch["elapsed_seconds"] == elapsed[2 * number - 1]  # the clock after the epoch's last step
        assert epoch["images"] == LIMIT and epoch["images_per_second"] == LIMIT / epoch["train_seconds"]
        assert 0 < epoch["train_seconds"] and 0 < epoch["eval_seconds"]
        assert epoch["train_seconds"] + epoch["eval_seconds"] <= epoch["wall_seconds"]


def test_the_reported_accuracy_and_bookkeeping_are_the_hand_counted_ones(tmp_path, mnist_path, known_answers, capsys):
    code, out = run(tmp_path, mnist_path, "--epochs", "3")
    assert code == 0
    record = read_training_result(out)
    assert record["status"] == "completed"
    assert_bookkeeping(record)
    printed = capsys.readouterr().out
    assert "epoch 2: mean loss 2.0000, test accuracy 50.00%" in printed
    assert "best test accuracy 50.00%" in printed.splitlines()[-1]
    (impl,) = known_answers.built
    assert len(impl.evaluated) == 3 * 2 and [len(batch) for batch in impl.evaluated[:2]] == [32, 18]


def test_a_resumed_run_records_what_an_uninterrupted_one_does(tmp_path, mnist_path, known_answers):
    known_answers.interrupt_after = 2 * STEPS_PER_EPOCH  # Ctrl-C at the first step of epoch 3
    code, out = run(tmp_path, mnist_path, "--epochs", "3")
    assert code == 130
    record = read_training_result(out)
    assert record["status"] == "interrupted" and len(record["epochs"]) == 2
    assert (record["best_test_accuracy"], record["final_test_accuracy"]) == (0.5, 0.5)
    stopped_at = record["epochs"][-1]["elapsed_seconds"]
    assert train.main(["--data-dir", str(mnist_path), "--resume", str(out)]) == 0
    resumed = read_training_result(out)
    assert resumed["status"] == "completed"
    assert_bookkeeping(resumed)
    assert resumed["epochs"][:2] == record["epochs"]  # the completed epochs are kept as they were
    assert resumed["steps"][4]["elapsed_seconds"] > stopped_at


class TwoRankSum:
    """Stands in for torch.distributed between two threads: all_reduce sums the two ranks' tensors."""

    def __init__(self):
        self.barrier, self.parts, self.calls = threading.Barrier(2, timeout=30), {}, 0

    def all_reduce(self, tensor, op=None):
        assert op is None  # a sum
        self.parts[threading.get_ident()] = tensor.clone()
        self.calls += 1
        self.barrier.wait()
        tensor.copy_(sum(self.parts.values()))
        self.barrier.wait()


def test_the_data_parallel_accuracy_is_the_hand_counted_fraction_of_the_whole_test_set(known_answers, monkeypatch):
    pytest.importorskip("torch")
    from harness.training import ddp

    fake = TwoRankSum()
    monkeypatch.setattr(ddp, "dist", fake)
    impls = [KnownAnswers(CONFIGS["small"], init_parameters(CONFIGS["small"])) for _ in range(2)]
    for impl in impls:
        impl._adam_steps = STEPS_PER_EPOCH  # after epoch 1: right on every third image
    answers = {}

    def rank(number):
        ctx = ddp.Context(number, 2, number, "gloo", "cpu")
        answers[number] = ddp.evaluate_sharded(ctx, impls[number], known_answers.test_set, 8, "eval", None)

    threads = [threading.Thread(target=rank, args=(number,)) for number in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == {0: 17 / 50, 1: 17 / 50} and fake.calls == 2
    seen = [np.concatenate(impl.evaluated) for impl in impls]
    assert [len(images) for images in seen] == [25, 25]  # images r::2, in batches of 8, 8, 8, 1
    indices = [sorted(impls[0].index[image.tobytes()] for image in images) for images in seen]
    assert indices == [list(range(0, 50, 2)), list(range(1, 50, 2))]


def rows_of(images):
    return {image.tobytes() for image in images}


def test_limit_batch_size_seed_and_no_augment_reach_the_batches_training_uses(tmp_path, mnist_path, known_answers):
    first = cached_mnist(str(mnist_path), "train").head(LIMIT)
    orders = {}
    for name, extra in [("plain-0", ["--no-augment"]), ("again-0", ["--no-augment"]),
                        ("plain-1", ["--no-augment", "--seed", "1"]), ("shifted-0", [])]:
        known_answers.built.clear()
        code, out = run(tmp_path, mnist_path, "--epochs", "2", *extra, name=f"{name}.json")
        assert code == 0
        (impl,) = known_answers.built
        assert [len(labels) for _, labels in impl.trained] == [32, 32, 32, 32]
        images = np.concatenate([images for images, _ in impl.trained])
        labels = np.concatenate([labels for _, labels in impl.trained])
        orders[name] = labels
        by_row = {image.tobytes(): label for image, label in zip(first.images, first.labels)}
        if name == "shifted-0":  # the paper's shifts: most training images are moved, none beyond the limit
            assert read_training_result(out)["augment"] is True
            assert len(rows_of(images) & set(by_row)) < LIMIT // 2
            assert sorted(labels[:LIMIT]) == sorted(first.labels)
        else:  # exactly the first LIMIT images once per epoch, each with its own label
            assert read_training_result(out)["augment"] is False
            for epoch in range(2):
                part = slice(epoch * LIMIT, (epoch + 1) * LIMIT)
                assert rows_of(images[part]) == set(by_row)
                assert all(by_row[image.tobytes()] == label for image, label in zip(images[part], labels[part]))
        evaluated = np.concatenate(impl.evaluated[:2])
        assert len(evaluated) == TEST_LIMIT and rows_of(evaluated) == set(impl.index)  # the first 50 test images
    assert np.array_equal(orders["plain-0"], orders["again-0"])  # the seed fixes the order...
    assert not np.array_equal(orders["plain-0"], orders["plain-1"])  # ...and another seed changes it
    assert not np.array_equal(orders["plain-0"][:LIMIT], orders["plain-0"][LIMIT:])  # reshuffled every epoch


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_and_config_reach_the_implementation_built(tmp_path, mnist_path, known_answers, dtype):
    code, out = run(tmp_path, mnist_path, "--dtype", dtype)
    assert code == 0
    (impl,) = known_answers.built
    assert impl.dtype == dtype and impl.config == CONFIGS["small"]
    assert {value.dtype for value in impl.parameters().values()} == {np.dtype(dtype)}
    record = read_training_result(out)
    assert record["dtype"] == dtype and record["config_name"] == "small"
    assert record["config"]["conv1_channels"] == CONFIGS["small"].conv1_channels


def test_epochs_raises_the_total_of_a_resumed_run(tmp_path, mnist_path, known_answers):
    code, out = run(tmp_path, mnist_path, "--epochs", "2")
    assert code == 0 and len(read_training_result(out)["epochs"]) == 2
    known_answers.built.clear()
    assert train.main(["--data-dir", str(mnist_path), "--resume", str(out), "--epochs", "3"]) == 0
    assert_bookkeeping(read_training_result(out))
    (impl,) = known_answers.built
    assert len(impl.trained) == STEPS_PER_EPOCH  # only epoch 3 ran
    assert loop.load_checkpoint(out)[0] == 3


class StandInTorchrun:
    """subprocess.run for harness.scaling: every torchrun command is recorded (with its world size and the
    worker's parsed options) and answered as ``answer`` says ("ok": a results part, "fail": exit 1,
    "silent": exit 0 and no part, "hang": a timeout); every other command (machine facts) runs for real."""

    def __init__(self, answer="ok"):
        import subprocess

        self.answer, self.calls, self.real = answer, [], subprocess.run

    def __call__(self, command, *args, env=None, cwd=None, timeout=None, **kwargs):
        import json
        import subprocess

        from harness import scaling

        if "torch.distributed.run" not in command:
            return self.real(command, *args, env=env, cwd=cwd, timeout=timeout, **kwargs)
        world_size = int(command[command.index("--nproc-per-node") + 1])
        worker = scaling._worker_parser().parse_args(command[command.index("worker") + 1:])
        self.calls.append({"command": command, "env": env, "cwd": cwd, "timeout": timeout,
                           "world_size": world_size, "worker": worker})
        if self.answer == "hang":
            raise subprocess.TimeoutExpired(command, timeout)
        if self.answer == "ok":
            worker.out.write_text(json.dumps({"world_size": world_size, "threads_per_rank": worker.threads,
                                              "per_rank_batch_size": worker.per_rank_batch_size,
                                              "global_batch_size": worker.per_rank_batch_size * world_size,
                                              "steps": worker.steps, "step_seconds": 0.1, "images_per_second": 80.0,
                                              "allreduce_seconds": None, "allreduce_share": None}))
        return subprocess.CompletedProcess(command, 1 if self.answer == "fail" else 0)


def test_the_scaling_options_reach_every_world_size_s_ranks(tmp_path, monkeypatch):
    """--world-sizes, --threads, --global-batch-size / --per-rank-batch-size, --steps, --warmup, --config,
    --dtype, --seed, --timeout-s, --impl and --out, read back from the torchrun commands the measurement
    starts (a stand-in for torchrun answers each with a results part)."""
    pytest.importorskip("torch")
    import json

    from harness import scaling

    torchrun = StandInTorchrun()

    def launched():
        return [(call["world_size"], call["worker"], call["env"]["OMP_NUM_THREADS"], call["timeout"])
                for call in torchrun.calls]

    monkeypatch.setattr(scaling.subprocess, "run", torchrun)
    out = tmp_path / "scaling.json"
    assert scaling.main(["--impl", "torch-looped", "--world-sizes", "1", "2", "4", "--threads", "4",
                         "--global-batch-size", "16", "--steps", "3", "--warmup", "1", "--config", "small",
                         "--dtype", "float64", "--seed", "5", "--timeout-s", "9", "--out", str(out)]) == 0
    assert [(w, a.per_rank_batch_size, a.threads, threads) for w, a, threads, _ in launched()] == [
        (1, 16, 4, "4"), (2, 8, 2, "2"), (4, 4, 1, "1")]  # strong scaling over 4 cores
    for _, worker, _, timeout in launched():
        assert (worker.impl, worker.config, worker.dtype, worker.seed) == ("torch-looped", "small", "float64", 5)
        assert (worker.steps, worker.warmup, worker.timeout_s) == (3, 1, 9.0)
        assert timeout == 9.0 + scaling.LAUNCH_GRACE_S * 4
    payload = json.loads(out.read_text())
    assert (payload["implementation"], payload["config_name"], payload["dtype"], payload["scaling"]) == (
        "torch-looped", "small", "float64", "strong")
    assert [run["world_size"] for run in payload["runs"]] == [1, 2, 4]
    torchrun.calls.clear()
    assert scaling.main(["--world-sizes", "1", "2", "--threads", "2", "--per-rank-batch-size", "4",
                         "--config", "small", "--out", str(out)]) == 0
    assert [(w, a.per_rank_batch_size, a.threads) for w, a, _, _ in launched()] == [(1, 4, 2), (2, 4, 1)]
    assert json.loads(out.read_text())["scaling"] == "weak"


def test_the_profile_options_reach_what_it_runs(tmp_path, monkeypatch, capsys):
    """--impl, --config, --batch-size, --dtype, --steps, --warmup, --no-memory, --threads, --gemm-size and
    --out, spied on in the calls the profiler makes (the profiling itself is stubbed: it fails, so the
    command ends with exit 1 and writes nothing)."""
    from harness import profile

    calls = {"profiled": [], "peak": [], "threads": []}

    def profiled(info, config, batch_size, dtype, steps, warmup, traces, memory):
        calls["profiled"].append((info.name, config, batch_size, dtype, steps, warmup, traces, memory))
        raise RuntimeError("stub")

    monkeypatch.setattr(profile, "profile_implementation", profiled)
    monkeypatch.setattr(profile, "gemm_peak_gflops", lambda backend, size: calls["peak"].append(size) or 1.0)
    monkeypatch.setattr(profile, "set_threads", calls["threads"].append)
    assert profile.main(["--impl", "numpy-vectorised", "torch-looped", "--config", "small", "--batch-size", "3",
                         "--dtype", "float64", "--steps", "4", "--warmup", "0", "--no-memory", "--threads", "1",
                         "--gemm-size", "64", "--out", str(tmp_path / "p")]) == 1
    traces = tmp_path / "p" / profile.TRACES
    small = CONFIGS["small"]
    assert calls["profiled"] == [("numpy-vectorised", small, 3, "float64", 4, 0, traces, False),
                                 ("torch-looped", small, 3, "float64", 4, 0, traces, False)]
    assert calls["threads"] == [1] and set(calls["peak"]) == {64}
    calls["profiled"].clear()
    assert profile.main(["--impl", "numpy-vectorised", "--out", str(tmp_path / "p")]) == 1
    assert calls["profiled"][0][1:] == (CONFIGS["paper"], 32, "float32", 5, 2, traces, True)  # the defaults
    assert "profiling numpy-vectorised failed: RuntimeError: stub" in capsys.readouterr().err


# Mutation survivors of harness/training/loop.py that change a figure or a gate (tests/mutation.py epochs) -------------

def test_a_resume_drops_the_steps_of_the_epoch_that_was_interrupted():
    record = {"epochs": [{"epoch": 1}, {"epoch": 2}],
              "steps": [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}, {"epoch": 3, "loss": 0.3}]}
    loop.truncate_to_completed_epochs(record)
    assert record["steps"] == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}]
    assert set(record) == {"epochs", "steps"}


def test_a_diverged_loss_names_the_loss_the_epoch_and_the_step():
    from harness.training.run_status import TrainingDiverged

    loop.check_finite(0.25, 1, 7)  # finite: nothing raised
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at epoch 2, step 7$"):
        loop.check_finite(float("nan"), 2, 7)


def test_a_single_process_run_draws_what_rank_0_of_a_data_parallel_run_draws():
    # the shipped runs' data order: a changed default rank would silently draw another order
    assert loop.epoch_rng(3, 2).integers(1 << 30, size=4).tolist() == \
        loop.epoch_rng(3, 2, rank=0).integers(1 << 30, size=4).tolist()
    assert loop.epoch_rng(3, 2).integers(1 << 30) != loop.epoch_rng(3, 2, rank=1).integers(1 << 30)


# The options and the record, without a training run (the mutants tests/test_train.py alone would kill) --------

def parsed(*argv, default_impl=None):
    parser = argparse.ArgumentParser(formatter_class=lambda prog: argparse.HelpFormatter(prog, width=1000))
    loop.add_training_arguments(parser, batch_help="images per step", default_impl=default_impl)
    return parser, parser.parse_args(list(argv))


def test_training_options_default_to_the_documented_values_with_their_types():
    _, args = parsed()
    assert (args.impl, args.epochs, args.batch_size, args.limit, args.test_limit, args.seed, args.no_augment,
            args.schedule, args.log_every, args.resume, args.overwrite, args.out) == (
        None, 1, 128, None, None, 0, False, loop.DEFAULT_SCHEDULE, None, None, False, None)
    assert parsed(default_impl="numpy-vectorised")[1].impl == "numpy-vectorised"
    _, args = parsed("--epochs", "3", "--batch-size", "16", "--limit", "10", "--test-limit", "7", "--no-augment",
                     "--schedule", "constant", "--log-every", "5", "--resume", "r.json", "--overwrite")
    assert (args.epochs, args.batch_size, args.limit, args.test_limit, args.no_augment, args.schedule,
            args.log_every, args.resume, args.overwrite) == (3, 16, 10, 7, True, "constant", 5, Path("r.json"), True)


@pytest.mark.parametrize("argv", [["--schedule", "cosine"], ["--log-every", "0"], ["--log-every", "x"],
                                  ["--epochs", "0"], ["--overwrite", "yes"]])
def test_a_training_option_out_of_its_range_is_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        parsed(*argv)
    assert "error:" in capsys.readouterr().err


def test_every_training_option_has_a_help_that_says_its_default():
    parser, _ = parsed()
    for action in parser._actions:
        assert isinstance(action.help, str) and "None" not in action.help, action.dest
    text = " ".join(parser.format_help().split())
    for shown in ("--impl NAME", "implementation; see `capsbench list` (default: none: needed unless --resume)",
                  "(default: 1)", "images per step (default: 128)", "--log-every STEPS", "--resume FILE",
                  f"(default: {loop.DEFAULT_SCHEDULE})", "(default: a new run)", "--overwrite "):
        assert shown in text, shown
    text = " ".join(parsed(default_impl="numpy-vectorised")[0].format_help().split())
    assert "--impl NAME implementation; see `capsbench list` (default: numpy-vectorised)" in text


def written_record(tmp_path, *argv, ranks=1, done=0, routing_gradient=True):
    """A results file as a new run writes it (``argv``: its options), with ``done`` completed loop."""
    _, args = parsed("--impl", "numpy-vectorised", "--seed", "5", "--limit", "64", "--test-limit", "50",
                     "--batch-size", "16", "--epochs", "4", "--schedule", "constant", *argv)
    record = loop.new_record(registry.get("numpy-vectorised"), args, SCHEDULES[args.schedule], 64, 50, ranks)
    for epoch in range(1, done + 1):
        loop.add_epoch(record, loop.epoch_summary(epoch, [1.0], 0.5, 1.0, 1.0, 2.0, 64, float(epoch),
                                                  implementation="numpy-vectorised"))
    if not routing_gradient:
        del record["routing_gradient"]  # a file older than the option
    path = tmp_path / "run.json"
    write_json_atomic(path, record)
    return path, record


def test_a_new_record_holds_the_options_it_was_started_with(tmp_path):
    _, args = parsed("--impl", "numpy-vectorised", "--seed", "5", "--limit", "640", "--test-limit", "50",
                     "--batch-size", "16", "--epochs", "4", "--schedule", "constant", "--no-augment",
                     "--routing-gradient", "final", "--dtype", "float64")
    record = loop.new_record(registry.get("numpy-vectorised"), args, SCHEDULES["constant"], 64, 50, ranks=2)
    expected = {"kind": TRAINING_KIND, "format_version": loop.FORMAT_VERSION, "status": "running", "message": "",
                "implementation": "numpy-vectorised", "dtype": "float64", "config_name": "paper",
                "routing_algorithm": "dynamic", "routing_gradient": "final",
                "config": CONFIGS["paper"].replace(routing_gradient="final").as_dict(),
                "schedule": SCHEDULES["constant"].as_dict(), "batch_size": 32, "epochs_requested": 4,
                "train_images": 64, "test_images": 50, "ranks": 2, "limit": 640, "test_limit": 50, "seed": 5,
                "augment": False, "best_test_accuracy": None, "final_test_accuracy": None, "epochs": [],
                "steps": []}
    assert {key: record[key] for key in expected} == expected
    assert record["optimizer"]["name"] == "adam" and record["optimizer"]["lr"] == 1e-3  # the paper's
    assert set(registry.get("numpy-vectorised").describe()) <= set(record)
    assert {"threads", "started_at", "machine"} <= set(record)
    alone = loop.new_record(registry.get("numpy-vectorised"), parsed("--impl", "numpy-vectorised")[1],
                            SCHEDULES["paper"], 64, 50)
    assert (alone["augment"], alone["ranks"], alone["batch_size"]) == (True, 1, 128)
    assert alone["started_at"].endswith("+00:00")  # UTC, whatever the machine's zone


def test_a_resume_takes_every_option_from_the_file(tmp_path):
    path, _ = written_record(tmp_path, "--no-augment", "--dtype", "float64", ranks=2, done=1)
    _, args = parsed("--resume", str(path))
    record = loop.resume_options(path, args)
    assert (args.impl, args.config, args.dtype, args.seed, args.limit, args.test_limit, args.batch_size,
            args.no_augment, args.schedule, args.routing_gradient, args.epochs, args.out) == (
        "numpy-vectorised", "paper", "float64", 5, 64, 50, 16, True, "constant", "full", 4, path)
    assert record["epochs_requested"] == 4 and len(record["epochs"]) == 1
    path, _ = written_record(tmp_path, "--routing-gradient", "final")
    loop.resume_options(path, args)
    assert args.routing_gradient == "final"
    path, _ = written_record(tmp_path, "--routing-gradient", "final", routing_gradient=False)
    loop.resume_options(path, args)
    assert args.routing_gradient == "full"  # a file without it: the only behaviour there was
    path, _ = written_record(tmp_path, "--routing-algorithm", "self-attention")
    loop.resume_options(path, args)
    assert args.routing_algorithm == "self-attention"
    path, record = written_record(tmp_path, "--routing-algorithm", "self-attention")
    del record["routing_algorithm"]  # the config's says it still
    write_json_atomic(path, record)
    loop.resume_options(path, args)
    assert args.routing_algorithm == "self-attention"
    del record["config"]["routing_algorithm"]  # a file older than the option: dynamic, the only algorithm then
    write_json_atomic(path, record)
    assert loop.resume_options(path, args)["routing_algorithm"] == args.routing_algorithm == "dynamic"
    path, record = written_record(tmp_path)
    del record["ranks"]  # a file older than data-parallel training: one process
    write_json_atomic(path, record)
    loop.resume_options(path, args)
    assert args.batch_size == 16


def test_a_resume_continues_on_the_last_epochs_implementation_or_the_one_given(tmp_path):
    path, record = written_record(tmp_path, done=2)
    record["epochs"][1]["implementation"] = "torch-vectorised"  # epoch 2 ran on another
    write_json_atomic(path, record)
    parser, args = parsed("--resume", str(path))
    loop.resume_options(path, args, loop.given_options(parser, ["--resume", str(path)]))
    assert args.impl == "torch-vectorised"
    argv = ["--resume", str(path), "--impl", "torch-fused"]
    parser, args = parsed(*argv)
    loop.resume_options(path, args, loop.given_options(parser, argv))  # not refused
    assert args.impl == "torch-fused"


def test_a_resume_reads_the_data_folder_the_run_recorded_unless_one_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSBENCH_DATA_DIR", str(tmp_path))
    path, record = written_record(tmp_path)
    assert record["data_dir"] == str(tmp_path.resolve())
    monkeypatch.delenv("CAPSBENCH_DATA_DIR")
    _, args = parsed("--resume", str(path))
    loop.resume_options(path, args)
    assert args.data_dir == str(tmp_path.resolve())
    _, args = parsed("--resume", str(path), "--data-dir", "elsewhere")
    loop.resume_options(path, args)
    assert args.data_dir == "elsewhere"
    record["data_dir"] = str(tmp_path / "gone")  # moved away: $CAPSBENCH_DATA_DIR or --data-dir, as for a new run
    write_json_atomic(path, record)
    _, args = parsed("--resume", str(path))
    loop.resume_options(path, args)
    assert args.data_dir is None


@pytest.mark.parametrize("argv, message", [
    (["--seed", "6"], "(--seed 5); --seed 6 differs"),
    (["--batch-size", "8"], "(--batch-size 16); --batch-size 8 differs"),
    (["--no-augment"], "(with augmentation); --no-augment differs"),
    (["--schedule", "paper"], "(--schedule constant); --schedule paper differs"),
    (["--routing-gradient", "final"], "(--routing-gradient full); --routing-gradient final differs"),
    (["--routing-algorithm", "self-attention"], "(--routing-algorithm dynamic); --routing-algorithm self-attention "
                                                "differs"),
])
def test_a_resume_refuses_a_given_option_that_differs_and_names_both(tmp_path, argv, message):
    path, _ = written_record(tmp_path)
    parser, args = parsed("--resume", str(path), *argv)
    with pytest.raises(loop.TrainingOptionError) as error:
        loop.resume_options(path, args, loop.given_options(parser, ["--resume", str(path), *argv]))
    assert str(error.value) == (f"--resume {path} continues that run as it was started {message}: drop it, or "
                                "start a new run with another --out")


def test_a_resume_accepts_the_same_options_its_own_out_and_a_new_total_of_epochs(tmp_path, monkeypatch):
    path, _ = written_record(tmp_path, done=2)
    monkeypatch.chdir(tmp_path)
    argv = ["--resume", str(path), "--seed", "5", "--batch-size", "16", "--out", "run.json", "--epochs", "6"]
    parser, args = parsed(*argv)
    record = loop.resume_options(path, args, loop.given_options(parser, argv))
    assert args.epochs == record["epochs_requested"] == 6 and args.out == path
    argv = ["--resume", str(path), "--epochs", "2"]  # as many as done: allowed
    parser, args = parsed(*argv)
    assert loop.resume_options(path, args, loop.given_options(parser, argv))["epochs_requested"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--out", "other.json"], "--resume {path} writes to that file; --out other.json differs: drop --out"),
    (["--overwrite"], "--overwrite replaces a run and --resume continues one: give only one"),
    (["--epochs", "1"], "--epochs 1 is fewer than the 2 epoch(s) {path} has completed (--epochs counts all epochs, "
                        "those done included)"),
])
def test_a_resume_refuses_another_out_overwrite_and_fewer_epochs(tmp_path, argv, message):
    path, _ = written_record(tmp_path, done=2)
    parser, args = parsed("--resume", str(path), *argv)
    with pytest.raises(loop.TrainingOptionError) as error:
        loop.prepare_resume(args, loop.given_options(parser, ["--resume", str(path), *argv]))
    assert str(error.value) == message.format(path=path)


def test_prepare_resume_of_a_new_run_refuses_an_existing_file_unless_overwrite(tmp_path):
    out = tmp_path / "run.json"
    assert loop.prepare_resume(parsed("--out", str(out))[1]) == (None, 0, None, None)
    out.write_text("{}")
    with pytest.raises(loop.TrainingOptionError) as error:
        loop.prepare_resume(parsed("--out", str(out))[1])
    assert str(error.value) == (f"{out} already exists: continue that run with --resume {out}, or replace it "
                                "with --overwrite (or choose another --out)")
    checkpoint = checkpoint_path(out)
    checkpoint.write_text("old")
    out.unlink()
    with pytest.raises(loop.TrainingOptionError, match="^" + re.escape(f"{checkpoint} already exists")):
        loop.prepare_resume(parsed("--out", str(out))[1])  # a checkpoint alone is a run too
    assert loop.prepare_resume(parsed("--out", str(out), "--overwrite")[1]) == (None, 0, None, None)
    assert not checkpoint.exists()  # the old checkpoint goes with the run it belonged to


def test_prepare_resume_continues_from_the_checkpoint_of_the_last_completed_epoch(tmp_path):
    path, _ = written_record(tmp_path, done=0)
    record, done, params, adam = loop.prepare_resume(parsed("--resume", str(path))[1])
    assert (done, params, adam, record["epochs"]) == (0, None, None, [])  # stopped in epoch 1: start again

    path, _ = written_record(tmp_path, done=2)
    np.savez(checkpoint_path(path), epoch=np.int64(2), **{"param/w": np.arange(3.0), "adam/step": np.int64(8)})
    record, done, params, adam = loop.prepare_resume(parsed("--resume", str(path))[1])
    assert done == 2 and len(record["epochs"]) == 2 and params["w"].tolist() == [0, 1, 2] and adam["step"] == 8
    np.savez(checkpoint_path(path), epoch=np.int64(1), **{"param/w": np.arange(3.0)})
    with pytest.raises(ResultsFileError) as error:
        loop.prepare_resume(parsed("--resume", str(path))[1])
    assert str(error.value) == f"{path}: the results hold 2 epoch(s) but the checkpoint was saved after epoch 1"
    np.savez(checkpoint_path(path), epoch=np.int64(2), routing_algorithm=np.array("self-attention"),
             **{"param/w": np.arange(3.0)})
    with pytest.raises(ResultsFileError) as error:  # the record says dynamic routing
        loop.prepare_resume(parsed("--resume", str(path))[1])
    assert str(error.value) == (f"{checkpoint_path(path)} holds a network that routes with self-attention, but "
                                f"{path} records the routing algorithm dynamic: they are not of one run")


def test_asking_which_options_were_given_leaves_the_parser_defaults_as_they_were():
    parser, _ = parsed()
    assert loop.given_options(parser, ["--seed", "3", "--no-augment"]) == {"seed", "no_augment"}
    assert vars(parser.parse_args([])) == vars(parsed()[1])


def test_the_first_line_says_what_is_trained_on_what_and_where_it_goes():
    _, args = parsed("--impl", "numpy-vectorised", "--limit", "70000", "--test-limit", "50", "--batch-size", "16",
                     "--epochs", "3")
    assert loop.start_line("numpy-vectorised", args, 60000, 50, Path("out.json")) == (
        f"training numpy-vectorised (float32, paper network, schedule {loop.DEFAULT_SCHEDULE}, routing algorithm "
        "dynamic, routing gradient full) on 60,000 training images (all there are: the limit 70,000 is more), "
        "evaluating on 50 test images, batch 16, 3 epoch(s); results -> out.json")
    assert loop.start_line("numpy-vectorised", args, 60000, 50, Path("out.json"), ranks=2, resumed_from=1) == (
        f"training numpy-vectorised (float32, paper network, schedule {loop.DEFAULT_SCHEDULE}, routing algorithm "
        "dynamic, routing gradient full) data-parallel on 2 ranks, on 60,000 training images (all there are: the "
        "limit 70,000 is more), evaluating on 50 test images, batch 16 per rank = 32 global, 3 epoch(s), resuming "
        "after epoch 1; results -> out.json")
    _, args = parsed("--impl", "numpy-vectorised", "--test-limit", "20000")
    assert "evaluating on 10,000 test images (all there are: the limit 20,000 is more), batch 128" in \
        loop.start_line("numpy-vectorised", args, 60000, 10000, Path("out.json"))
    assert loop.clamped(None, 5) == loop.clamped(5, 5) == loop.clamped(4, 5) == ""
    assert loop.clamped(1000, 5) == " (all there are: the limit 1,000 is more)"


def test_an_epoch_line_says_loss_accuracy_and_times_and_adds_only_the_note_asked_for():
    summary = loop.epoch_summary(2, [1.0, 0.5], 0.987654, 20.0, 2.0, 23.0, 640, 40.0, implementation="x")
    assert loop.epoch_line(summary) == ("epoch 2: mean loss 0.7500, test accuracy 98.77%; training 20.0 s (32.0 "
                                          "images/s), evaluation 2.0 s, epoch wall time 23.0 s")
    assert loop.epoch_line(summary, " (best)").endswith("epoch wall time 23.0 s (best)")


def test_an_interrupted_run_says_where_its_results_are_and_how_to_go_on(tmp_path):
    out = Path("run.json")
    assert loop.interrupted_line(out, {"epochs": [{}, {}]}, "interrupted") == (
        "interrupted; the results up to epoch 2 (the last completed) are in run.json (continue with --resume "
        "run.json)")
    assert loop.interrupted_line(out, {"epochs": []}, "interrupted") == (
        "interrupted before epoch 1 completed: nothing was completed or saved; --resume run.json starts the run "
        "again from the beginning, with its options")


def test_a_default_results_file_is_named_by_implementation_gradient_network_and_time():
    args = argparse.Namespace(routing_gradient="final")
    assert loop.routing_gradient_suffix(args) == "-final-gradient"
    assert loop.routing_gradient_suffix(argparse.Namespace(routing_gradient="full")) == ""
    path = loop.default_output("numpy-vectorised", "paper", loop.routing_gradient_suffix(args))
    assert path.parent == loop.TRAINING_RUNS_DIR
    assert re.fullmatch(r"numpy-vectorised-final-gradient_paper_\d{8}-\d{6}\.json", path.name), path.name
    assert re.fullmatch(r"torch-fused_small_\d{8}-\d{6}\.json", loop.default_output("torch-fused", "small").name)
    assert loop.routing_suffix(argparse.Namespace(routing_algorithm="dynamic", routing_gradient="full")) == ""
    assert loop.routing_suffix(argparse.Namespace(routing_algorithm="self-attention", routing_gradient="full")) == \
        "-self-attention"
    assert loop.routing_suffix(argparse.Namespace(routing_algorithm="dynamic", routing_gradient="final")) == \
        "-final-gradient"


def test_a_default_results_file_never_takes_the_name_of_an_existing_run(tmp_path, monkeypatch):
    """Two runs of one implementation, routing and network started in the same second: the second takes
    ``-2``, the third ``-3`` (a checkpoint left alone counts as a run)."""
    import datetime

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(loop.dt, "datetime", Frozen)
    first = loop.default_output("torch-vectorised", "small", "-self-attention", folder=tmp_path)
    assert first == tmp_path / "torch-vectorised-self-attention_small_20260102-030405.json"
    first.write_text("{}")
    second = loop.default_output("torch-vectorised", "small", "-self-attention", folder=tmp_path)
    assert second == tmp_path / "torch-vectorised-self-attention_small_20260102-030405-2.json"
    checkpoint_path(second).write_bytes(b"npz")
    assert loop.default_output("torch-vectorised", "small", "-self-attention", folder=tmp_path).name.endswith(
        "030405-3.json")
    assert loop.default_output("torch-vectorised", "small", folder=tmp_path).name == \
        "torch-vectorised_small_20260102-030405.json"  # dynamic routing: no suffix, no clash


# The scaling command's launches, record, lines and failures, torchrun stood in for (scaling mutants) ----------

def test_the_scaling_command_launches_torchrun_and_records_what_it_measured(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    import json
    import sys

    from harness import scaling
    from harness.settings import SCALING_SUBDIR

    torchrun = StandInTorchrun()
    monkeypatch.setattr(scaling.subprocess, "run", torchrun)
    monkeypatch.setattr(scaling, "RUNS_DIR", tmp_path)
    steps = str(scaling.MIN_RELIABLE_STEPS)
    assert scaling.main(["--impl", "torch-looped", "--world-sizes", "1", "2", "--threads", "2", "--global-batch-size",
                         "16", "--steps", steps, "--config", "small", "--dtype", "float64"]) == 0
    out = tmp_path / SCALING_SUBDIR / "torch-looped_small_scaling.json"
    printed = capsys.readouterr()
    assert printed.err == ""  # enough steps: no warning
    lines = printed.out.splitlines()
    assert lines[0] == (f"scaling of torch-looped (float64, small network, strong scaling, global batch 16 of seeded "
                        f"synthetic images) over world sizes 1 2, {steps} timed steps each; results -> {out}")
    assert lines[1] == "world size 1: 16 images per rank, 2 thread(s) per rank ..."
    assert lines[2] == "world size 2: 8 images per rank, 1 thread(s) per rank ..."
    assert lines[-1] == f"results written to {out}"
    assert lines[3].startswith("| world size | threads/rank | global batch |")  # the table, then where it went
    root = Path(scaling.__file__).resolve().parent.parent
    for call, (world_size, threads) in zip(torchrun.calls, [(1, 2), (2, 1)]):
        assert call["command"][:9] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node", str(world_size), "-m", "harness.scaling", "worker"]
        assert call["env"]["OMP_NUM_THREADS"] == call["env"]["MKL_NUM_THREADS"] == str(threads)
        assert Path(call["cwd"]) == root
    payload = json.loads(out.read_text())
    assert (payload["kind"], payload["format_version"], payload["backend"], payload["scaling"]) == (
        scaling.SCALING_KIND, 2, "gloo", "strong")
    assert payload["allreduce_measure"].startswith("exposed: median over adjacent pairs of (DDP step - ")
    assert payload["efficiency"].startswith("speed-up over the smallest world size / growth of the compute used (CPU")
    assert payload["data"] == "seeded synthetic batches, already on the device (no data loading)"
    assert payload["machine"]["cpu_count"] >= 1
    assert scaling.main(["--impl", "torch-looped", "--world-sizes", "1", "--per-rank-batch-size", "4", "--steps", "3",
                         "--config", "small", "--out", str(tmp_path / "weak.json")]) == 0
    printed = capsys.readouterr()
    assert "weak scaling, 4 images per rank of seeded synthetic images" in printed.out
    assert printed.err == (f"warning: 3 timed steps are fewer than the {scaling.MIN_RELIABLE_STEPS} a reliable "
                           "efficiency needs (--steps)\n")


@pytest.mark.parametrize("answer, message", [
    ("fail", "error: the run with world size 1 failed (torchrun exit status 1); no results file written\n"),
    ("silent", "error: the run with world size 1 failed (torchrun exit status 0); no results file written\n"),
    ("hang", "error: the run with world size 1 did not finish in time; no results file written\n"),
])
def test_a_world_size_that_fails_ends_the_scaling_run_with_one_line_and_no_file(tmp_path, monkeypatch, capsys,
                                                                                 answer, message):
    pytest.importorskip("torch")
    from harness import scaling

    monkeypatch.setattr(scaling.subprocess, "run", StandInTorchrun(answer))
    out = tmp_path / "scaling.json"
    assert scaling.main(["--impl", "torch-looped", "--world-sizes", "1", "2", "--steps", "10", "--config", "small",
                         "--out", str(out)]) == 1
    assert capsys.readouterr().err == message and not out.exists()


def test_scaling_refuses_an_unknown_implementation_and_an_uneven_batch_and_forwards_worker(monkeypatch, capsys):
    pytest.importorskip("torch")
    from harness import scaling

    assert scaling.main(["--impl", "torch-lopped", "--config", "small"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "torch-lopped" in error
    assert scaling.main(["--impl", "torch-looped", "--world-sizes", "3", "--global-batch-size", "16"]) == 2
    assert capsys.readouterr().err == "error: the global batch 16 does not split evenly over 3 ranks\n"
    forwarded = []
    monkeypatch.setattr(scaling, "worker_main", lambda argv: forwarded.append(argv) or 7)
    assert scaling.main(["worker", "--steps", "2"]) == 7 and forwarded == [["--steps", "2"]]


def test_scaling_passes_the_routing_algorithm_to_every_rank_and_refuses_an_implementation_without_it(
        tmp_path, monkeypatch, capsys):
    """--routing-algorithm reaches each world size's ranks, the results file and the default file name; an
    implementation that does not compute it is refused in one line before torchrun starts."""
    pytest.importorskip("torch")
    import json

    from harness import scaling
    from harness.settings import SCALING_SUBDIR
    from implementations.torch.autograd import TorchCapsNet

    class DynamicOnly(TorchCapsNet):
        def route(self, u_hat):
            return super().route(u_hat)

    torchrun = StandInTorchrun()
    monkeypatch.setattr(scaling.subprocess, "run", torchrun)
    monkeypatch.setattr(scaling, "RUNS_DIR", tmp_path)
    assert scaling.main(["--impl", "torch-looped", "--world-sizes", "1", "2", "--global-batch-size", "4",
                         "--steps", "3", "--config", "small", "--routing-algorithm", "self-attention"]) == 0
    assert [call["worker"].routing_algorithm for call in torchrun.calls] == ["self-attention"] * 2
    out = tmp_path / SCALING_SUBDIR / "torch-looped-self-attention_small_scaling.json"
    assert json.loads(out.read_text())["routing_algorithm"] == "self-attention"
    assert "small network, routing algorithm self-attention, strong scaling" in capsys.readouterr().out
    torchrun.calls.clear()
    with registry.registered("dynamic-only", DynamicOnly) as info:
        assert scaling.main(["--impl", "dynamic-only", "--config", "small", "--routing-algorithm",
                             "self-attention"]) == 2
        reason = info.computes(CONFIGS["small"].replace(routing_algorithm="self-attention")).reason
    assert capsys.readouterr().err == f"error: implementation 'dynamic-only' {reason}\n"
    assert torchrun.calls == []


def test_the_scaling_options_default_to_what_their_help_says(monkeypatch, capsys):
    pytest.importorskip("torch")
    import sys
    import types

    from harness import scaling

    command = scaling.parser()
    assert vars(command.parse_args([])) == {
        "impl": "torch-vectorised", "world_sizes": [1, 2], "threads": None, "global_batch_size": None,
        "per_rank_batch_size": None, "steps": 10, "warmup": 2, "config": "paper", "routing_algorithm": "dynamic",
        "dtype": "float32", "seed": 0,
        "timeout_s": scaling.DEFAULT_TIMEOUT_S, "out": None}
    assert command.parse_args(["--per-rank-batch-size", "4"]).per_rank_batch_size == 4
    for argv in (["--per-rank-batch-size", "0"], ["--world-sizes", "0"],
                 ["--global-batch-size", "8", "--per-rank-batch-size", "4"]):  # one of the two only
        with pytest.raises(SystemExit):
            command.parse_args(argv)
    capsys.readouterr()
    for action in command._actions:
        assert isinstance(action.help, str) and "None" not in action.help, action.dest
    text = " ".join(command.format_help().split())
    assert "--world-sizes W [W ...]" in text and "(default: 1 2)" in text and command.prog.endswith("scaling")
    worker = scaling._worker_parser()
    assert worker.prog.endswith("scaling worker")
    cuda = types.SimpleNamespace(name="torch-vectorised-cuda", device="cuda", describe=lambda: {"device": "cuda"})
    record = scaling.scaling_record(cuda, command.parse_args([]), True, [])
    assert (record["backend"], record["device"]) == ("nccl", "cuda")
    assert record["allreduce_measure"].endswith("slowest rank, floored at 0; none for one rank")
    assert record["efficiency"].endswith("(CPU: ranks x threads per rank; GPU: ranks)")
    monkeypatch.setattr(sys, "argv", ["harness.scaling", "worker", "--steps", "2"])
    forwarded = []
    monkeypatch.setattr(scaling, "worker_main", lambda argv: forwarded.append(argv) or 0)
    assert scaling.main() == 0 and forwarded == [["--steps", "2"]]  # the command line, less the program
