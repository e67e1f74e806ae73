"""python -m harness.distributed: data-parallel CapsNet training on torch.distributed, and its scaling.

Nothing here is a home-made engine: the torch implementations' ``nn.Module`` is wrapped in
``torch.nn.parallel.DistributedDataParallel`` (DDP), processes are started by ``torchrun``
(``python -m torch.distributed.run``), the shards are ``torch.utils.data.DistributedSampler``'s, and the
gradients are all-reduced by DDP (in buckets, overlapping the backward pass).

``train`` (launched by torchrun, once per rank)::

    torchrun --standalone --nproc-per-node 2 -m harness.distributed train --impl torch-vectorised \\
        --data-dir DIR --epochs 1 --batch-size 64      # per-rank batch: the global batch is 2 x 64

(``python -m harness.train --distributed ...`` under torchrun is the same command.)  The backend is gloo
for a CPU implementation and NCCL for a CUDA one (``--impl torch-vectorised-cuda``; ``LOCAL_RANK`` picks
the GPU).  Every rank builds the same canonical seeded parameters (:func:`harness.params.init_parameters`,
and DDP broadcasts rank 0's copy anyway); in epoch ``e`` rank ``r`` trains on the indices ``r::W`` of the
permutation every rank draws from ``seed + e`` (``DistributedSampler``: padded by repeating the first
indices so that every shard has the same length, hence the same number of steps and the same batch sizes);
each rank shifts its own images with its own generator, ``numpy.random.default_rng([seed, rank])``.  DDP
averages the gradients, so one step equals a single-process step on the concatenation of the ranks' batches
(``tests/test_distributed.py`` checks the parameters).  The loss recorded for each step is the mean over the
ranks (one all-reduce of a scalar per step, which also makes every rank stop together if it is not finite).
The test set is split the same way (rank r evaluates images r::W; one all-reduce sums the correct counts),
which is W times faster than rank 0 alone and keeps the other ranks from idling against the process-group
timeout.  Rank 0 writes the results file (the format of ``python -m harness.train``, ``batch_size`` being
the global batch, plus a ``distributed`` block) atomically after every epoch.

Errors: a rank that fails prints one line ``error: rank R failed: ...``, destroys its process group and
exits non-zero; torchrun then stops the other ranks and exits non-zero.  A rank that stops answering
without exiting makes the others fail on the process-group timeout (``--timeout-s``, default 600 s).

``scaling``: for each world size W, torchrun starts W ranks on one machine, each with ``--threads / W``
CPU threads, that time DDP steps on seeded synthetic batches (no data loading), and ONE results file
(kind ``capsbench-distributed-scaling``, read by the report) holds a row per world size: median step
time, images/s and the all-reduce share of the step.  ``--global-batch-size G`` keeps the global batch
fixed (strong scaling: the per-rank batch is G / W); ``--per-rank-batch-size B`` keeps the per-rank batch
fixed (weak scaling: the global batch is W x B).

How the all-reduce share is measured: the timed steps alternate between an ordinary DDP step and the same
step under ``DDP.no_sync()`` (forward, backward and Adam without the gradient all-reduce); every timed step
starts after a barrier, so the ranks start together, and a step's time is the slowest rank's.
``step_seconds`` is the median ordinary step; ``allreduce_seconds`` the median over the adjacent pairs of
(ordinary step - no_sync step), floored at 0 (pairs, so that drift in the machine's load cancels).  This is
the **exposed** communication time: what the all-reduce adds to a step once DDP has overlapped its buckets
with the backward pass, including any wait for a slower rank.  The total time spent in the all-reduce is
longer (most of it runs during the backward); timing it with a DDP communication hook would need the hook's
future to complete when the collective does, which does not hold for NCCL's CUDA futures, so it is not
reported.  On a loaded machine the difference of two noisy step times is itself noisy: read it with the
``no_sync_step_seconds`` recorded beside it.

Testing aid: the environment variable ``CAPSBENCH_FAIL_RANK=R:K`` makes rank R raise at its training
step K (counted from 1 over the whole run); ``CAPSBENCH_FAIL_RANK=R:K:hang`` makes it stop answering
instead (it sleeps), so that the others meet the process-group timeout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness import registry
from harness.data import DataError, Dataset, load_mnist, shift_images, synthetic_batch
from harness.environment import machine_facts
from harness.params import init_parameters
from harness.results import SCALING_DIR, SCALING_KIND, TRAINING_DIR, read_json, write_json_atomic
from harness.spec import CONFIGS, get_config
from harness.train import TrainingDiverged, check_at_least_one, epoch_summary, new_record, print_epoch

try:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler
except ImportError:  # the error is reported when a command needs torch
    torch = None

FAIL_ENV = "CAPSBENCH_FAIL_RANK"
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0
TORCHRUN_EXAMPLE = "torchrun --standalone --nproc-per-node 2 -m harness.distributed train ..."


LAUNCH_GRACE_S = 60.0  # per timed or warm-up step, beyond the process-group timeout, before torchrun is stopped


class LaunchError(RuntimeError):
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
        raise registry.UnavailableImplementationError("torch not installed (pip install torch==2.13.0)")
    from implementations.torch_capsnet import TorchCapsNet

    info = registry.get(name)
    if not issubclass(info.cls, TorchCapsNet):
        torch_names = [entry.name for entry in registry.entries() if issubclass(entry.cls, TorchCapsNet)]
        raise registry.UnavailableImplementationError(
            f"data-parallel training wraps a torch module in DistributedDataParallel; {name!r} is a "
            f"{info.framework} implementation (use one of {', '.join(torch_names)})")
    status = info.availability()
    if not status:
        raise registry.UnavailableImplementationError(f"implementation {name!r} is unavailable here: {status.reason}")
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


def shutdown(ctx: Context | None) -> None:
    """Leave the process group (for NCCL this shuts the communicators down, aborting pending work)."""
    if ctx is None or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # shutting down after a failure must not raise a second error
        pass


def build(info: registry.ImplementationInfo, config, dtype: str, ctx: Context):
    """The implementation on this rank's device, from the canonical parameters, and its module in DDP."""
    impl = info.cls(config, init_parameters(config, dtype=dtype), dtype=dtype, device=ctx.device, routing=info.routing)
    device_ids = [ctx.local_rank] if ctx.backend == "nccl" else None
    # DDP copies each gradient into its bucket; for conv1.weight (C, 1, 9, 9) the strides differ only along
    # the size-1 input-channel axis, the same memory layout, so its warning about a slower copy is noise.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ddp = DistributedDataParallel(impl.module, device_ids=device_ids)
    return impl, ddp


