"""What single-process training (:mod:`harness.train`) and data-parallel training (:mod:`harness.distributed`)
share: their common command-line options, the results record, resuming a run, the epoch summary,
divergence and evaluation (the status sequence is :mod:`harness.training.run_status`'s, the checkpoint
:mod:`harness.training.checkpoint`'s, progress :mod:`harness.training.progress`'s).

One results record per run, rewritten atomically after every epoch (kind :data:`TRAINING_KIND`): what
was trained (implementation, framework, device, routing variant, routing algorithm and gradient, dtype,
network), on what (training and
test images, ranks, batch), how (optimizer, learning-rate schedule, seed, augmentation, threads of every
pool), per-step loss, per-epoch loss, accuracy and times, and the best and final test accuracy.  Beside it,
``<results>.checkpoint.npz`` holds the parameters and Adam's state after the last completed epoch, so that
``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
from pathlib import Path

import numpy as np

from harness import contract, options, registry, routing_algorithms
from harness.data import DataError, Dataset, iterate_batches, resolve_data_dir
from harness.errors import UserError
from harness.measure.machine import machine_facts
from harness.results import TRAINING_KIND, ResultsFileError, read_training_result, unwritable_line, writable_folder
from harness.settings import RUNS_DIR, TRAINING_SUBDIR
from harness.spec import (
    ADAM,
    DEFAULT_ROUTING_ALGORITHM,
    MAX_SHIFT_PIXELS,
    SCHEDULES,
    CapsNetConfig,
    LearningRateSchedule,
    get_config,
)
from harness.threads import thread_facts, usable_cpu_count
from harness.training.checkpoint import check_routing_algorithm, checkpoint_path, load_checkpoint
from harness.training.progress import LINES_PER_EPOCH, Progress
from harness.training.run_status import TrainingDiverged, process_facts

FORMAT_VERSION = 2
TRAINING_RUNS_DIR = RUNS_DIR / TRAINING_SUBDIR
DEFAULT_SCHEDULE = "paper"


class TrainingOptionError(UserError, ValueError):
    """Options that do not fit together or with the results file: one line naming the problem and the fix."""


# Command line -----------------------------------------------------------------------------------------


def add_training_arguments(parser: argparse.ArgumentParser, *, batch_help: str, default_impl: str | None) -> None:
    """The options both training commands take, each with its default in its help."""
    options.add_impl(parser, several=False, help="implementation", default=default_impl,
                     default_help="" if default_impl else "none: needed unless --resume")
    options.add_data_dir(parser)
    parser.add_argument("--epochs", type=options.positive_int, default=1,
                        help="epochs in all, counting those of a resumed run (default: %(default)s)")
    options.add_batch_size(parser, default=128, help=batch_help)
    parser.add_argument("--limit", type=options.positive_int,
                        help="train on the first N training images only (default: all 60,000)")
    parser.add_argument("--test-limit", type=options.positive_int,
                        help="evaluate on the first N test images only (default: all 10,000)")
    options.add_seed(parser, help="seed of the data order and augmentation")
    options.add_config(parser)
    options.add_dtype(parser)
    options.add_routing_algorithm(parser, consequence="an implementation that does not compute it is refused")
    options.add_routing_gradient(parser)
    parser.add_argument("--no-augment", action="store_true",
                        help=f"no random shifts of up to {MAX_SHIFT_PIXELS} pixels (default: shift, as the paper)")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default=DEFAULT_SCHEDULE,
                        help="Adam's learning rate: 'paper' decays it x0.96 every 2,000 steps as the official code "
                             "does, 'constant' keeps 1e-3 (default: %(default)s)")
    parser.add_argument("--log-every", type=options.positive_int, metavar="STEPS",
                        help="without a terminal, a progress line every STEPS steps (default: about "
                             f"{LINES_PER_EPOCH} lines per epoch)")
    options.add_out(parser, help=f"results file (default: runs/{TRAINING_SUBDIR}/<impl>_<config>_<time>.json, "
                                 "<impl>-<algorithm>_... for a routing algorithm other than dynamic, never an "
                                 "existing file's name; not tracked by git)")
    parser.add_argument("--resume", type=Path, metavar="FILE",
                        help="continue the run whose results file this is, from its last completed epoch (its "
                             "options and MNIST folder are taken from the file, and an option given that differs "
                             "from it is refused; --epochs may change the total, --impl continue it on another "
                             "implementation that computes its routing algorithm) (default: a new run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results file named by --out and its checkpoint if they exist (default: "
                             "refuse, so that a finished run is never destroyed by mistake)")


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options written on the command line, as opposed to those left at their
    default (so that --resume can tell an option the user gave from one nobody asked for)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace))


# The results record -----------------------------------------------------------------------------------


def new_record(info: registry.ImplementationInfo, args: argparse.Namespace, schedule: LearningRateSchedule,
               train_images: int, test_images: int, ranks: int = 1) -> dict:
    """A results record for a run about to start (status 'running')."""
    return {
        "kind": TRAINING_KIND,
        "format_version": FORMAT_VERSION,
        "status": "running",
        "message": "",
        "implementation": info.name,
        **info.describe(),
        "dtype": args.dtype,
        "config_name": args.config,
        "routing_algorithm": args.routing_algorithm,
        "routing_gradient": args.routing_gradient,
        "config": run_config(args).as_dict(),
        "optimizer": {"name": "adam", **ADAM.__dict__},
        "schedule": schedule.as_dict(),
        "batch_size": args.batch_size * ranks,
        "epochs_requested": args.epochs,
        "train_images": train_images,
        "test_images": test_images,
        "ranks": ranks,
        "limit": args.limit,
        "test_limit": args.test_limit,
        "seed": args.seed,
        "augment": not args.no_augment,
        "data_dir": recorded_data_dir(args.data_dir),
        "threads": thread_facts(),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **process_facts(),
        "machine": machine_facts(),
        "best_test_accuracy": None,
        "final_test_accuracy": None,
        "epochs": [],
        "steps": [],
    }


def recorded_data_dir(data_dir: str | None) -> str | None:
    """The absolute MNIST folder a run reads (``--data-dir``, else $CAPSBENCH_DATA_DIR), for its record, so
    that ``--resume FILE`` alone finds it again; None where neither names one."""
    try:
        return str(resolve_data_dir(data_dir).resolve())
    except DataError:
        return None


def ran_on(record: dict) -> str:
    """The implementation the run's last completed epoch ran on (a resumed run may change it: each epoch
    names its own), else the one it was started with."""
    return record["epochs"][-1].get("implementation", record["implementation"]) if record["epochs"] else \
        record["implementation"]


def run_config(args: argparse.Namespace) -> CapsNetConfig:
    """The network a run trains: the named configuration with the run's routing algorithm and gradient.
    TrainingOptionError (one line) for a routing gradient without meaning under the algorithm (``final``
    under self-attention, which has no iterations before its last)."""
    algorithm = routing_algorithms.get(args.routing_algorithm)
    if args.routing_gradient not in algorithm.routing_gradients:
        raise TrainingOptionError(
            f"--routing-gradient {args.routing_gradient} has no meaning under --routing-algorithm {algorithm.name} "
            f"(it has no iterations before its last): use --routing-gradient "
            f"{' or '.join(algorithm.routing_gradients)}")
    return get_config(args.config).replace(routing_gradient=args.routing_gradient, routing_algorithm=algorithm.name)


def recorded_routing_algorithm(record: dict) -> str:
    """The routing algorithm a results record trained with: its ``routing_algorithm``, else its config's, else
    (a file from before the setting) ``dynamic``, the only algorithm there was."""
    return record.get("routing_algorithm") or (record.get("config") or {}).get("routing_algorithm") or \
        DEFAULT_ROUTING_ALGORITHM


def require_computes(info: registry.ImplementationInfo, config: CapsNetConfig) -> None:
    """Nothing where ``info``'s implementation computes ``config``'s routing algorithm and gradient; else
    UnsupportedRoutingAlgorithmError or UnsupportedRoutingGradientError, one line with the registry's reason
    (:meth:`harness.registry.ImplementationInfo.computes`), before any work."""
    status = info.computes(config)
    if status:
        return
    algorithm = contract.routing_algorithm_support(info.cls, config.routing_algorithm, info.routing_variant)
    error = contract.UnsupportedRoutingGradientError if algorithm else contract.UnsupportedRoutingAlgorithmError
    raise error(f"implementation {info.name!r} {status.reason}")


def routing_gradient_suffix(args: argparse.Namespace) -> str:
    """What a default results file name adds for a run that is not the default's routing gradient."""
    gradient = getattr(args, "routing_gradient", "full")
    return "" if gradient == "full" else f"-{gradient}-gradient"


