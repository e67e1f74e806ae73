"""python -m harness.train: train one implementation on MNIST and record how it learns and how fast.

Adam (lr 1e-3, :data:`harness.spec.ADAM`) from the canonical parameters, the paper's random shift of up to
2 pixels (:data:`harness.spec.MAX_SHIFT_PIXELS`) on the training images, test accuracy after every epoch.
The results file (under ``results/training/`` unless ``--out`` says otherwise) is rewritten atomically
after every epoch, so an interrupted, diverged or failed run keeps everything up to its last epoch:
per-step loss and training wall time, per-epoch loss, test accuracy, time and images/s, with the
implementation, config, library versions and machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from pathlib import Path

import numpy as np

from harness import registry
from harness.data import DataError, Dataset, iterate_batches, load_mnist
from harness.environment import machine_facts
from harness.params import init_parameters
from harness.results import TRAINING_DIR, TRAINING_KIND, write_json_atomic
from harness.spec import ADAM, CONFIGS, MAX_SHIFT_PIXELS, get_config
from harness.threads import set_threads

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    tqdm = None


class TrainingDiverged(RuntimeError):
    """The loss stopped being a finite number."""


def evaluate(impl: registry.Implementation, dataset: Dataset, batch_size: int) -> float:
    """Test accuracy: the predicted class is the longest DigitCaps capsule."""
    correct = 0
    for start in range(0, len(dataset), batch_size):
        images, labels = dataset.images[start : start + batch_size], dataset.labels[start : start + batch_size]
        lengths, _ = impl.forward(impl.to_device(images), train=False)
        correct += int(np.sum(impl.to_numpy(lengths).argmax(axis=1) == labels))
    return correct / len(dataset)


def new_record(info: registry.ImplementationInfo, args: argparse.Namespace, config_name: str) -> dict:
    return {
        "kind": TRAINING_KIND,
        "format_version": 1,
        "status": "running",
        "message": "",
        "implementation": info.name,
        "framework": info.framework,
        "device": info.device,
        "routing": info.routing,
        "dtype": args.dtype,
        "config_name": config_name,
        "config": get_config(config_name).as_dict(),
        "optimizer": {"name": "adam", **ADAM.__dict__},
        "batch_size": args.batch_size,
        "epochs_requested": args.epochs,
        "limit": args.limit,
        "test_limit": args.test_limit,
        "seed": args.seed,
        "augment": not args.no_augment,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "epochs": [],
        "steps": [],
    }


def train_epochs(impl, train_set: Dataset, test_set: Dataset, record: dict, epochs: int, batch_size: int,
                 seed: int, augment: bool, save) -> dict:
    """Train for ``epochs``, appending to ``record`` and calling ``save(record)`` after each epoch."""
    rng = np.random.default_rng(seed)
    elapsed = 0.0
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    for epoch in range(1, epochs + 1):
        losses, images_seen, epoch_start = [], 0, time.perf_counter()
        batches = iterate_batches(train_set, batch_size, rng, shuffle=True, augment=augment)
        progress = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", unit="step",
                        leave=True, disable=None) if tqdm else batches
        for step, (images, labels) in enumerate(progress, start=1):
            step_start = time.perf_counter()
            loss = impl.train_step(impl.to_device(images, labels))
            elapsed += time.perf_counter() - step_start
            images_seen += len(labels)
            record["steps"].append({"epoch": epoch, "step": step, "loss": loss, "elapsed_seconds": elapsed})
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss} at epoch {epoch}, step {step}")
            losses.append(loss)
            if tqdm:
                progress.set_postfix(loss=f"{loss:.4f}")
        train_seconds = time.perf_counter() - epoch_start
        eval_start = time.perf_counter()
        accuracy = evaluate(impl, test_set, batch_size)
        summary = epoch_summary(epoch, losses, accuracy, train_seconds, time.perf_counter() - eval_start,
                                images_seen, elapsed)
        record["epochs"].append(summary)
        print_epoch(summary)
        save(record)
    return record


def epoch_summary(epoch: int, losses: list[float], accuracy: float, train_seconds: float, eval_seconds: float,
                  images: int, elapsed: float) -> dict:
    """One entry of a results file's ``epochs``.  ``train_seconds`` is the wall time of the epoch's training
    loop (batch preparation and augmentation included, evaluation not), so ``images_per_second`` is what a
    user gets; ``elapsed_seconds`` adds up the training steps alone, the clock of the loss curves."""
    return {
        "epoch": epoch,
        "mean_loss": float(np.mean(losses)),
        "test_accuracy": accuracy,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "images": images,
        "images_per_second": images / train_seconds,
        "elapsed_seconds": elapsed,
    }


def print_epoch(summary: dict, note: str = "") -> None:
    print(f"epoch {summary['epoch']}: mean loss {summary['mean_loss']:.4f}, test accuracy "
          f"{summary['test_accuracy']:.2%}, {summary['train_seconds']:.1f} s, "
          f"{summary['images_per_second']:.1f} images/s{note}", flush=True)


def default_output(name: str, config_name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return TRAINING_DIR / f"{name}_{config_name}_{stamp}.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.train", description=__doc__.split("\n")[0])
    parser.add_argument("--impl", required=True, metavar="NAME", help="implementation (see python -m harness list)")
    parser.add_argument("--data-dir", help="folder with the four MNIST IDX files (default: $CAPSBENCH_DATA_DIR)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, help="train on the first N training images only")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and augmentation")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    parser.add_argument("--dtype", choices=registry.DTYPES, default="float32")
    parser.add_argument("--no-augment", action="store_true", help=f"no random {MAX_SHIFT_PIXELS}-pixel shifts")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--out", type=Path, help="results file (default: results/training/<impl>_<config>_<time>.json)")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel (DistributedDataParallel) under torchrun: the same as "
                             "`torchrun ... -m harness.distributed train`, whose options it takes (--batch-size is per rank)")
    return parser


def check_at_least_one(args: argparse.Namespace, options) -> str | None:
    """The error line for the first of ``options`` given below 1, or None."""
    for option in options:
        value = getattr(args, option)
        if value is not None and value < 1:
            return f"error: --{option.replace('_', '-')} must be at least 1, got {value}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--distributed" in argv:
        from harness.distributed import train_main

        return train_main([arg for arg in argv if arg != "--distributed"])
    args = _parser().parse_args(argv)
    problem = check_at_least_one(args, ("epochs", "batch_size", "limit", "test_limit", "threads"))
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        info = registry.get(args.impl)
        config = get_config(args.config)
        if args.threads:
            set_threads(args.threads)
        impl = info.create(config, init_parameters(config, dtype=args.dtype), args.dtype)
        train_set = load_mnist(args.data_dir, "train").head(args.limit)
        test_set = load_mnist(args.data_dir, "test").head(args.test_limit)
    except (registry.UnknownImplementationError, registry.UnavailableImplementationError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or default_output(info.name, args.config)
    record = new_record(info, args, args.config)
    write_json_atomic(out, record)
    print(f"training {info.name} ({args.dtype}, {args.config} config) on {len(train_set)} images, "
          f"batch {args.batch_size}, {args.epochs} epoch(s); results -> {out}", flush=True)
    try:
        train_epochs(impl, train_set, test_set, record, args.epochs, args.batch_size, args.seed,
                     augment=not args.no_augment, save=lambda r: write_json_atomic(out, r))
    except TrainingDiverged as error:
        record.update(status="stopped", message=f"training diverged: {error}")
        write_json_atomic(out, record)
        print(f"error: training diverged: {error}; the results up to the last epoch are in {out} "
              "(check the implementation with python -m harness.check)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        record.update(status="interrupted", message="interrupted by the user")
        write_json_atomic(out, record)
        print(f"interrupted; the results up to here are in {out}", file=sys.stderr)
        return 130
    except Exception as error:  # out of memory, a bug in an implementation, ...: the file must not say "running"
        record.update(status="failed", message=f"{type(error).__name__}: {error}")
        write_json_atomic(out, record)
        print(f"error: training failed: {type(error).__name__}: {error}; the results up to the last epoch are "
              f"in {out}", file=sys.stderr)
        return 1
    record["status"] = "completed"
    write_json_atomic(out, record)
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
