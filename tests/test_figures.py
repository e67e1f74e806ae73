"""python -m harness.figures on a checkpoint of a real (smoke-sized) training run: the perturbation grid is
the paper's, the decoded images at zero perturbation are the forward pass's reconstructions, the confusion
matrix counts the test images used and its diagonal is the accuracy training reported, every figure is a
real PNG, the report shows them, and a checkpoint of another network or a corrupt one is one clear line."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from matplotlib import image

from harness import figures, registry, report, train
from harness.data import load_mnist
from harness.params import init_parameters
from harness.results import FIGURES_FILES, FIGURES_JSON, FIGURES_MD, read_figures_result, read_training_result
from harness.spec import PAPER, SMALL
from harness.training import loop
from harness.training.checkpoint import save_checkpoint

TEST_IMAGES = 200


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_path):
    """A two-step numpy-vectorised training run of the small network, evaluated on the first test images."""
    out = tmp_path_factory.mktemp("train") / "run.json"
    code = train.main(["--impl", "numpy-vectorised", "--config", "small", "--limit", "64", "--batch-size", "32",
                       "--test-limit", str(TEST_IMAGES), "--data-dir", str(mnist_path), "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def drawn(trained_run, tmp_path_factory, mnist_path):
    """The figures of that run's checkpoint on the same test images: (output folder, figures.json)."""
    out = tmp_path_factory.mktemp("figures")
    code = figures.main(["--checkpoint", str(loop.checkpoint_path(trained_run)), "--data-dir", str(mnist_path),
                         "--test-limit", str(TEST_IMAGES), "--out", str(out)])
    assert code == 0
    return out, json.loads((out / FIGURES_JSON).read_text())


def test_the_perturbation_grid_is_the_papers():
    grid = figures.perturbation_grid()
    assert grid.tolist() == [-0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25]


def test_a_perturbed_capsule_changes_one_dimension_of_the_predicted_class_only():
    capsule = np.arange(12.0).reshape(3, 4)  # 3 classes of 4 dimensions
    grid = np.array([-0.5, 0.0, 0.5])
    tweaked = figures.perturbed_capsules(capsule, 1, grid)
    assert tweaked.shape == (4 * 3, 3, 4)
    for d in range(4):
        for g, delta in enumerate(grid):
            expected = np.zeros((3, 4))
            expected[1] = capsule[1]
            expected[1, d] += delta
            np.testing.assert_array_equal(tweaked[d * 3 + g], expected)


def test_the_confusion_matrix_counts_labels_in_rows_and_predictions_in_columns():
    confusion = figures.confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 0, 0]), 3)
    np.testing.assert_array_equal(confusion, [[1, 1, 0], [0, 1, 0], [2, 0, 0]])


def test_the_confusion_diagonal_is_the_accuracy_training_reported(drawn, trained_run, mnist_path):
    _, record = drawn
    confusion = np.array(record["confusion"])
    labels = load_mnist(mnist_path, "test").labels[:TEST_IMAGES]
    assert confusion.sum() == record["test_images"] == TEST_IMAGES
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(labels, minlength=SMALL.num_classes))
    reported = read_training_result(trained_run)["final_test_accuracy"]
    assert np.trace(confusion) / confusion.sum() == reported == record["accuracy"]


def test_at_zero_perturbation_the_decoded_images_are_the_forward_reconstructions(trained_run, mnist_path):
    checkpoint = figures.load_checkpoint(trained_run)
    impl = registry.create("numpy-vectorised", checkpoint.config, checkpoint.params, "float64")
    test = load_mnist(mnist_path, "test").head(40)
    result = figures.compute(impl, test.images, test.labels, per_class=1, seed=3, batch_size=16)
    middle = list(result["grid"]).index(0.0)
    assert len(result["perturbations"]) == len({int(label) for label in test.labels})
    for panel in result["perturbations"]:
        forward = result["reconstructions"][panel["index"]].reshape(28, 28)
        tiles = panel["tiles"]
        assert tiles.shape == (SMALL.digit_caps_dim, 11, 28, 28)
        for d in range(SMALL.digit_caps_dim):
            np.testing.assert_allclose(tiles[d, middle], forward, rtol=1e-12, atol=1e-14)
        assert np.abs(tiles[:, 0] - tiles[:, -1]).max() > 1e-6  # the ends of the grid decode other images
        assert panel["zero_perturbation_max_difference"] < 1e-12