def routing_suffix(args: argparse.Namespace) -> str:
    """What a default results file name adds for a run that is not the default's routing: ``-<algorithm>``
    for an algorithm other than dynamic, then :func:`routing_gradient_suffix`."""
    algorithm = getattr(args, "routing_algorithm", DEFAULT_ROUTING_ALGORITHM)
    return ("" if algorithm == DEFAULT_ROUTING_ALGORITHM else f"-{algorithm}") + routing_gradient_suffix(args)


def refuse_existing_output(out: Path, overwrite: bool) -> None:
    """A new run never replaces an earlier one silently: the results file or its checkpoint existing is an
    error naming the file and the two ways on, unless ``overwrite`` (then the old checkpoint goes too)."""
    out = Path(out)
    writable_output(out)
    existing = [path for path in (out, checkpoint_path(out)) if path.exists()]
    if existing and not overwrite:
        raise TrainingOptionError(f"{existing[0]} already exists: continue that run with --resume {out}, or "
                                  "replace it with --overwrite (or choose another --out)")
    checkpoint_path(out).unlink(missing_ok=True)


def writable_output(out: Path) -> Path:
    """``out``'s folder, created, if a file can be written into it (the results and the checkpoint are, after
    every epoch); else a TrainingOptionError naming the folder, why, and the fix, before any training."""
    try:
        return writable_folder(Path(out).parent)
    except OSError as error:
        raise TrainingOptionError(unwritable_line(Path(out).parent, error)) from None


