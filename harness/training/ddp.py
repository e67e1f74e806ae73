"""Data-parallel CapsNet training on torch.distributed: the run behind ``python -m harness.distributed train``
and ``python -m harness.train --distributed``, and the DDP machinery ``python -m harness.scaling`` times.

Nothing here is a home-made engine: the torch implementations' ``nn.Module`` is wrapped in
``torch.nn.parallel.DistributedDataParallel`` (DDP), processes are started by ``torchrun``
(``python -m torch.distributed.run``), the shards are ``torch.utils.data.DistributedSampler``'s, and the
gradients are all-reduced by DDP (in buckets, overlapping the backward pass).

``train`` (launched by torchrun, once per rank)::

    torchrun --standalone --nproc-per-node 2 -m harness.distributed train --impl torch-vectorised \\
        --data-dir DIR --epochs 1 --batch-size 64      # per-rank batch: the global batch is 2 x 64

(``python -m harness.train --distributed ...`` under torchrun is the same command; the options common to
both training commands, the results record and the checkpoints are :mod:`harness.training.loop`'s.)  The backend is gloo
for a CPU implementation and NCCL for a CUDA one (``--impl torch-vectorised-cuda``; ``LOCAL_RANK`` picks
the GPU).  Every rank builds the same canonical seeded parameters (:func:`harness.params.init_parameters`,
and DDP broadcasts rank 0's copy anyway; under ``--routing-algorithm self-attention`` the module holds
``digit.bias`` too, all-reduced with the rest); in epoch ``e`` rank ``r`` trains on the indices ``r::W`` of the
permutation every rank draws from ``seed + e`` (``DistributedSampler``: padded by repeating the first
indices so that every shard has the same length, hence the same number of steps and the same batch sizes);
each rank shifts its own images with its own generator, :func:`harness.training.loop.epoch_rng` of (seed, epoch,
rank).  DDP averages the gradients, so one step equals a single-process step on the concatenation of the ranks' batches
(``tests/test_distributed.py`` checks the parameters).  The loss recorded for each step is the mean over the
ranks (one all-reduce of a scalar per step, which also makes every rank stop together if it is not finite).
The test set is split the same way (rank r evaluates images r::W; one all-reduce sums the correct counts),
which is W times faster than rank 0 alone and keeps the other ranks from idling against the process-group
timeout.  Rank 0 writes the results file (the format of ``python -m harness.train``, ``batch_size`` being
the global batch, plus a ``distributed`` block) atomically after every epoch.

Errors: a rank that fails prints one line ``error: rank R failed: ...``, destroys its process group and
exits non-zero; torchrun then stops the other ranks and exits non-zero.  A rank that stops answering
without exiting makes the others fail on the process-group timeout (``--timeout-s``, default 600 s).

Testing aid: the environment variable ``CAPSBENCH_FAIL_RANK=R:K`` makes rank R raise at its training
step K (counted from 1 over the whole run); ``CAPSBENCH_FAIL_RANK=R:K:hang`` makes it stop answering
instead (it sleeps), so that the others meet the process-group timeout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness import contract, options, registry
from harness.data import DataError, Dataset, load_mnist, shift_images
from harness.errors import UserError
from harness.params import init_parameters
from harness.results import atomic_output, write_json_atomic
from harness.settings import FAIL_RANK_ENV
from harness.spec import SCHEDULES
from harness.training import loop
from harness.training.checkpoint import save_checkpoint
from harness.training.progress import Progress, say
from harness.training.run_status import RunStatus

try:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler
except ImportError:  # the error is reported when a command needs torch
    torch = None

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0
TORCHRUN_EXAMPLE = "torchrun --standalone --nproc-per-node 2 -m harness.distributed train ..."


class LaunchError(UserError, RuntimeError):
    """Run outside torchrun, or with a setup that cannot work (e.g. more ranks than GPUs)."""


class InjectedFailure(RuntimeError):
    """The failure asked for by CAPSBENCH_FAIL_RANK (a testing aid)."""


class Terminated(Exception):
    """SIGTERM: torchrun stops the surviving ranks this way after one rank failed."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str  # "cpu" or "cuda:<local rank>"

    @property
    def is_root(self) -> bool:
        return self.rank == 0


# Setting up ----------------------------------------------------------------------------------------