def test_what_was_drawn_is_recorded(drawn, mnist_path):
    out, record = drawn
    labels = load_mnist(mnist_path, "test").labels[:TEST_IMAGES]
    per_class = [entry for entry in record["reconstructions"] if entry["chosen"] == "per_class"]
    assert sorted(entry["label"] for entry in per_class) == sorted(list(range(SMALL.num_classes)) * 2)
    for entry in record["reconstructions"] + record["perturbations"]:
        assert entry["label"] == labels[entry["index"]]
        assert entry["correct"] == (entry["predicted"] == entry["label"])
    mistakes = [entry for entry in record["reconstructions"] if entry["chosen"] == "misclassified"]
    assert 0 < len(mistakes) <= figures.MISCLASSIFIED_SHOWN and not any(entry["correct"] for entry in mistakes)
    assert record["perturbation_grid"] == figures.perturbation_grid().tolist()
    assert [entry["label"] for entry in record["perturbations"]] == list(range(SMALL.num_classes))
    for entry in record["perturbations"]:  # one of its class's choice, a correctly classified one where there is one
        choice = [other for other in per_class if other["label"] == entry["label"]]
        assert entry["index"] in [other["index"] for other in choice]
        assert entry["correct"] == any(other["correct"] for other in choice)
    assert all(len(entry["capsule"]) == SMALL.digit_caps_dim for entry in record["perturbations"])
    assert all(entry["zero_perturbation_max_difference"] < 1e-5 for entry in record["perturbations"])
    for name in FIGURES_FILES.values():
        picture = image.imread(out / name)
        assert picture.ndim == 3 and min(picture.shape[:2]) > 200 and picture.std() > 0.01, name
    assert read_figures_result(out / FIGURES_JSON)["confusion"] == record["confusion"]
    assert "| class | test images | correct | accuracy | most frequent confusion |" in (out / FIGURES_MD).read_text()


def test_the_report_shows_the_figures_in_a_section_of_their_own(drawn, tmp_path, capsys):
    out, record = drawn
    root = tmp_path / "results"
    shutil.copytree(out, root / "figures")
    assert report.main(["--results", str(root)]) == 0
    text = (root / "report" / "report.md").read_text()
    section = text.split("## What the capsules learned", 1)[1].split("\n## ", 1)[0]
    assert f"accuracy {record['accuracy']:.2%}" in section
    for name in FIGURES_FILES.values():
        assert re.search(rf"!\[[^\]]*\]\(\.\./figures/{re.escape(name)}\)", section), name  # shown, not only linked
        assert (root / "report" / "../figures" / name).is_file()
    assert section.count("\n| ") == SMALL.num_classes + 2  # heading, rule and one row per class


def test_a_malformed_figures_file_is_a_warning_and_no_section(tmp_path, capsys):
    root = tmp_path / "results"
    (root / "training").mkdir(parents=True)
    (root / "figures").mkdir()
    (root / "figures" / FIGURES_JSON).write_text(json.dumps({"kind": "capsbench-figures", "confusion": [[1, 2]]}))
    assert report.main(["--results", str(root)]) == 1  # nothing else to report
    assert "figures.json: 'confusion' must be a square matrix of counts; file skipped" in capsys.readouterr().err


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_a_checkpoint_of_another_network_is_one_clear_line(tmp_path, mnist_path, capsys):
    results = tmp_path / "small.json"
    impl = registry.create("numpy-vectorised", SMALL, init_parameters(SMALL))
    path = save_checkpoint(results, impl, 1)
    assert figures.main(["--checkpoint", str(path), "--config", "paper", "--data-dir", str(mnist_path)]) == 2
    err = one_error_line(capsys)
    assert "not a checkpoint of the paper network" in err and "pass --config small" in err
    assert figures.load_checkpoint(path).config == SMALL  # without --config: the network its shapes fit
    assert PAPER != SMALL


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_a_corrupt_or_missing_checkpoint_is_one_clear_line(tmp_path, mnist_path, capsys, damage):
    impl = registry.create("numpy-vectorised", SMALL, init_parameters(SMALL))
    path = save_checkpoint(tmp_path / "run.json", impl, 1)
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    assert figures.main(["--checkpoint", str(path), "--data-dir", str(mnist_path)]) == 2
    err = one_error_line(capsys)
    assert ("no such checkpoint" if damage == "missing" else "not a readable capsbench checkpoint") in err


