"""python -m harness.figures: draw what a trained network's capsules learned, from a training checkpoint.

From a checkpoint of any implementation (``<results>.checkpoint.npz``, or the results file beside it; the
canonical layout makes them all alike), computed through a registered implementation (the NumPy one by
default) on the MNIST test set, written into ``--out`` (default ``runs/figures/``, git-ignored):

* ``reconstructions.png``: the paper's Figure 3: for a seeded choice of test images (``--per-class`` of
  each class) and a seeded choice of misclassified ones, the input beside its reconstruction from the
  predicted class's capsule (the inference mask), true -> predicted label above, mistakes in red;
* ``perturbations.png``: the paper's Figure 4: for one test image per class (the first correctly classified
  one of its seeded choice, else the first), each dimension of the predicted capsule set to its value plus each step of
  :func:`perturbation_grid` (-0.25 to 0.25 by 0.05, the paper's range) and decoded; one row a dimension;
* ``confusion.png``: the confusion matrix of the test images used;
* ``figures.md``: accuracy, the per-class table (accuracy, most frequent confusion) and the three images;
* ``figures.json``: what was drawn, for tests and readers: image indices, labels, predictions, the
  perturbation grid, the predicted capsules, the confusion matrix, where the checkpoint came from.

The network is the checkpoint's, routing algorithm included (the checkpoint records it, else its run's
results file, else the parameters tell: only self-attention's network has ``digit.bias``); the implementation
must compute that algorithm.  Every file is written atomically (:mod:`harness.results`).  A missing, corrupt
or other-network checkpoint (another ``--config`` or ``--routing-algorithm`` than the one it holds), missing
data, or an implementation that is unavailable or does not compute the checkpoint's routing algorithm is one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness import cli, contract, options, registry, routing_algorithms
from harness.data import load_mnist
from harness.decoder import mask_to_classes
from harness.errors import UserError
from harness.params import validate_parameters
from harness.reporting import plots
from harness.reporting.sections import per_class_section, save_figure
from harness.results import (
    FIGURES_FILES,
    FIGURES_JSON,
    FIGURES_KIND,
    FIGURES_MD,
    ResultsFileError,
    read_training_result,
    unwritable_line,
    writable_folder,
    write_json_atomic,
    write_text_atomic,
)
from harness.settings import FIGURES_SUBDIR, RUNS_DIR
from harness.spec import CONFIGS, DEFAULT_ROUTING_ALGORITHM, CapsNetConfig
from harness.training.checkpoint import ROUTING_ALGORITHM_KEY, checkpoint_path
from harness.training.loop import recorded_routing_algorithm
from harness.training.progress import Progress

FORMAT_VERSION = 1
DEFAULT_IMPLEMENTATION = "numpy-vectorised"
# The paper's Figure 4: each dimension of the capsule tweaked by -0.25 to 0.25 in steps of 0.05.
PERTURBATION_LIMIT = 0.25
PERTURBATION_STEP = 0.05
MISCLASSIFIED_SHOWN = 10  # at most this many mistakes in a row of their own in reconstructions.png
PANELS_PER_ROW = 5  # perturbation panels (one per class) side by side


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable, or of another network than the one asked for."""


def perturbation_grid() -> np.ndarray:
    """The values added to one capsule dimension: -0.25, -0.2, ..., 0.25 (11 values, 0 in the middle)."""
    steps = round(PERTURBATION_LIMIT / PERTURBATION_STEP)
    return np.round(np.arange(-steps, steps + 1) * PERTURBATION_STEP, 10)


# Checkpoints --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """Parameters saved by a training run, the network they belong to, and the run's record if it is there."""

    path: Path
    epoch: int
    params: dict[str, np.ndarray]
    config_name: str
    config: CapsNetConfig
    results_path: Path | None
    record: dict | None


def checkpoint_and_results(path: Path) -> tuple[Path, Path]:
    """(checkpoint, results file) from either: training writes ``X.checkpoint.npz`` beside ``X.json``."""
    if path.suffix == ".json":
        return checkpoint_path(path), path
    name = path.name.removesuffix(".checkpoint.npz") if path.name.endswith(".checkpoint.npz") else path.stem
    return path, path.with_name(f"{name}.json")