def torch_implementation(name: str) -> registry.ImplementationInfo:
    """The registry entry of a torch implementation (DDP wraps its module); one-line errors otherwise."""
    if torch is None:
        raise contract.UnavailableImplementationError("torch not installed (pip install torch==2.13.0)")
    from implementations.torch.autograd import TorchCapsNet

    info = registry.get(name)
    if not issubclass(info.cls, TorchCapsNet):
        torch_names = [entry.name for entry in registry.entries()
                       if issubclass(entry.cls, TorchCapsNet) and not entry.cls.first_call_compiles]
        raise contract.UnavailableImplementationError(
            f"data-parallel training wraps a torch module in DistributedDataParallel; {name!r} is a "
            f"{info.framework} implementation (use one of {', '.join(torch_names)})")
    if info.cls.first_call_compiles:
        raise contract.UnavailableImplementationError(
            f"data-parallel training wraps the eager module in DistributedDataParallel; {name!r} compiles or "
            "captures its own step, which DDP would bypass")
    status = info.availability()
    if not status:
        raise contract.UnavailableImplementationError(f"implementation {name!r} is unavailable here: {status.reason}")
    return info


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables torchrun sets."""
    missing = [name for name in LAUNCH_ENV if name not in os.environ]
    if missing:
        raise LaunchError(f"{', '.join(missing)} not set: start the ranks with torchrun, e.g. {TORCHRUN_EXAMPLE}")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def init_distributed(info: registry.ImplementationInfo, timeout_s: float) -> Context:
    """Join the process group: gloo on the CPU, NCCL on CUDA (one GPU per local rank)."""
    rank, world_size, local_rank = launch_environment()
    if info.device == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise LaunchError(f"local rank {local_rank} needs a GPU but this machine has {count}: "
                              "--nproc-per-node must not exceed the number of GPUs")
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", "cpu"
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
    return Context(rank, world_size, local_rank, backend, device)


def leave_together(ctx: Context) -> None:
    """On success, wait for every rank before any leaves: a rank that tears gloo down while another is still
    writing results can die in its exit (SIGABRT, "terminate called without an active exception"), seen once
    on two CPU ranks, which turns a completed run into a failed one."""
    dist.barrier(device_ids=[ctx.local_rank] if ctx.backend == "nccl" else None)


def shutdown(ctx: Context | None) -> None:
    """Leave the process group (for NCCL this shuts the communicators down, aborting pending work)."""
    if ctx is None or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # shutting down after a failure must not raise a second error
        pass


def build(info: registry.ImplementationInfo, config, dtype: str, ctx: Context, params: dict | None = None):
    """The implementation on this rank's device, from ``params`` (default: the canonical parameters), and its
    module in DDP."""
    params = init_parameters(config, dtype=dtype) if params is None else params
    impl = info.cls(config, params, dtype=dtype, device=ctx.device, routing_variant=info.routing_variant)
    device_ids = [ctx.local_rank] if ctx.backend == "nccl" else None
    # DDP copies each gradient into its bucket; for conv1.weight (C, 1, 9, 9) the strides differ only along
    # the size-1 input-channel axis, the same memory layout, so its warning about a slower copy is noise.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ddp = DistributedDataParallel(impl.module, device_ids=device_ids)
    return impl, ddp


def ddp_train_step(ddp, impl, batch):
    """TorchCapsNet.train_step through DDP: forward, backward (gradients all-reduced), Adam; the local loss."""
    lengths, reconstructions = ddp(batch.images, batch.labels)
    from implementations.torch.autograd import total_loss

    loss = total_loss(lengths, reconstructions, batch.images, batch.labels, impl.config)
    impl.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    impl.adam_step()
    return loss.detach()


def failure_hook(rank: int):
    """The testing aid CAPSBENCH_FAIL_RANK=R:K[:hang]: a function of the step that fails on rank R at step K."""
    spec = os.environ.get(FAIL_RANK_ENV, "")
    if not spec:
        return lambda step: None
    parts = spec.split(":")
    try:
        fail_rank, fail_step = int(parts[0]), int(parts[1])
        hang = parts[2:] == ["hang"]
        if len(parts) not in (2, 3) or (len(parts) == 3 and not hang):
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"{FAIL_RANK_ENV}={spec!r}: expected RANK:STEP or RANK:STEP:hang") from None

    def hook(step: int) -> None:
        if rank == fail_rank and step == fail_step:
            if hang:
                time.sleep(10**6)
            raise InjectedFailure(f"injected failure at step {step} ({FAIL_RANK_ENV}={spec})")

    return hook


def describe(error: BaseException) -> str:
    """One line for an exception: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    message = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", lines[0] if lines else "")  # gloo's source location
    message = re.split(r"(?<=\S)\. (?=[A-Z])", message, maxsplit=1)[0]  # its first sentence
    text = f"{type(error).__name__}: {message}".rstrip(": ")
    if len(text) > 400:
        text = text[:397] + "..."
    if isinstance(error, dist.DistError) or "Connection closed by peer" in text or "Timed out" in text:
        text += " (a collective failed: another rank probably failed first or stopped answering)"
    return text


def raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum} (torchrun stops the ranks when one has failed)")


# Training ------------------------------------------------------------------------------------------


def evaluate_sharded(ctx: Context, impl, test_set: Dataset, batch_size: int, description: str, every) -> float:
    """Test accuracy with rank r classifying images r::W (progress on rank 0); one all-reduce sums the
    correct counts."""
    images, labels = test_set.images[ctx.rank :: ctx.world_size], test_set.labels[ctx.rank :: ctx.world_size]
    correct = loop.evaluate(impl, images, labels, batch_size, description, enabled=ctx.is_root, every=every)
    total = torch.tensor([correct], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(total)
    return int(total.item()) / len(test_set)


def parameter_spread(ctx: Context, impl) -> float:
    """Largest difference of any parameter between two ranks (0 when DDP kept them identical)."""
    spread = 0.0
    for parameter in impl.params.values():
        high, low = parameter.detach().clone(), parameter.detach().clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        spread = max(spread, float((high - low).max()))
    return spread


def train_distributed(ctx: Context, impl, ddp, train_set: Dataset, test_set: Dataset, record: dict | None,
                      args: argparse.Namespace, out: Path | None, first_epoch: int = 1) -> None:
    """Train epochs ``first_epoch`` .. ``args.epochs`` on this rank's shard; rank 0 appends to ``record``
    and saves it and the checkpoint after each epoch."""
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=args.seed, drop_last=False)
    fail = failure_hook(ctx.rank)
    elapsed = record["epochs"][-1]["elapsed_seconds"] if record and record["epochs"] else 0.0
    run_step = 0
    loop.plan_ahead(impl, args.batch_size, record)
    for epoch in range(first_epoch, args.epochs + 1):
        sampler.set_epoch(epoch - 1)
        rng = loop.epoch_rng(args.seed, epoch, ctx.rank)
        shard = np.fromiter(iter(sampler), dtype=np.int64, count=sampler.num_samples)
        losses, images_seen, epoch_start = [], 0, time.perf_counter()
        steps = -(-len(shard) // args.batch_size)
        progress = Progress(steps, f"epoch {epoch}/{args.epochs}", args.log_every, enabled=ctx.is_root)
        for step, start in enumerate(range(0, len(shard), args.batch_size), start=1):
            run_step += 1
            fail(run_step)
            index = shard[start : start + args.batch_size]
            images = train_set.images[index]
            if not args.no_augment:
                images = shift_images(images, rng)
            step_start = time.perf_counter()
            loss = ddp_train_step(ddp, impl, impl.to_device(images, train_set.labels[index]))
            dist.all_reduce(loss)  # sum of the ranks' mean losses (gloo has no AVG)
            loss = float(loss) / ctx.world_size
            elapsed += time.perf_counter() - step_start
            images_seen += len(index) * ctx.world_size
            if record is not None:
                record["steps"].append({"epoch": epoch, "step": step, "loss": loss, "elapsed_seconds": elapsed})
            loop.check_finite(loss, epoch, step)  # the same value on every rank: they all stop here
            losses.append(loss)
            progress.update(loss=loss)
        progress.close()
        train_seconds = time.perf_counter() - epoch_start
        eval_start = time.perf_counter()
        accuracy = evaluate_sharded(ctx, impl, test_set, args.batch_size, f"epoch {epoch}/{args.epochs} evaluation",
                                    args.log_every)
        eval_seconds = time.perf_counter() - eval_start
        if record is not None:
            save_checkpoint(out, impl, epoch)
            summary = loop.epoch_summary(epoch, losses, accuracy, train_seconds, eval_seconds,
                                         time.perf_counter() - epoch_start, images_seen, elapsed,
                                         implementation=args.impl)
            loop.add_epoch(record, summary)
            write_json_atomic(out, record)
            print(loop.epoch_line(summary, note=f" ({ctx.world_size} ranks)"), flush=True)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m harness.distributed train",
        description="Data-parallel training (DistributedDataParallel): torchrun starts one process per rank, each "
                    "running this command (the scaling measurement is `capsbench scaling`).")
    loop.add_training_arguments(parser, batch_help="images per step on each rank (global batch = world size "
                                                     "x this)", default_impl="torch-vectorised")
    options.add_threads(parser, help="CPU threads per rank for torch, BLAS and OpenMP",
                        default_help="the CPUs this process may use, divided by the ranks on this machine")
    options.add_timeout(parser, default=DEFAULT_TIMEOUT_S,
                        help="process-group timeout: a collective waiting longer fails")
    parser.add_argument("--save-parameters", type=Path, metavar="NPZ",
                        help="rank 0 also saves the final parameters (canonical names) to this .npz (default: not)")
    return parser