def test_a_long_run_in_a_pipe_says_how_far_it_is(trained_run, tmp_path, mnist_path, capsys):
    """`capsbench figures` printed nothing for 84 s in a pipe: plain progress lines, as training's."""
    code = figures.main(["--checkpoint", str(trained_run), "--data-dir", str(mnist_path), "--test-limit", "60",
                         "--batch-size", "20", "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "classifying the test images: 3/3 steps, " in err
    assert re.search(r"capsules and perturbations of the images shown: (\d+)/\1 steps", err)
    assert f"drawing the figures into {tmp_path} ..." in err


# A self-attention checkpoint ---------------------------------------------------------------------------------

ATTENTION = SMALL.replace(routing_algorithm="self-attention")


def attention_checkpoint(results):
    """A checkpoint of the small self-attention network whose digit.bias is far from zero (so that a network
    built without it, or with dynamic routing, classifies otherwise), beside the results file ``results``."""
    params = init_parameters(ATTENTION, dtype=np.float64)
    params["digit.bias"] = np.random.default_rng(5).normal(0.0, 3.0, params["digit.bias"].shape)
    return save_checkpoint(results, registry.create("torch-vectorised", ATTENTION, params, "float64"), 1), params


def test_a_self_attention_checkpoint_is_drawn_through_its_own_network(tmp_path, mnist_path, capsys):
    path, params = attention_checkpoint(tmp_path / "attention.json")
    out = tmp_path / "figures"
    assert figures.main(["--checkpoint", str(path), "--impl", "torch-vectorised", "--dtype", "float64",
                         "--data-dir", str(mnist_path), "--test-limit", "30", "--per-class", "1",
                         "--out", str(out)]) == 0
    assert "(epoch 1, small network, self-attention routing)" in capsys.readouterr().out
    record = json.loads((out / FIGURES_JSON).read_text())
    assert record["routing_algorithm"] == record["config"]["routing_algorithm"] == "self-attention"
    test = load_mnist(mnist_path, "test").head(30)
    network = registry.create("torch-vectorised", ATTENTION, params, "float64")
    lengths, _ = network.forward(network.to_device(test.images), train=False)
    expected = network.to_numpy(lengths).argmax(axis=1)
    shown = record["reconstructions"] + record["perturbations"]
    assert [entry["predicted"] for entry in shown] == [int(expected[entry["index"]]) for entry in shown]


def test_the_routing_algorithm_comes_from_the_checkpoint_its_record_or_its_parameters(tmp_path):
    path, _ = attention_checkpoint(tmp_path / "attention.json")
    assert figures.load_checkpoint(path).config == ATTENTION  # the checkpoint says so
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files if key != "routing_algorithm"}
    np.savez(path, **arrays)  # a checkpoint from before the setting, no results file: digit.bias tells
    assert figures.load_checkpoint(path).config == ATTENTION
    dynamic = save_checkpoint(tmp_path / "dynamic.json", registry.create("torch-vectorised", SMALL,
                                                                        init_parameters(SMALL)), 1)
    assert figures.load_checkpoint(dynamic).config == SMALL


@pytest.mark.parametrize("mismatch", ["option", "record", "implementation"])
def test_a_routing_algorithm_mismatch_is_one_clear_line(tmp_path, mnist_path, capsys, mismatch):
    """--routing-algorithm other than the checkpoint's; a results file of another algorithm beside it; an
    implementation that does not compute the checkpoint's algorithm (one registered here)."""
    from implementations.torch.autograd import TorchCapsNet

    class DynamicOnly(TorchCapsNet):
        def route(self, u_hat):
            return super().route(u_hat)

    results = tmp_path / "attention.json"
    path, _ = attention_checkpoint(results)
    argv = ["--checkpoint", str(path), "--data-dir", str(mnist_path), "--out", str(tmp_path / "figures")]
    with registry.registered("dynamic-only", DynamicOnly) as info:
        if mismatch == "option":
            argv += ["--routing-algorithm", "dynamic", "--impl", "torch-vectorised"]
            expected = f"{path}: a checkpoint of a network that routes with self-attention; --routing-algorithm " \
                       "dynamic differs: drop it"
        elif mismatch == "record":
            train.main(["--impl", "torch-vectorised", "--config", "small", "--limit", "32", "--test-limit", "10",
                        "--batch-size", "32", "--data-dir", str(mnist_path), "--out", str(tmp_path / "run.json")])
            results.write_text((tmp_path / "run.json").read_text())  # a dynamic run's record beside it
            argv += ["--impl", "torch-vectorised"]
            expected = f"{path} holds a network that routes with self-attention, but {results} records the " \
                       "routing algorithm dynamic: they are not of one run"
        else:
            argv += ["--impl", "dynamic-only"]
            expected = f"implementation 'dynamic-only' {info.computes(ATTENTION).reason}, the routing of the " \
                       "checkpoint's network; choose --impl "
        capsys.readouterr()
        assert figures.main(argv) == 2
    assert one_error_line(capsys).startswith(f"error: {expected}")
    assert not (tmp_path / "figures" / FIGURES_JSON).exists()