def ddp_train_step(ddp, impl, batch):
    """TorchCapsNet.train_step through DDP: forward, backward (gradients all-reduced), Adam; the local loss."""
    lengths, reconstructions = ddp(batch.images, batch.labels)
    from implementations.torch_capsnet import total_loss

    loss = total_loss(lengths, reconstructions, batch.images, batch.labels, impl.config)
    impl.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    impl.optimizer.step()
    return loss.detach()


def failure_hook(rank: int):
    """The testing aid CAPSBENCH_FAIL_RANK=R:K[:hang]: a function of the step that fails on rank R at step K."""
    spec = os.environ.get(FAIL_ENV, "")
    if not spec:
        return lambda step: None
    parts = spec.split(":")
    try:
        fail_rank, fail_step = int(parts[0]), int(parts[1])
        hang = parts[2:] == ["hang"]
        if len(parts) not in (2, 3) or (len(parts) == 3 and not hang):
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"{FAIL_ENV}={spec!r}: expected RANK:STEP or RANK:STEP:hang") from None

    def hook(step: int) -> None:
        if rank == fail_rank and step == fail_step:
            if hang:
                time.sleep(10**6)
            raise InjectedFailure(f"injected failure at step {step} ({FAIL_ENV}={spec})")

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


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum} (torchrun stops the ranks when one has failed)")