def fitting_networks(params: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """The (named network, routing algorithm) pairs whose canonical layout these parameters have: the
    built-in algorithms first, then a plugin's, each over :data:`harness.spec.CONFIGS`."""
    fits = []
    for algorithm in routing_algorithms.names():
        for name, config in CONFIGS.items():
            try:
                validate_parameters(params, config.replace(routing_algorithm=algorithm))
            except ValueError:
                continue
            fits.append((name, algorithm))
    return fits


def network_text(config_name: str, algorithm: str) -> str:
    """"the small network" or, for a routing algorithm other than dynamic, "the small network with
    self-attention routing"."""
    return f"the {config_name} network" + ("" if algorithm == DEFAULT_ROUTING_ALGORITHM else
                                           f" with {algorithm} routing")


def load_checkpoint(path: Path, config_name: str | None = None, routing_algorithm: str | None = None) -> Checkpoint:
    """The checkpoint at ``path`` (or beside the results file ``path``), checked against the network
    ``config_name`` (default: the one its run's results file names, else the one its shapes fit) routing with
    ``routing_algorithm`` (default: the one the checkpoint records, else its results file, else the one its
    parameters fit).  CheckpointError, one line, for a missing or unreadable checkpoint, a checkpoint and
    results file of two routing algorithms, a ``routing_algorithm`` other than the one recorded, and
    parameters that do not fit the network chosen (naming the one they fit)."""
    checkpoint, results = checkpoint_and_results(Path(path))
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint (a training run saves <results>.checkpoint.npz "
                              "beside its results file after each epoch)")
    try:
        with np.load(checkpoint, allow_pickle=False) as saved:
            epoch = int(saved["epoch"])
            params = {key.split("/", 1)[1]: np.array(saved[key]) for key in saved.files if key.startswith("param/")}
            saved_algorithm = str(saved[ROUTING_ALGORITHM_KEY]) if ROUTING_ALGORITHM_KEY in saved.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{checkpoint}: not a readable capsbench checkpoint ({type(error).__name__}: "
                              f"{error}); use the .checkpoint.npz a training run saved") from None
    record = None
    if results.is_file():
        try:
            record = read_training_result(results)
        except ResultsFileError:
            record = None  # the checkpoint stands on its own; the run's facts are a nicety
    recorded = recorded_routing_algorithm(record) if record else None
    if saved_algorithm and recorded and saved_algorithm != recorded:
        raise CheckpointError(f"{checkpoint} holds a network that routes with {saved_algorithm}, but {results} "
                              f"records the routing algorithm {recorded}: they are not of one run")
    known = saved_algorithm or recorded
    if routing_algorithm and known and routing_algorithm != known:
        raise CheckpointError(f"{checkpoint}: a checkpoint of a network that routes with {known}; "
                              f"--routing-algorithm {routing_algorithm} differs: drop it")
    fits = fitting_networks(params)
    algorithm = routing_algorithm or known or (fits[0][1] if fits else DEFAULT_ROUTING_ALGORITHM)
    same_algorithm = [name for name, fit in fits if fit == algorithm]
    chosen = config_name or (record or {}).get("config_name") or (same_algorithm or [None])[0]
    if chosen not in CONFIGS:
        raise CheckpointError(f"{checkpoint}: its parameters fit none of the known networks "
                              f"({', '.join(CONFIGS)}) under the routing algorithm {algorithm}: not a capsbench "
                              "checkpoint of this version")
    config = CONFIGS[chosen].replace(routing_algorithm=algorithm)
    try:
        validate_parameters(params, config)
    except ValueError as error:
        hint = ""
        if fits:
            name, fit = (same_algorithm[0], algorithm) if same_algorithm else fits[0]
            passes = f"--config {name}" + ("" if fit == algorithm else f" --routing-algorithm {fit}")
            hint = f"; it is a checkpoint of {network_text(name, fit)}: pass {passes}"
        raise CheckpointError(f"{checkpoint}: not a checkpoint of {network_text(chosen, algorithm)} "
                              f"({error}){hint}") from None
    return Checkpoint(checkpoint, epoch, params, chosen, config, results if record else None, record)


def implementation_for(name: str, config: CapsNetConfig) -> registry.ImplementationInfo:
    """The registry entry ``name``, where it computes ``config``'s routing algorithm (the checkpoint's); else
    UnsupportedRoutingAlgorithmError, one line with the registry's reason and the implementations that do."""
    info = registry.get(name)
    status = info.computes(config)
    if not status:
        others = [entry.name for entry in registry.entries() if entry.computes(config) and entry.availability()]
        choose = f"; choose --impl {' or '.join(others[:3])}" if others else ""
        raise contract.UnsupportedRoutingAlgorithmError(
            f"implementation {info.name!r} {status.reason}, the routing of the checkpoint's network{choose}")
    return info


# What is drawn ------------------------------------------------------------------------------------------


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """Counts (classes, classes): row the true class, column the predicted one."""
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
    return counts


def predict(impl: contract.Implementation, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The predicted class of every image: the longest class capsule of an inference forward pass (as
    training's evaluation decides), with progress (the longest part: a minute on all 10,000 test images)."""
    chunks = []
    progress = Progress(math.ceil(len(images) / batch_size), "classifying the test images")
    for start in range(0, len(images), batch_size):
        lengths, _ = impl.forward(impl.to_device(images[start : start + batch_size]), train=False)
        chunks.append(impl.to_numpy(lengths).argmax(axis=1))
        progress.update()
    progress.close()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def class_capsules(impl: contract.Implementation, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class capsules v (B, J, D), the forward pass's inference reconstructions (B, pixels)) as NumPy."""
    batch = impl.to_device(images)
    v = impl.to_numpy(impl.routing_forward(impl.prediction_vectors(batch)))
    _, reconstructions = impl.forward(batch, train=False)
    return v, impl.to_numpy(reconstructions)


def choose_images(labels: np.ndarray, predictions: np.ndarray, per_class: int, seed: int,
                  classes: int) -> tuple[list[list[int]], list[int]]:
    """A seeded choice of test images: ``per_class`` of each class (fewer where the images used have fewer;
    sorted), and up to :data:`MISCLASSIFIED_SHOWN` misclassified ones (sorted)."""
    rng = np.random.default_rng(seed)
    by_class = []
    for label in range(classes):
        candidates = np.flatnonzero(labels == label)
        picked = rng.choice(candidates, size=min(per_class, len(candidates)), replace=False)
        by_class.append(sorted(int(index) for index in picked))
    wrong = np.flatnonzero(labels != predictions)
    mistakes = rng.choice(wrong, size=min(MISCLASSIFIED_SHOWN, len(wrong)), replace=False)
    return by_class, sorted(int(index) for index in mistakes)


def perturbed_capsules(capsule: np.ndarray, predicted: int, grid: np.ndarray) -> np.ndarray:
    """(D * len(grid), J, D) masked capsules: row d * len(grid) + g is ``capsule`` masked to ``predicted``
    with dimension d of the predicted capsule plus grid[g]."""
    classes, dim = capsule.shape
    masked = mask_to_classes(capsule[None], np.array([predicted]))[0]
    tweaked = np.repeat(masked[None], dim * len(grid), axis=0)
    for d in range(dim):
        tweaked[d * len(grid) : (d + 1) * len(grid), predicted, d] += grid
    return tweaked


def compute(impl: contract.Implementation, images: np.ndarray, labels: np.ndarray, *, per_class: int, seed: int,
            batch_size: int) -> dict:
    """Everything the figures show, as NumPy arrays and plain numbers (see :func:`figures_record`)."""
    config = impl.config
    predictions = predict(impl, images, batch_size)
    by_class, mistakes = choose_images(labels, predictions, per_class, seed, config.num_classes)
    shown = sorted({index for indices in by_class for index in indices} | set(mistakes))
    capsules, reconstructions = {}, {}
    chosen_classes = [indices for indices in by_class if indices]
    progress = Progress(math.ceil(len(shown) / batch_size) + len(chosen_classes),
                        "capsules and perturbations of the images shown")
    for start in range(0, len(shown), batch_size):
        chunk = shown[start : start + batch_size]
        v, recon = class_capsules(impl, images[chunk])
        capsules.update(zip(chunk, v))
        reconstructions.update(zip(chunk, recon))
        progress.update()
    grid = perturbation_grid()
    perturbations = []
    for indices in chosen_classes:
        correct = [index for index in indices if predictions[index] == labels[index]]
        index = (correct or indices)[0]  # a correctly classified one where the choice has one
        predicted = int(predictions[index])
        decoded = impl.decode(perturbed_capsules(capsules[index], predicted, grid))
        tiles = decoded.reshape(config.digit_caps_dim, len(grid), config.image_size, config.image_size)
        zero = tiles[:, int(np.flatnonzero(grid == 0)[0])]
        difference = float(np.abs(zero - reconstructions[index].reshape(config.image_size, config.image_size)).max())
        perturbations.append({"index": index, "tiles": tiles, "zero_perturbation_max_difference": difference})
        progress.update()
    progress.close()
    return {"predictions": predictions, "by_class": by_class, "mistakes": mistakes, "capsules": capsules,
            "reconstructions": reconstructions, "grid": grid, "perturbations": perturbations,
            "confusion": confusion_matrix(labels, predictions, config.num_classes)}


# Drawing ------------------------------------------------------------------------------------------------


def image_of(pixels: np.ndarray, config: CapsNetConfig) -> np.ndarray:
    return np.asarray(pixels).reshape(config.image_channels, config.image_size, config.image_size)[0]


def draw_reconstructions(images: np.ndarray, labels: np.ndarray, drawn: dict, config: CapsNetConfig):
    """One column per class, one row per seeded choice, a last row of mistakes: input | reconstruction."""
    rows = [[indices[r] if r < len(indices) else None for indices in drawn["by_class"]]
            for r in range(max(map(len, drawn["by_class"]), default=0))]
    if drawn["mistakes"]:
        rows.append(drawn["mistakes"] + [None] * (config.num_classes - len(drawn["mistakes"])))
    columns = max(config.num_classes, len(drawn["mistakes"]))
    figure, axes = plots.plt.subplots(len(rows), columns, figsize=(1.55 * columns, 1.05 * len(rows) + 0.9),
                                      squeeze=False)
    gap = np.ones((config.image_size, 2))
    for row, indices in zip(axes, rows):
        for ax, index in zip(row, indices):
            ax.set_xticks([])
            ax.set_yticks([])
            if index is None:
                ax.axis("off")
                continue
            pair = np.hstack([image_of(images[index], config), gap,
                              image_of(drawn["reconstructions"][index], config)])
            ax.imshow(pair, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            predicted = int(drawn["predictions"][index])
            wrong = predicted != labels[index]
            colour = "tab:red" if wrong else "black"
            ax.set_title(f"{labels[index]} → {predicted}" + (" ✗" if wrong else ""), fontsize=9, color=colour)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2 if wrong else 0.5)
    figure.suptitle("Test images (left) and their reconstructions from the predicted class's capsule (right); "
                    "true → predicted label" + ("; the last row: misclassified images, in red"
                                                 if drawn["mistakes"] else ""), fontsize=10)
    figure.tight_layout()
    return figure


def draw_perturbations(labels: np.ndarray, drawn: dict, config: CapsNetConfig):
    """One panel per class: row d is dimension d + 1 of the predicted capsule, column g adds grid[g]."""
    grid, panels = drawn["grid"], drawn["perturbations"]
    size, dim = config.image_size, config.digit_caps_dim
    columns = min(PANELS_PER_ROW, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plots.plt.subplots(rows, columns, figsize=(3.4 * columns, 0.3 * dim * rows + 1.2),
                                      squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("capsule dimension", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("added to the dimension", fontsize=7)
    for ax, panel in zip(axes.flat, panels):
        tiles = panel["tiles"]  # (D, G, H, W)
        mosaic = tiles.transpose(0, 2, 1, 3).reshape(dim * size, len(grid) * size)
        ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks((np.arange(len(grid)) + 0.5) * size, [f"{value:+.2f}" for value in grid], fontsize=5,
                      rotation=90)
        ax.set_yticks((np.arange(dim) + 0.5) * size, [str(d + 1) for d in range(dim)], fontsize=5)
        index = panel["index"]
        predicted = int(drawn["predictions"][index])
        ax.set_title(f"test image {index}: digit {labels[index]}" + (f" (predicted {predicted})"
                                                              if predicted != labels[index] else ""), fontsize=8)
    figure.suptitle(f"Each row: one of the {dim} dimensions of the predicted capsule plus "
                    f"{grid[0]:+.2f} … {grid[-1]:+.2f} in steps of {PERTURBATION_STEP} (columns), decoded",
                    fontsize=10)
    figure.tight_layout()
    return figure


def draw_confusion(confusion: np.ndarray):
    """Counts, coloured by the share of the true class's images (a power scale, so that rare errors show)."""
    from matplotlib.colors import PowerNorm

    totals = confusion.sum(axis=1, keepdims=True)
    shares = confusion / np.where(totals > 0, totals, 1)
    classes = len(confusion)
    figure, ax = plots.plt.subplots(figsize=(6.4, 5.6))
    shown = ax.imshow(shares, cmap="Blues", norm=PowerNorm(0.3, vmin=0, vmax=1))
    for (true_class, predicted), count in np.ndenumerate(confusion):
        if count:
            ax.text(predicted, true_class, str(count), ha="center", va="center", fontsize=7,
                    color="white" if shares[true_class, predicted] > 0.5 else "black")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(confusion.sum())
    accuracy = np.trace(confusion) / total if total else math.nan
    ax.set_title(f"Confusion on {total:,} test images (accuracy {accuracy:.2%})", fontsize=10)
    figure.colorbar(shown, ax=ax, label="share of the true class's images")
    figure.tight_layout()
    return figure


# Output -------------------------------------------------------------------------------------------------


def figures_record(checkpoint: Checkpoint, info: registry.ImplementationInfo, args: argparse.Namespace,
                   labels: np.ndarray, drawn: dict) -> dict:
    """The machine-readable account of what was drawn (``figures.json``)."""
    confusion = drawn["confusion"]
    predictions = drawn["predictions"]
    record = checkpoint.record or {}

    def shown(index: int, chosen: str) -> dict:
        return {"index": index, "label": int(labels[index]), "predicted": int(predictions[index]),
                "correct": bool(labels[index] == predictions[index]), "chosen": chosen}

    return {
        "kind": FIGURES_KIND,
        "format_version": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint.path),
        "checkpoint_epoch": checkpoint.epoch,
        "training_run": None if checkpoint.results_path is None else {
            "results": str(checkpoint.results_path),
            **{key: record.get(key) for key in ("implementation", "dtype", "train_images", "test_images",
                                                "final_test_accuracy", "best_test_accuracy")}},
        "implementation": info.name,
        **info.describe(),
        "dtype": args.dtype,
        "config_name": checkpoint.config_name,
        "routing_algorithm": checkpoint.config.routing_algorithm,
        "config": checkpoint.config.as_dict(),
        "test_images": len(labels),
        "test_limit": args.test_limit,
        "seed": args.seed,
        "per_class": args.per_class,
        "correct": int(np.trace(confusion)),
        "accuracy": float(np.trace(confusion) / len(labels)),
        "confusion": confusion.tolist(),
        "reconstructions": [shown(index, "per_class") for indices in drawn["by_class"] for index in indices]
                           + [shown(index, "misclassified") for index in drawn["mistakes"]],
        "perturbation_grid": drawn["grid"].tolist(),
        "perturbations": [{**shown(panel["index"], "one_of_class"),
                           "capsule": drawn["capsules"][panel["index"]][predictions[panel["index"]]].tolist(),
                           "zero_perturbation_max_difference": panel["zero_perturbation_max_difference"]}
                          for panel in drawn["perturbations"]],
        "files": dict(FIGURES_FILES),
    }


def figures_markdown(record: dict) -> str:
    """figures.md: where the figures come from, the per-class table and the images."""
    return "\n".join(["# What the capsules learned", "", per_class_section(record, Path(".")), ""])


def write_figures(out: Path, images: np.ndarray, labels: np.ndarray, drawn: dict, record: dict,
                  config: CapsNetConfig) -> list[Path]:
    written = [save_figure(draw_reconstructions(images, labels, drawn, config), out / FIGURES_FILES["reconstructions"]),
               save_figure(draw_perturbations(labels, drawn, config), out / FIGURES_FILES["perturbations"]),
               save_figure(draw_confusion(drawn["confusion"]), out / FIGURES_FILES["confusion"])]
    written.append(write_json_atomic(out / FIGURES_JSON, record))
    written.append(write_text_atomic(out / FIGURES_MD, figures_markdown(record)))
    return written


# Command line -------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=cli.prog("figures"), description=cli.description(__doc__))
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="FILE",
                        help="a training run's <results>.checkpoint.npz, or its results file <results>.json "
                             "(no default: required)")
    options.add_data_dir(parser, help="folder with the four MNIST IDX files")
    options.add_out(parser, default=RUNS_DIR / FIGURES_SUBDIR,
                    help=f"output folder (default: runs/{FIGURES_SUBDIR}, not tracked by git)")
    options.add_impl(parser, several=False, default=DEFAULT_IMPLEMENTATION,
                     help="implementation that computes the figures")
    parser.add_argument("--config", choices=sorted(CONFIGS),
                        help="network of the checkpoint (default: the one its results file names, else the one "
                             "its shapes fit)")
    parser.add_argument("--routing-algorithm", type=options.routing_algorithm, metavar="NAME",
                        help="routing algorithm of the checkpoint's network; one the checkpoint does not hold is "
                             "refused (default: the one the checkpoint or its results file records, else the one "
                             "its parameters fit)")
    options.add_dtype(parser, help="floating-point type the figures are computed in")
    parser.add_argument("--test-limit", type=options.positive_int,
                        help="use the first N test images only (default: all 10,000)")
    parser.add_argument("--per-class", type=options.positive_int, default=2,
                        help="reconstructions shown per class (default: %(default)s)")
    options.add_seed(parser, help="seed of the choice of images")
    options.add_batch_size(parser, default=100, help="images per forward pass")
    return parser


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        writable_folder(args.out)
    except OSError as error:
        raise UserError(unwritable_line(args.out, error, "the figures")) from None
    checkpoint = load_checkpoint(args.checkpoint, args.config, args.routing_algorithm)
    info = implementation_for(args.impl, checkpoint.config)
    params = {name: value.astype(args.dtype) for name, value in checkpoint.params.items()}
    impl = info.create(checkpoint.config, params, args.dtype)
    test_set = load_mnist(args.data_dir, "test").head(args.test_limit)
    routing = checkpoint.config.routing_algorithm
    print(f"figures of {checkpoint.path} (epoch {checkpoint.epoch}, {checkpoint.config_name} network"
          f"{'' if routing == DEFAULT_ROUTING_ALGORITHM else f', {routing} routing'}) through "
          f"{info.name} on {len(test_set):,} test images -> {args.out}", flush=True)
    drawn = compute(impl, test_set.images, test_set.labels, per_class=args.per_class, seed=args.seed,
                    batch_size=args.batch_size)
    record = figures_record(checkpoint, info, args, test_set.labels, drawn)
    print(f"drawing the figures into {args.out} ...", file=sys.stderr, flush=True)
    write_figures(args.out, test_set.images, test_set.labels, drawn, record, checkpoint.config)
    print(f"figures written to {args.out} (test accuracy {record['accuracy']:.2%} on {len(test_set):,} images; "
          f"{FIGURES_MD} has the per-class table)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