def interrupted_line(out: Path, record: dict, why: str) -> str:
    """What an interrupted run says: where its results are and how to continue, or that nothing was
    completed (interrupted during epoch 1, there is no checkpoint: --resume starts from the beginning)."""
    done = completed_epochs(record)
    if done:
        return (f"{why}; the results up to epoch {done} (the last completed) are in {out} "
                f"(continue with --resume {out})")
    return (f"{why} before epoch 1 completed: nothing was completed or saved; --resume {out} starts the run "
            "again from the beginning, with its options")


def default_output(name: str, config_name: str, suffix: str = "", folder: Path | None = None) -> Path:
    """``<folder>/<name><suffix>_<config>_<time>.json`` (folder: runs/training/), the time to the second; never
    the name of an existing results file or checkpoint: a run started in the same second as another of the
    same implementation, routing and network takes ``..._<time>-2.json`` (then -3, ...)."""
    folder = TRAINING_RUNS_DIR if folder is None else Path(folder)
    stem = f"{name}{suffix}_{config_name}_{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, count = folder / f"{stem}.json", 1
    while path.exists() or checkpoint_path(path).exists():
        count += 1
        path = folder / f"{stem}-{count}.json"
    return path


def resume_options(path: Path, args: argparse.Namespace, given: set[str] = frozenset()) -> dict:
    """The record of the run to resume; ``args`` takes its options.  An option in ``given`` (written on the
    command line) that differs from the run's is a TrainingOptionError, never silently replaced: a resumed
    run continues the run as it was started.  --epochs (the total) may change, not below the epochs done.
    --impl may name another implementation: it continues from the canonical parameters and Adam state of
    the checkpoint, and each epoch records which implementation ran it (without --impl: the last epoch's).
    Without --data-dir, the MNIST folder the run recorded, where it exists."""
    record = read_training_result(path)
    taken = {"config": record["config_name"], "dtype": record["dtype"],
             "seed": record["seed"], "limit": record["limit"], "test_limit": record["test_limit"],
             "batch_size": record["batch_size"] // record.get("ranks", 1), "no_augment": not record["augment"],
             "schedule": record["schedule"]["name"],
             "routing_algorithm": recorded_routing_algorithm(record),  # older files: dynamic, the only one then
             "routing_gradient": record.get("routing_gradient", "full")}  # older files: the only behaviour then
    for key, value in taken.items():
        if key in given and getattr(args, key) != value:
            flag = "--" + key.replace("_", "-")
            asked, was = (flag, "with augmentation") if key == "no_augment" else \
                (f"{flag} {getattr(args, key)}", f"{flag} {value}")
            raise TrainingOptionError(f"--resume {path} continues that run as it was started ({was}); {asked} "
                                      "differs: drop it, or start a new run with another --out")
        setattr(args, key, value)
    record["routing_algorithm"] = args.routing_algorithm  # a file from before the setting carries it from now on
    if "impl" not in given or args.impl is None:  # another one continues from the same parameters and Adam state
        args.impl = ran_on(record)
    recorded = record.get("data_dir")
    if args.data_dir is None and recorded and Path(recorded).is_dir():
        args.data_dir = recorded
    if "out" in given and args.out is not None and Path(args.out).resolve() != Path(path).resolve():
        raise TrainingOptionError(f"--resume {path} writes to that file; --out {args.out} differs: drop --out")
    if args.overwrite:
        raise TrainingOptionError("--overwrite replaces a run and --resume continues one: give only one")
    done = completed_epochs(record)
    if "epochs" in given and args.epochs < done:
        raise TrainingOptionError(f"--epochs {args.epochs} is fewer than the {done} epoch(s) {path} has completed "
                                  "(--epochs counts all epochs, those done included)")
    args.epochs = args.epochs if "epochs" in given else record["epochs_requested"]
    record["epochs_requested"] = args.epochs
    args.out = path
    return record