def distributed_block(ctx: Context, args: argparse.Namespace) -> dict:
    return {
        "backend": ctx.backend,
        "world_size": ctx.world_size,
        "threads_per_rank": torch.get_num_threads(),
        "per_rank_batch_size": args.batch_size,
        "global_batch_size": args.batch_size * ctx.world_size,
        "timeout_seconds": args.timeout_s,
        "sampler": "torch.utils.data.DistributedSampler (shuffle, drop_last=False)",
    }


def start_root_record(ctx: Context, info: registry.ImplementationInfo, args: argparse.Namespace, record: dict | None,
                      train_set: Dataset, test_set: Dataset, resumed_from: int) -> tuple[Path, RunStatus]:
    """Rank 0's results file: the resumed run's record or a new one (with the distributed block), marked
    running and written, and the first line said."""
    suffix = f"-ddp{ctx.world_size}{loop.routing_suffix(args)}"
    out = args.out or loop.default_output(info.name, args.config, suffix=suffix)
    switched_from = loop.ran_on(record) if record is not None else None
    if resumed_from == 0:  # a new run, or one stopped before its first epoch: nothing of it is kept
        record = loop.new_record(info, args, SCHEDULES[args.schedule], len(train_set), len(test_set),
                                 ranks=ctx.world_size)
        record["distributed"] = distributed_block(ctx, args)
    run = RunStatus(out, record)
    run.start()
    print(loop.start_line(info.name, args, len(train_set), len(test_set), out, ranks=ctx.world_size,
                          resumed_from=resumed_from, switched_from=switched_from), flush=True)
    return out, run


def train_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = parser()
    args = command.parse_args(argv)
    try:
        record, resumed_from, params, adam = loop.prepare_resume(args, loop.given_options(command, argv))
        info = torch_implementation(args.impl)
        args.impl = info.name
        config = loop.run_config(args)
        loop.require_computes(info, config)
        launch_environment()
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    loop.pin_threads(args.threads or max(1, loop.usable_cpu_count() // local_ranks))
    ctx, out, run = None, None, None
    previous_handler = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        ctx = init_distributed(info, args.timeout_s)
        impl, ddp = build(info, config, args.dtype, ctx, params)
        impl.set_schedule(SCHEDULES[args.schedule])
        if adam is not None:
            impl.load_adam_state(adam)
        train_set = load_mnist(args.data_dir, "train").head(args.limit)
        test_set = load_mnist(args.data_dir, "test").head(args.test_limit)
        if ctx.is_root:
            out, run = start_root_record(ctx, info, args, record, train_set, test_set, resumed_from)
            record = run.record
        else:
            record = None
        train_distributed(ctx, impl, ddp, train_set, test_set, record, args, out, first_epoch=resumed_from + 1)
        spread = parameter_spread(ctx, impl)
        if ctx.is_root:
            record["distributed"]["max_parameter_spread"] = spread
            run.completed()
            if args.save_parameters:
                with atomic_output(args.save_parameters) as temporary, open(temporary, "wb") as stream:
                    np.savez(stream, **impl.parameters())  # a file object: np.savez adds no .npz to it
            print(f"results written to {out}", flush=True)
        leave_together(ctx)
        return 0
    except DataError as error:  # said by the rank before it leaves the process group, as a failure below
        say(f"error: rank {ctx.rank if ctx else '?'}: {error}")
        return 2
    except Exception as error:  # includes TrainingDiverged, injected failures, collective errors, Terminated
        rank = ctx.rank if ctx else os.environ.get("RANK", "?")
        if run is not None:
            run.ended_by(error, message=f"rank {rank}: {describe(error)}")
        where = f"; the results up to the last epoch are in {out}" if run is not None else ""
        say(f"error: rank {rank} failed: {describe(error)}{where}")
        return 143 if isinstance(error, Terminated) else 1
    except KeyboardInterrupt as stop:
        if run is not None:
            run.ended_by(stop)
        return 130
    finally:
        shutdown(ctx)
        signal.signal(signal.SIGTERM, previous_handler)