# Training ------------------------------------------------------------------------------------------


def evaluate_sharded(ctx: Context, impl, test_set: Dataset, batch_size: int) -> float:
    """Test accuracy with rank r classifying images r::W; one all-reduce sums the correct counts."""
    images, labels = test_set.images[ctx.rank :: ctx.world_size], test_set.labels[ctx.rank :: ctx.world_size]
    correct = 0
    for start in range(0, len(labels), batch_size):
        lengths, _ = impl.forward(impl.to_device(images[start : start + batch_size]), train=False)
        correct += int(np.sum(impl.to_numpy(lengths).argmax(axis=1) == labels[start : start + batch_size]))
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
                      args: argparse.Namespace, save) -> None:
    """Train for ``args.epochs`` on this rank's shard; rank 0 appends to ``record`` and saves it each epoch."""
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=args.seed, drop_last=False)
    rng = np.random.default_rng([args.seed, ctx.rank])
    fail = failure_hook(ctx.rank)
    elapsed, run_step = 0.0, 0
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch - 1)
        shard = np.fromiter(iter(sampler), dtype=np.int64, count=sampler.num_samples)
        losses, images_seen, epoch_start = [], 0, time.perf_counter()
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
            if not math.isfinite(loss):  # the same value on every rank: they all stop here
                raise TrainingDiverged(f"loss is {loss} at epoch {epoch}, step {step}")
            losses.append(loss)
        train_seconds = time.perf_counter() - epoch_start
        eval_start = time.perf_counter()
        accuracy = evaluate_sharded(ctx, impl, test_set, args.batch_size)
        if record is not None:
            summary = epoch_summary(epoch, losses, accuracy, train_seconds, time.perf_counter() - eval_start,
                                    images_seen, elapsed)
            record["epochs"].append(summary)
            print_epoch(summary, note=f" ({ctx.world_size} ranks)")
            save(record)


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m harness.distributed train",
        description="data-parallel training (DistributedDataParallel); run one process per rank with torchrun")
    parser.add_argument("--impl", default="torch-vectorised", metavar="NAME",
                        help="a torch implementation: torch-vectorised (gloo) or torch-vectorised-cuda (NCCL), ...")
    parser.add_argument("--data-dir", help="folder with the four MNIST IDX files (default: $CAPSBENCH_DATA_DIR)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128, help="per-rank batch (global batch = world size x this)")
    parser.add_argument("--limit", type=int, help="train on the first N training images only")
    parser.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order (all ranks) and of the shifts (with the rank)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--no-augment", action="store_true", help="no random 2-pixel shifts")
    parser.add_argument("--threads", type=int, help="CPU threads per rank (default: torchrun's OMP_NUM_THREADS)")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                        help="process-group timeout: a collective waiting longer fails (default %(default)s)")
    parser.add_argument("--out", type=Path, help="results file (default: results/training/<impl>-ddp<W>_<config>_<time>.json)")
    parser.add_argument("--save-parameters", type=Path, metavar="NPZ",
                        help="rank 0 also saves the final parameters (canonical names) to this .npz")
    return parser


