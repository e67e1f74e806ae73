"""The gates pinned with known answers: the test accuracy training reports (one process and the data-parallel
shards) for an implementation whose answers are fixed per image, the best / final accuracy, mean loss, epoch
numbers and times of a record whose accuracy is not monotone, before and after a resume, and the training
options reaching what they configure (spied on in the batches, the evaluation and the implementation built)."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest

from harness import epochs, registry, train
from harness.data import load_mnist
from harness.params import init_parameters
from harness.results import read_training_result
from harness.spec import CONFIGS
from implementations.numpy_capsnet import NumpyCapsNet

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
    from harness import distributed

    fake = TwoRankSum()
    monkeypatch.setattr(distributed, "dist", fake)
    impls = [KnownAnswers(CONFIGS["small"], init_parameters(CONFIGS["small"])) for _ in range(2)]
    for impl in impls:
        impl._adam_steps = STEPS_PER_EPOCH  # after epoch 1: right on every third image
    answers = {}

    def rank(number):
        ctx = distributed.Context(number, 2, number, "gloo", "cpu")
        answers[number] = distributed.evaluate_sharded(ctx, impls[number], known_answers.test_set, 8, "eval", None)

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
    assert epochs.load_checkpoint(out)[0] == 3


def test_the_scaling_options_reach_every_world_size_s_ranks(tmp_path, monkeypatch):
    """--world-sizes, --threads, --global-batch-size / --per-rank-batch-size, --steps, --warmup, --config,
    --dtype, --seed, --timeout-s, --impl and --out, read back from the torchrun commands the measurement
    starts (a stand-in for torchrun answers each with a results part)."""
    pytest.importorskip("torch")
    import json
    import subprocess

    from harness import scaling

    launched, real_run = [], subprocess.run

    def torchrun(command, *args, env=None, cwd=None, timeout=None, **kwargs):
        if "torch.distributed.run" not in command:  # machine facts and the like: the real thing
            return real_run(command, *args, env=env, cwd=cwd, timeout=timeout, **kwargs)
        world_size = int(command[command.index("--nproc-per-node") + 1])
        worker = scaling._worker_parser().parse_args(command[command.index("worker") + 1:])
        launched.append((world_size, worker, env["OMP_NUM_THREADS"], timeout))
        run = {"world_size": world_size, "threads_per_rank": worker.threads,
               "per_rank_batch_size": worker.per_rank_batch_size,
               "global_batch_size": worker.per_rank_batch_size * world_size, "steps": worker.steps,
               "step_seconds": 0.1 * world_size, "images_per_second": 100.0, "allreduce_seconds": None,
               "allreduce_share": None}
        worker.out.write_text(json.dumps(run))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(scaling.subprocess, "run", torchrun)
    out = tmp_path / "scaling.json"
    assert scaling.main(["--impl", "torch-looped", "--world-sizes", "1", "2", "4", "--threads", "4",
                         "--global-batch-size", "16", "--steps", "3", "--warmup", "1", "--config", "small",
                         "--dtype", "float64", "--seed", "5", "--timeout-s", "9", "--out", str(out)]) == 0
    assert [(w, a.per_rank_batch_size, a.threads, threads) for w, a, threads, _ in launched] == [
        (1, 16, 4, "4"), (2, 8, 2, "2"), (4, 4, 1, "1")]  # strong scaling over 4 cores
    for _, worker, _, timeout in launched:
        assert (worker.impl, worker.config, worker.dtype, worker.seed) == ("torch-looped", "small", "float64", 5)
        assert (worker.steps, worker.warmup, worker.timeout_s) == (3, 1, 9.0)
        assert timeout == 9.0 + scaling.LAUNCH_GRACE_S * 4
    payload = json.loads(out.read_text())
    assert (payload["implementation"], payload["config_name"], payload["dtype"], payload["scaling"]) == (
        "torch-looped", "small", "float64", "strong")
    assert [run["world_size"] for run in payload["runs"]] == [1, 2, 4]
    launched.clear()
    assert scaling.main(["--world-sizes", "1", "2", "--threads", "2", "--per-rank-batch-size", "4",
                         "--config", "small", "--out", str(out)]) == 0
    assert [(w, a.per_rank_batch_size, a.threads) for w, a, _, _ in launched] == [(1, 4, 2), (2, 4, 1)]
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


# Mutation survivors of harness/epochs.py that change a figure or a gate (tests/mutation.py epochs) -------------

def test_a_resume_drops_the_steps_of_the_epoch_that_was_interrupted():
    record = {"epochs": [{"epoch": 1}, {"epoch": 2}],
              "steps": [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}, {"epoch": 3, "loss": 0.3}]}
    epochs.truncate_to_completed_epochs(record)
    assert record["steps"] == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}]
    assert set(record) == {"epochs", "steps"}


def test_a_diverged_loss_names_the_loss_the_epoch_and_the_step():
    from harness.run_status import TrainingDiverged

    epochs.check_finite(0.25, 1, 7)  # finite: nothing raised
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at epoch 2, step 7$"):
        epochs.check_finite(float("nan"), 2, 7)


def test_a_single_process_run_draws_what_rank_0_of_a_data_parallel_run_draws():
    # the shipped runs' data order: a changed default rank would silently draw another order
    assert epochs.epoch_rng(3, 2).integers(1 << 30, size=4).tolist() == \
        epochs.epoch_rng(3, 2, rank=0).integers(1 << 30, size=4).tolist()
    assert epochs.epoch_rng(3, 2).integers(1 << 30) != epochs.epoch_rng(3, 2, rank=1).integers(1 << 30)