def prepare_resume(args: argparse.Namespace, given: set[str] = frozenset()) -> tuple[dict | None, int, dict | None,
                                                                                       dict | None]:
    """For ``--resume FILE``: (the record, the epochs it completed, the saved parameters, Adam's saved state),
    ``args`` taking the run's options (``given``: those written on the command line, checked against the
    run's); (None, 0, None, None) for a new run, after checking that it replaces no results file unless
    --overwrite.  ResultsFileError or FileNotFoundError when the file and its checkpoint do not fit
    together, TrainingOptionError when the options do not."""
    if not args.resume:
        if args.out is not None:
            refuse_existing_output(args.out, args.overwrite)
        return None, 0, None, None
    record = resume_options(args.resume, args, given)
    truncate_to_completed_epochs(record)
    done = completed_epochs(record)
    if done == 0:
        return record, 0, None, None  # stopped before its first epoch: start again
    saved_epoch, params, adam = load_checkpoint(args.resume)
    check_routing_algorithm(args.resume, args.routing_algorithm)
    if saved_epoch != done:
        raise ResultsFileError(f"{args.resume}: the results hold {done} epoch(s) but the checkpoint was saved "
                               f"after epoch {saved_epoch}")
    return record, done, params, adam


def add_epoch(record: dict, summary: dict) -> None:
    """Append an epoch's summary and update the best and final test accuracy."""
    record["epochs"].append(summary)
    accuracies = [epoch["test_accuracy"] for epoch in record["epochs"]]
    record["final_test_accuracy"] = accuracies[-1]
    record["best_test_accuracy"] = max(accuracies)


def completed_epochs(record: dict) -> int:
    return len(record["epochs"])


def truncate_to_completed_epochs(record: dict) -> None:
    """Drop the steps of an epoch that was interrupted (its parameters were never saved)."""
    done = completed_epochs(record)
    record["steps"] = [step for step in record["steps"] if step["epoch"] <= done]


def plan_ahead(impl: contract.Implementation, batch_size: int, record: dict | None) -> None:
    """Before the first step: an implementation that chooses a plan where it runs (torch-fused's
    convolution plan, ``use_plan_for``) chooses that of the run's batch now, so that no step, epoch or
    images/s figure holds the set-up (12 to 36 s where it measures), and the last, partial batch of an epoch
    or an evaluation takes that plan instead of measuring one of its own.  ``record`` (None: not rank 0)
    keeps the set-up apart: ``plan_seconds`` (every process of the run, resumed ones included) and
    ``plans`` (the plan of each batch size, with where it came from)."""
    use_plan_for = getattr(impl, "use_plan_for", None)
    if use_plan_for is None:
        return
    before = impl.plan_seconds
    use_plan_for(batch_size)
    if record is not None:
        record["plan_seconds"] = record.get("plan_seconds", 0.0) + impl.plan_seconds - before
        record["plans"] = impl.plan_facts()


def check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"loss is {loss} at epoch {epoch}, step {step}")