def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    problem = check_at_least_one(args, ("epochs", "batch_size", "limit", "test_limit", "threads"))
    if problem is None and args.timeout_s <= 0:
        problem = f"error: --timeout-s must be positive, got {args.timeout_s}"
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        info = torch_implementation(args.impl)
        config = get_config(args.config)
        launch_environment()
    except (registry.UnknownImplementationError, registry.UnavailableImplementationError, LaunchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        from harness.threads import set_threads

        set_threads(args.threads)
    ctx, record, out = None, None, None
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        ctx = init_distributed(info, args.timeout_s)
        impl, ddp = build(info, config, args.dtype, ctx)
        train_set = load_mnist(args.data_dir, "train").head(args.limit)
        test_set = load_mnist(args.data_dir, "test").head(args.test_limit)
        if ctx.is_root:

            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = args.out or TRAINING_DIR / f"{info.name}-ddp{ctx.world_size}_{args.config}_{stamp}.json"
            record = new_record(info, args, args.config)
            record["batch_size"] = args.batch_size * ctx.world_size
            record["distributed"] = {
                "backend": ctx.backend,
                "world_size": ctx.world_size,
                "threads_per_rank": torch.get_num_threads(),
                "per_rank_batch_size": args.batch_size,
                "global_batch_size": args.batch_size * ctx.world_size,
                "timeout_seconds": args.timeout_s,
                "sampler": "torch.utils.data.DistributedSampler (shuffle, drop_last=False)",
            }
            write_json_atomic(out, record)
            print(f"training {info.name} ({args.dtype}, {args.config} config) data-parallel on {ctx.world_size} "
                  f"rank(s) ({ctx.backend}), {len(train_set)} images, batch {args.batch_size} per rank = "
                  f"{args.batch_size * ctx.world_size} global, {args.epochs} epoch(s); results -> {out}", flush=True)
        train_distributed(ctx, impl, ddp, train_set, test_set, record, args, lambda r: write_json_atomic(out, r))
        spread = parameter_spread(ctx, impl)
        if ctx.is_root:
            record["distributed"]["max_parameter_spread"] = spread
            record["status"] = "completed"
            write_json_atomic(out, record)
            if args.save_parameters:
                args.save_parameters.parent.mkdir(parents=True, exist_ok=True)
                temporary = args.save_parameters.with_name(f".{args.save_parameters.name}.tmp.npz")
                np.savez(temporary, **impl.parameters())
                os.replace(temporary, args.save_parameters)
            print(f"results written to {out}", flush=True)
        return 0
    except DataError as error:
        print(f"error: rank {ctx.rank if ctx else '?'}: {error}", file=sys.stderr, flush=True)
        return 2
    except Exception as error:  # includes TrainingDiverged, injected failures, collective errors, Terminated

        rank = ctx.rank if ctx else os.environ.get("RANK", "?")
        status = "stopped" if isinstance(error, TrainingDiverged) else "failed"
        if record is not None:
            record.update(status=status, message=f"rank {rank}: {describe(error)}")
            write_json_atomic(out, record)
        where = f"; the results up to the last epoch are in {out}" if record is not None else ""
        print(f"error: rank {rank} failed: {describe(error)}{where}", file=sys.stderr, flush=True)
        return 143 if isinstance(error, Terminated) else 1
    except KeyboardInterrupt:
        if record is not None:
            record.update(status="interrupted", message="interrupted by the user")
            write_json_atomic(out, record)
        return 130
    finally:
        shutdown(ctx)
        signal.signal(signal.SIGTERM, previous_handler)


# Scaling -------------------------------------------------------------------------------------------


def _timed_step(ctx: Context, impl, ddp, batch, sync: bool) -> float:
    """One DDP step (or one under no_sync(): no all-reduce), timed after a barrier that lines the ranks up."""
    dist.barrier(device_ids=[ctx.local_rank] if ctx.backend == "nccl" else None)
    impl.synchronize()
    start = time.perf_counter()
    if sync:
        ddp_train_step(ddp, impl, batch)
    else:
        with ddp.no_sync():
            ddp_train_step(ddp, impl, batch)
    impl.synchronize()
    return time.perf_counter() - start


def measure_scaling(ctx: Context, impl, ddp, config, per_rank: int, steps: int, warmup: int, seed: int) -> dict:
    """Median step time with and without the gradient all-reduce, and the median paired difference.

    Step i's time is the slowest rank's (the ranks start each step together, after a barrier); the
    all-reduce time is the median over i of (ordinary step i - no_sync step i): adjacent pairs, so that a
    drift in the machine's load cancels out.  The no_sync steps still update each rank's parameters from
    its own gradients, so the ranks' parameters drift apart during the measurement: harmless for timing
    (the work per step is the same), which is all this measures.
    """
    images, labels = synthetic_batch(config, per_rank, seed + ctx.rank)
    batch = impl.to_device(images, labels)
    for _ in range(warmup):
        _timed_step(ctx, impl, ddp, batch, sync=True)
        _timed_step(ctx, impl, ddp, batch, sync=False)
    times = torch.zeros(2, steps, dtype=torch.float64)
    for i in range(steps):  # interleaved
        times[0, i] = _timed_step(ctx, impl, ddp, batch, sync=True)
        times[1, i] = _timed_step(ctx, impl, ddp, batch, sync=False)
    times = times.to(ctx.device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank, step by step
    synced, local = times.cpu().tolist()
    step_seconds, compute_seconds = statistics.median(synced), statistics.median(local)
    allreduce_seconds = max(0.0, statistics.median(a - b for a, b in zip(synced, local)))
    global_batch = per_rank * ctx.world_size
    return {
        "world_size": ctx.world_size,
        "threads_per_rank": torch.get_num_threads(),
        "per_rank_batch_size": per_rank,
        "global_batch_size": global_batch,
        "steps": steps,
        "step_seconds": step_seconds,
        "images_per_second": global_batch / step_seconds,
        "allreduce_seconds": allreduce_seconds,
        "allreduce_share": allreduce_seconds / step_seconds,
        "no_sync_step_seconds": compute_seconds,
        "warmup_steps": warmup,
    }


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.distributed scaling-worker",
                                     description="one rank of the scaling measurement (started by `scaling`)")
    parser.add_argument("--impl", required=True)
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--per-rank-batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def worker_main(argv: list[str]) -> int:
    args = _worker_parser().parse_args(argv)
    ctx = None
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        info = torch_implementation(args.impl)
        if args.threads:
            from harness.threads import set_threads

            set_threads(args.threads)
        ctx = init_distributed(info, args.timeout_s)
        impl, ddp = build(info, get_config(args.config), args.dtype, ctx)
        run = measure_scaling(ctx, impl, ddp, get_config(args.config), args.per_rank_batch_size, args.steps,
                              args.warmup, args.seed)
        if ctx.is_root:
            write_json_atomic(args.out, run)
            print(f"world size {run['world_size']}: {run['step_seconds'] * 1e3:.1f} ms/step, "
                  f"{run['images_per_second']:.1f} images/s, all-reduce {run['allreduce_share']:.1%} of the step",
                  flush=True)
        return 0
    except Exception as error:
        rank = ctx.rank if ctx else os.environ.get("RANK", "?")
        print(f"error: rank {rank} failed: {describe(error)}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown(ctx)
        signal.signal(signal.SIGTERM, previous_handler)


def _scaling_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness.distributed scaling",
        description="time DDP steps for several world sizes on this machine (torchrun --standalone for each) "
                    "and write one results file")
    parser.add_argument("--impl", default="torch-vectorised", metavar="NAME")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], metavar="W")
    parser.add_argument("--threads", type=int,
                        help="CPU threads in total, split evenly over the ranks (default: all cores, "
                             f"{os.cpu_count()} here)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--global-batch-size", type=int,
                       help="strong scaling: the same global batch for every world size, W x (G / W) (default 64)")
    batch.add_argument("--per-rank-batch-size", type=int, help="weak scaling: the same batch on every rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind (with and without all-reduce)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    parser.add_argument("--out", type=Path, help="results file (default: results/distributed/<impl>_<config>_scaling.json)")
    return parser


def scaling_main(argv: list[str]) -> int:
    args = _scaling_parser().parse_args(argv)
    problem = check_at_least_one(args, ("threads", "global_batch_size", "per_rank_batch_size", "steps", "timeout_s"))
    if problem is None and (args.warmup < 0 or min(args.world_sizes) < 1):
        problem = "error: --warmup must be at least 0 and every world size at least 1"
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        info = torch_implementation(args.impl)
    except (registry.UnknownImplementationError, registry.UnavailableImplementationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    strong = args.per_rank_batch_size is None
    global_batch = args.global_batch_size or 64
    total_threads = args.threads or (os.cpu_count() or 1)
    plans = []
    for world_size in args.world_sizes:
        if strong and global_batch % world_size:
            print(f"error: the global batch {global_batch} does not split evenly over {world_size} ranks",
                  file=sys.stderr)
            return 2
        threads = max(1, total_threads // world_size) if info.device == "cpu" else args.threads
        plans.append((world_size, global_batch // world_size if strong else args.per_rank_batch_size, threads))
    out = args.out or SCALING_DIR / f"{info.name}_{args.config}_scaling.json"
    runs = []
    with tempfile.TemporaryDirectory(prefix="capsbench-scaling-") as folder:
        for world_size, per_rank, threads in plans:
            part = Path(folder) / f"w{world_size}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", str(world_size), "-m", "harness.distributed", "scaling-worker",
                       "--impl", info.name, "--config", args.config, "--dtype", args.dtype,
                       "--per-rank-batch-size", str(per_rank), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--seed", str(args.seed),
                       "--timeout-s", str(args.timeout_s), "--out", str(part)]
            env = dict(os.environ)
            if threads:
                command += ["--threads", str(threads)]
                env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            print(f"world size {world_size}: {per_rank} images per rank, "
                  f"{threads or 'default'} thread(s) per rank ...", flush=True)
            try:  # the ranks' own timeout ends a hang; this bounds torchrun itself (start-up, rendezvous)
                completed = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parent.parent,
                                           timeout=args.timeout_s + LAUNCH_GRACE_S * (args.steps + args.warmup))
            except subprocess.TimeoutExpired:
                print(f"error: the run with world size {world_size} did not finish in time; no results file written",
                      file=sys.stderr)
                return 1
            if completed.returncode != 0 or not part.is_file():
                print(f"error: the run with world size {world_size} failed (torchrun exit status "
                      f"{completed.returncode}); no results file written", file=sys.stderr)
                return 1
            runs.append(read_json(part))
    payload = {
        "kind": SCALING_KIND,
        "format_version": 1,
        "implementation": info.name,
        "backend": "nccl" if info.device == "cuda" else "gloo",
        "device": info.device,
        "config_name": args.config,
        "dtype": args.dtype,
        "scaling": "strong" if strong else "weak",
        "allreduce_measure": "exposed: median over adjacent pairs of (DDP step - the same step under no_sync()), "
                             "slowest rank, floored at 0",
        "data": "seeded synthetic batches, already on the device (no data loading)",
        "machine": machine_facts(),
        "runs": runs,
    }
    write_json_atomic(out, payload)
    print(format_scaling_table(payload))
    print(f"results written to {out}")
    return 0


def format_scaling_table(payload: dict) -> str:
    """Markdown table of a scaling results file, with the efficiency against linear scaling in compute
    (world size x threads per rank on the CPU, world size on GPUs) from the first row."""
    runs = payload["runs"]
    base = runs[0]

    def units(run):
        return run["world_size"] * (run["threads_per_rank"] if payload["device"] == "cpu" else 1)

    lines = ["| world size | threads/rank | global batch | step ms | images/s | all-reduce share | efficiency |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        ideal = base["images_per_second"] * units(run) / units(base)
        lines.append(f"| {run['world_size']} | {run['threads_per_rank']} | {run['global_batch_size']} | "
                     f"{run['step_seconds'] * 1e3:.0f} | {run['images_per_second']:.1f} | "
                     f"{run['allreduce_share']:.1%} | {run['images_per_second'] / ideal:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "scaling": scaling_main, "scaling-worker": worker_main}
    if not argv or argv[0] not in commands:
        asked = argv[:1] in (["-h"], ["--help"])
        print("usage: python -m harness.distributed {train,scaling} ...  (train runs under torchrun: "
              f"{TORCHRUN_EXAMPLE}; see the module docstring)", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
