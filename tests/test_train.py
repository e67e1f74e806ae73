"""Training from the command line: the loss goes down on real MNIST, results are written and read back,
the NumPy and torch implementations learn the same way, and failures end with one clear line."""

import json
import math

import numpy as np

from harness import registry, train
from harness.results import read_training_result
from implementations.torch_capsnet import TorchCapsNet

SHORT_RUN = ["--config", "small", "--limit", "384", "--test-limit", "200", "--batch-size", "32"]


def run_train(tmp_path, mnist_path, *args, name="run.json"):
    out = tmp_path / name
    code = train.main(["--data-dir", str(mnist_path), "--out", str(out), *args])
    return code, out


def test_short_run_lowers_the_loss_and_writes_a_complete_file(tmp_path, mnist_path):
    code, out = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", "--epochs", "2", *SHORT_RUN)
    assert code == 0
    record = read_training_result(out)
    assert record["status"] == "completed"
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


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_file(tmp_path, mnist_path, monkeypatch, capsys):
    monkeypatch.setitem(registry._REGISTRY.entries, "diverging",
                        registry.ImplementationInfo("diverging", Diverging, "cpu", "vectorised"))
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
    code, out = run_train(tmp_path, mnist_path, "--impl", "torch-vectorised", *SHORT_RUN)
    assert code == 130
    record = read_training_result(out)
    assert record["status"] == "interrupted" and record["implementation"] == "torch-vectorised"
    assert not list(tmp_path.glob(".run.json.*"))  # no temporary file left behind
