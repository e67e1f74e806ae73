"""python -m harness.train: train one implementation on MNIST and record how it learns and how fast.

Adam from the canonical parameters with the paper's learning-rate schedule (``--schedule constant`` for a
fixed 1e-3), the paper's random shifts of up to 2 pixels on the training images, test accuracy after every
epoch.  Torch, BLAS and OpenMP are pinned to one thread count (``--threads``, default: the CPUs this process
may use), recorded with what every pool used.  The results file (under ``runs/training/`` unless ``--out``
says otherwise) and the checkpoint beside it are rewritten atomically after every epoch, so an interrupted
(Ctrl-C or SIGTERM), diverged or failed run keeps everything up to its last epoch, and ``--resume FILE``
continues it.  An existing results file is never replaced unless ``--overwrite`` says so.  ``--routing-algorithm``
chooses the routing (dynamic, the paper's, by default); the results file and the checkpoint record it, a
resumed run keeps it, and an implementation that does not compute it is refused before any work.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from harness import cli, contract, options, registry
from harness.data import load_mnist
from harness.errors import EXIT_FAILURE, UserError
from harness.params import init_parameters
from harness.results import write_json_atomic
from harness.spec import SCHEDULES
from harness.training import loop
from harness.training.checkpoint import save_checkpoint
from harness.training.progress import Progress
from harness.training.run_status import RunStatus, Terminated, TrainingDiverged


def train_epochs(impl: contract.Implementation, train_set, test_set, record: dict, out: Path,
                 args: argparse.Namespace, first_epoch: int = 1) -> dict:
    """Train epochs ``first_epoch`` .. ``args.epochs``, appending to ``record``; after each, the results
    file and the checkpoint are saved."""
    elapsed = record["epochs"][-1]["elapsed_seconds"] if record["epochs"] else 0.0
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    loop.plan_ahead(impl, args.batch_size, record)
    for epoch in range(first_epoch, args.epochs + 1):
        losses, images_seen, epoch_start = [], 0, time.perf_counter()
        progress = Progress(steps_per_epoch, f"epoch {epoch}/{args.epochs}", args.log_every)
        batches = loop.training_batches(train_set, args.batch_size, args.seed, epoch, not args.no_augment)
        for step, (images, labels) in enumerate(batches, start=1):
            step_start = time.perf_counter()
            loss = impl.train_step(impl.to_device(images, labels))
            elapsed += time.perf_counter() - step_start
            images_seen += len(labels)
            record["steps"].append({"epoch": epoch, "step": step, "loss": loss, "elapsed_seconds": elapsed})
            loop.check_finite(loss, epoch, step)
            losses.append(loss)
            progress.update(loss=loss)
        progress.close()
        train_seconds = time.perf_counter() - epoch_start
        eval_start = time.perf_counter()
        correct = loop.evaluate(impl, test_set.images, test_set.labels, args.batch_size,
                                f"epoch {epoch}/{args.epochs} evaluation", every=args.log_every)
        eval_seconds = time.perf_counter() - eval_start
        save_checkpoint(out, impl, epoch)
        summary = loop.epoch_summary(epoch, losses, correct / len(test_set), train_seconds, eval_seconds,
                                     time.perf_counter() - epoch_start, images_seen, elapsed,
                                     implementation=args.impl)
        loop.add_epoch(record, summary)
        write_json_atomic(out, record)
        print(loop.epoch_line(summary), flush=True)
    return record


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=cli.prog("train"), description=cli.description(__doc__),
                                     epilog="--distributed: data-parallel under torchrun, the same as "
                                            "`torchrun ... -m harness.distributed train`, whose options it takes")
    loop.add_training_arguments(parser, batch_help="images per step", default_impl=None)
    options.add_threads(parser)
    return parser


@cli.command
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--distributed" in argv:
        from harness.training.ddp import train_main

        return train_main([arg for arg in argv if arg != "--distributed"])
    command = parser()
    args = command.parse_args(argv)
    if args.impl is None and args.resume is None:
        command.error("--impl NAME is required (or --resume FILE to continue a run)")
    try:
        record, resumed_from, params, adam = loop.prepare_resume(args, loop.given_options(command, argv))
        info = registry.get(args.impl)
        args.impl = info.name
        config = loop.run_config(args)
        loop.require_computes(info, config)
        out = args.out or loop.default_output(info.name, args.config, suffix=loop.routing_suffix(args))
        loop.writable_output(out)
        loop.pin_threads(args.threads)
        schedule = SCHEDULES[args.schedule]
        impl = info.create(config, init_parameters(config, dtype=args.dtype) if params is None else params, args.dtype)
        impl.set_schedule(schedule)
        if adam is not None:
            impl.load_adam_state(adam)
        train_set = load_mnist(args.data_dir, "train").head(args.limit)
        test_set = load_mnist(args.data_dir, "test").head(args.test_limit)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    switched_from = loop.ran_on(record) if record is not None else None
    if resumed_from == 0:  # a new run, or one stopped before its first epoch: nothing of it is kept
        record = loop.new_record(info, args, schedule, len(train_set), len(test_set))
    run = RunStatus(out, record)
    run.start()
    print(loop.start_line(info.name, args, len(train_set), len(test_set), out, resumed_from=resumed_from,
                          switched_from=switched_from), flush=True)
    previous_handler = install_sigterm_handler()
    try:
        train_epochs(impl, train_set, test_set, record, out, args, first_epoch=resumed_from + 1)
    except Exception as error:  # diverged, out of memory, a bug in an implementation: the file must not say "running"
        raise UserError(failure_line(error, run.ended_by(error), out), EXIT_FAILURE) from error
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (run_status.Terminated)
        print(loop.interrupted_line(out, record, run.ended_by(stop)), file=sys.stderr)
        return 128 + stop.signum if isinstance(stop, Terminated) else 130
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    run.completed()
    print(f"results written to {out} (best test accuracy {record['best_test_accuracy']:.2%})")
    return 0


def failure_line(error: Exception, message: str, out: Path) -> str:
    """What a run that ended by ``error`` says (after ``error:``): the results file's ``message``, where the
    results are, and, for a divergence, what to check."""
    if isinstance(error, TrainingDiverged):
        return (f"{message}; the results up to the last epoch are in {out} "
                "(check the implementation with python -m harness.check)")
    return f"training failed: {message}; the results up to the last epoch are in {out}"


def raise_terminated(signum, frame):
    raise Terminated(signum)


def install_sigterm_handler():
    """SIGTERM ends the run as Ctrl-C does (the previous handler, to restore; None off the main thread,
    where Python cannot install one)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, raise_terminated)


if __name__ == "__main__":
    sys.exit(main())