def epoch_rng(seed: int, epoch: int, rank: int = 0) -> np.random.Generator:
    """The generator of one epoch's data order and shifts: a function of (seed, epoch, rank) only, so a
    resumed run draws what the uninterrupted run would have."""
    return np.random.default_rng([seed, epoch, rank])


def epoch_summary(epoch: int, losses: list[float], accuracy: float, train_seconds: float, eval_seconds: float,
                  wall_seconds: float, images: int, elapsed: float, *, implementation: str) -> dict:
    """One entry of a results file's ``epochs``.  ``train_seconds`` is the wall time of the epoch's training
    loop (batch preparation and augmentation included, evaluation not), so ``images_per_second`` is what a
    user gets; ``eval_seconds`` the test-set evaluation; ``wall_seconds`` the whole epoch, both and the
    saving of results; ``elapsed_seconds`` adds up the training steps alone, the clock of the loss curves;
    ``implementation`` the one that ran the epoch (a resumed run may continue on another)."""
    return {
        "epoch": epoch,
        "implementation": implementation,
        "mean_loss": float(np.mean(losses)),
        "test_accuracy": accuracy,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": wall_seconds,
        "images": images,
        "images_per_second": images / train_seconds,
        "elapsed_seconds": elapsed,
    }


def epoch_line(summary: dict, note: str = "") -> str:
    return (f"epoch {summary['epoch']}: mean loss {summary['mean_loss']:.4f}, test accuracy "
            f"{summary['test_accuracy']:.2%}; training {summary['train_seconds']:.1f} s "
            f"({summary['images_per_second']:.1f} images/s), evaluation {summary['eval_seconds']:.1f} s, "
            f"epoch wall time {summary['wall_seconds']:.1f} s{note}")


def start_line(name: str, args: argparse.Namespace, train_images: int, test_images: int, out: Path,
               ranks: int = 1, resumed_from: int = 0, switched_from: str | None = None) -> str:
    """The first line of a run: what is trained, on how many images, where the results go (and, for a run
    resumed on another implementation, the one it ran on until then)."""
    batch = f"batch {args.batch_size}" + (f" per rank = {args.batch_size * ranks} global" if ranks > 1 else "")
    where = f"data-parallel on {ranks} ranks, " if ranks > 1 else ""
    resumed = f", resuming after epoch {resumed_from}" if resumed_from else ""
    if resumed_from and switched_from and switched_from != name:
        resumed += f" (which ran on {switched_from})"
    algorithm = getattr(args, "routing_algorithm", DEFAULT_ROUTING_ALGORITHM)
    return (f"training {name} ({args.dtype}, {args.config} network, schedule {args.schedule}, routing algorithm "
            f"{algorithm}, routing gradient {args.routing_gradient}) {where}on "
            f"{train_images:,} training images{clamped(args.limit, train_images)}, evaluating on "
            f"{test_images:,} test images{clamped(args.test_limit, test_images)}, {batch}, "
            f"{args.epochs} epoch(s){resumed}; results -> {out}")


def clamped(limit: int | None, used: int) -> str:
    """Said in the first line when --limit / --test-limit asked for more images than there are."""
    return f" (all there are: the limit {limit:,} is more)" if limit is not None and limit > used else ""


def evaluate(impl: contract.Implementation, images: np.ndarray, labels: np.ndarray, batch_size: int,
             description: str = "evaluation", enabled: bool = True, every: int | None = None) -> int:
    """The number of ``images`` classified correctly (the longest DigitCaps capsule), with progress."""
    correct = 0
    progress = Progress(math.ceil(len(labels) / batch_size), description, every, enabled)
    for start in range(0, len(labels), batch_size):
        lengths, _ = impl.forward(impl.to_device(images[start : start + batch_size]), train=False)
        correct += int(np.sum(impl.to_numpy(lengths).argmax(axis=1) == labels[start : start + batch_size]))
        progress.update()
    progress.close()
    return correct


def training_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int, augment: bool):
    """One epoch's shuffled (and shifted) mini-batches, drawn from :func:`epoch_rng`."""
    return iterate_batches(dataset, batch_size, epoch_rng(seed, epoch), shuffle=True, augment=augment)


def pin_threads(threads: int | None) -> int:
    """Pin torch, BLAS and OpenMP to ``threads`` (default: the CPUs this process may use); the count."""
    from harness.threads import set_threads

    count = threads or usable_cpu_count()
    set_threads(count)
    return count
