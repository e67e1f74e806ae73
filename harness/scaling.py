"""python -m harness.scaling: how data-parallel training (:mod:`harness.distributed`) scales with the ranks.

For each world size W, torchrun starts W ranks on one machine, each with ``--threads / W`` CPU threads,
that time DDP steps on seeded synthetic batches (no data loading), and ONE results file
(kind ``capsbench-distributed-scaling``, read by the report) holds a row per world size: median step
time, images/s and the all-reduce share of the step.  ``--global-batch-size G`` keeps the global batch
fixed (strong scaling: the per-rank batch is G / W); ``--per-rank-batch-size B`` keeps the per-rank batch
fixed (weak scaling: the global batch is W x B).  ``--routing-algorithm`` chooses the network's routing
(dynamic by default; the results file records it, and an implementation that does not compute it is refused).

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


Scaling efficiency has one meaning, :func:`harness.measure.scaling.scaling_efficiency`, for the table printed
here and for the report: the speed-up over the smallest world size divided by the growth of the compute used, which is
ranks x threads per rank on the CPU (so splitting two cores over two ranks is judged against the two
cores, not against twice the cores) and ranks on GPUs.  A single rank has no all-reduce: its share is
None, not 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import cli, options
from harness.data import synthetic_batch
from harness.errors import EXIT_FAILURE, UserError
from harness.measure.machine import machine_facts
from harness.measure.scaling import MIN_RELIABLE_STEPS, efficiency_caveat, exposed_allreduce, scaling_efficiency
from harness.options import positive_int
from harness.results import SCALING_KIND, read_json, unwritable_line, writable_folder, write_json_atomic
from harness.settings import RUNS_DIR, SCALING_SUBDIR
from harness.spec import DEFAULT_ROUTING_ALGORITHM, get_config
from harness.threads import usable_cpu_count

DEFAULT_TIMEOUT_S = 600.0
LAUNCH_GRACE_S = 60.0  # per timed or warm-up step, beyond the process-group timeout, before torchrun is stopped
DEFAULT_GLOBAL_BATCH = 64



def _timed_step(ctx, impl, ddp, batch, sync: bool) -> float:
    """One DDP step (or one under no_sync(): no all-reduce), timed after a barrier that lines the ranks up."""
    from harness.training.ddp import ddp_train_step, dist

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


def measure_scaling(ctx, impl, ddp, config, per_rank: int, steps: int, warmup: int, seed: int) -> dict:
    """Median step time with and without the gradient all-reduce, and the median paired difference.

    Step i's time is the slowest rank's (the ranks start each step together, after a barrier); the
    all-reduce time is the median over i of (ordinary step i - no_sync step i): adjacent pairs, so that a
    drift in the machine's load cancels out.  The no_sync steps still update each rank's parameters from
    its own gradients, so the ranks' parameters drift apart during the measurement: harmless for timing
    (the work per step is the same), which is all this measures.  One rank has nothing to all-reduce: it
    times ordinary steps only, and its all-reduce figures are None.
    """
    import torch

    from harness.training.ddp import dist

    paired = ctx.world_size > 1
    images, labels = synthetic_batch(config, per_rank, seed + ctx.rank)
    batch = impl.to_device(images, labels)
    for _ in range(warmup):
        _timed_step(ctx, impl, ddp, batch, sync=True)
        if paired:
            _timed_step(ctx, impl, ddp, batch, sync=False)
    times = torch.zeros(2, steps, dtype=torch.float64)
    for i in range(steps):  # interleaved
        times[0, i] = _timed_step(ctx, impl, ddp, batch, sync=True)
        if paired:
            times[1, i] = _timed_step(ctx, impl, ddp, batch, sync=False)
    times = times.to(ctx.device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank, step by step
    synced, local = times.cpu().tolist()
    return run_figures(synced, local if paired else None, ctx.world_size, torch.get_num_threads(), per_rank, warmup)


def run_figures(synced: list[float], local: list[float] | None, world_size: int, threads: int, per_rank: int,
                warmup: int) -> dict:
    """One world size's row of the results file from the slowest rank's step times: ``synced`` the
    ordinary DDP steps, ``local`` the paired no_sync() steps (None for one rank, which has no all-reduce)."""
    step_seconds = statistics.median(synced)
    q25, q75 = (statistics.quantiles(synced, n=4)[::2] if len(synced) > 1 else (step_seconds, step_seconds))
    paired = local is not None
    allreduce_seconds = exposed_allreduce(synced, local) if paired else None
    global_batch = per_rank * world_size
    return {
        "world_size": world_size,
        "threads_per_rank": threads,
        "per_rank_batch_size": per_rank,
        "global_batch_size": global_batch,
        "steps": len(synced),
        "step_seconds": step_seconds,
        "step_seconds_q25": q25,
        "step_seconds_q75": q75,
        "images_per_second": global_batch / step_seconds,
        "allreduce_seconds": allreduce_seconds,
        "allreduce_share": allreduce_seconds / step_seconds if paired else None,
        "no_sync_step_seconds": statistics.median(local) if paired else None,
        "warmup_steps": warmup,
    }


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=cli.prog("scaling", "worker"),
                                     description="One rank of the scaling measurement (started by `scaling` under "
                                                 "torchrun, not by hand).")
    options.add_impl(parser, several=False, required=True, help="the torch implementation measured")
    options.add_config(parser, required=True)
    options.add_routing_algorithm(parser)
    options.add_dtype(parser)
    parser.add_argument("--per-rank-batch-size", type=positive_int, required=True, help="images per step on each rank")
    options.add_steps(parser, required=True, help="timed steps of each kind")
    options.add_warmup(parser, required=True, help="untimed steps of each kind first")
    options.add_threads(parser, required=True, help="CPU threads of this rank")
    options.add_seed(parser, help="seed of the synthetic batches")
    options.add_timeout(parser, default=DEFAULT_TIMEOUT_S, help="process-group timeout")
    options.add_out(parser, required=True, help="where rank 0 writes the measurement")
    return parser


def worker_main(argv: list[str]) -> int:
    """One rank: join the group, time the steps, rank 0 writes its part of the results."""
    import signal

    from harness.threads import set_threads
    from harness.training.ddp import (
        build,
        describe,
        init_distributed,
        leave_together,
        raise_terminated,
        shutdown,
        torch_implementation,
    )

    args = _worker_parser().parse_args(argv)
    ctx = None
    previous_handler = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        info = torch_implementation(args.impl)
        set_threads(args.threads)
        ctx = init_distributed(info, args.timeout_s)
        config = get_config(args.config).replace(routing_algorithm=args.routing_algorithm)
        impl, ddp = build(info, config, args.dtype, ctx)
        run = measure_scaling(ctx, impl, ddp, config, args.per_rank_batch_size, args.steps, args.warmup, args.seed)
        if ctx.is_root:
            write_json_atomic(args.out, run)
            share = "no all-reduce" if run["allreduce_share"] is None else \
                f"all-reduce {run['allreduce_share']:.1%} of the step"
            print(f"world size {run['world_size']}: {run['step_seconds'] * 1e3:.1f} ms/step, "
                  f"{run['images_per_second']:.1f} images/s, {share}", flush=True)
        leave_together(ctx)
        return 0
    except Exception as error:
        rank = ctx.rank if ctx else os.environ.get("RANK", "?")
        print(f"error: rank {rank} failed: {describe(error)}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown(ctx)
        signal.signal(signal.SIGTERM, previous_handler)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=cli.prog("scaling"),
        description="Time data-parallel (DDP) steps for several world sizes on this machine (torchrun "
                    "--standalone for each) and write one results file.")
    options.add_impl(parser, several=False, default="torch-vectorised", help="a torch implementation")
    parser.add_argument("--world-sizes", type=positive_int, nargs="+", default=[1, 2], metavar="W",
                        help="the numbers of ranks to measure (default: 1 2)")
    options.add_threads(parser, help="CPU threads in total, split evenly over the ranks",
                        default_help=f"the CPUs this process may use, {usable_cpu_count()} here")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--global-batch-size", type=positive_int,
                       help="strong scaling: the same global batch for every world size, split over the ranks "
                            f"(default: {DEFAULT_GLOBAL_BATCH})")
    batch.add_argument("--per-rank-batch-size", type=positive_int,
                       help="weak scaling: the same batch on every rank (default: strong scaling)")
    options.add_steps(parser, default=10, help="timed steps of each kind, with and without all-reduce")
    options.add_warmup(parser, default=2, help="untimed steps of each kind first")
    options.add_config(parser)
    options.add_routing_algorithm(parser, consequence="an implementation that does not compute it is refused")
    options.add_dtype(parser)
    options.add_seed(parser, help="seed of the synthetic batches")
    options.add_timeout(parser, default=DEFAULT_TIMEOUT_S, help="process-group timeout of the ranks")
    options.add_out(parser, help=f"results file (default: runs/{SCALING_SUBDIR}/<impl>_<config>_scaling.json, "
                                 "<impl>-<algorithm>_... for a routing algorithm other than dynamic)")
    return parser


def scaling_record(info, args: argparse.Namespace, strong: bool, runs: list[dict]) -> dict:
    """The scaling results file: what was measured, how each figure is defined, the machine, and one run
    per world size (as its rank 0 wrote it)."""
    return {
        "kind": SCALING_KIND,
        "format_version": 2,
        "implementation": info.name,
        **info.describe(),
        "backend": "nccl" if info.device == "cuda" else "gloo",
        "config_name": args.config,
        "routing_algorithm": args.routing_algorithm,
        "dtype": args.dtype,
        "scaling": "strong" if strong else "weak",
        "allreduce_measure": "exposed: median over adjacent pairs of (DDP step - the same step under no_sync()), "
                             "slowest rank, floored at 0; none for one rank",
        "efficiency": "speed-up over the smallest world size / growth of the compute used (CPU: ranks x threads "
                      "per rank; GPU: ranks)",
        "data": "seeded synthetic batches, already on the device (no data loading)",
        "machine": machine_facts(),
        "runs": runs,
    }


def world_size_plans(world_sizes: list[int], global_batch: int | None, per_rank_batch: int | None,
                     total_threads: int, device: str) -> list[tuple[int, int, int]]:
    """(world size, images per rank, threads per rank) of each run: strong scaling (``global_batch`` given)
    splits the global batch over the ranks, weak scaling gives every rank ``per_rank_batch``; on the CPU the
    threads are split over the ranks (at least one each), on GPUs every rank keeps them.  ValueError names a
    global batch that does not split evenly."""
    plans = []
    for world_size in world_sizes:
        if global_batch is not None and global_batch % world_size:
            raise ValueError(f"the global batch {global_batch} does not split evenly over {world_size} ranks")
        threads = max(1, total_threads // world_size) if device == "cpu" else total_threads
        plans.append((world_size, global_batch // world_size if global_batch is not None else per_rank_batch,
                      threads))
    return plans


def scaling_main(argv: list[str]) -> int:
    from harness.training.ddp import torch_implementation
    from harness.training.loop import require_computes, routing_suffix

    args = parser().parse_args(argv)
    info = torch_implementation(args.impl)
    require_computes(info, get_config(args.config).replace(routing_algorithm=args.routing_algorithm))
    strong = args.per_rank_batch_size is None
    global_batch = args.global_batch_size or DEFAULT_GLOBAL_BATCH
    try:
        plans = world_size_plans(args.world_sizes, global_batch if strong else None, args.per_rank_batch_size,
                                 args.threads or usable_cpu_count(), info.device)
    except ValueError as error:
        raise UserError(str(error)) from None
    out = args.out or RUNS_DIR / SCALING_SUBDIR / f"{info.name}{routing_suffix(args)}_{args.config}_scaling.json"
    try:
        writable_folder(Path(out).parent)
    except OSError as error:
        raise UserError(unwritable_line(Path(out).parent, error)) from None
    batch = f"global batch {global_batch}" if strong else f"{args.per_rank_batch_size} images per rank"
    routing = "" if args.routing_algorithm == DEFAULT_ROUTING_ALGORITHM else \
        f", routing algorithm {args.routing_algorithm}"
    print(f"scaling of {info.name} ({args.dtype}, {args.config} network{routing}, "
          f"{'strong' if strong else 'weak'} scaling, "
          f"{batch} of seeded synthetic images) over world sizes {' '.join(map(str, args.world_sizes))}, "
          f"{args.steps} timed steps each; results -> {out}", flush=True)
    if args.steps < MIN_RELIABLE_STEPS:
        print(f"warning: {args.steps} timed steps are fewer than the {MIN_RELIABLE_STEPS} a reliable efficiency "
              "needs (--steps)", file=sys.stderr, flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="capsbench-scaling-") as folder:
        for world_size, per_rank, threads in plans:
            part = Path(folder) / f"w{world_size}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", str(world_size), "-m", "harness.scaling", "worker",
                       "--impl", info.name, "--config", args.config, "--routing-algorithm", args.routing_algorithm,
                       "--dtype", args.dtype,
                       "--per-rank-batch-size", str(per_rank), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--seed", str(args.seed), "--threads", str(threads),
                       "--timeout-s", str(args.timeout_s), "--out", str(part)]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            print(f"world size {world_size}: {per_rank} images per rank, {threads} thread(s) per rank ...", flush=True)
            try:  # the ranks' own timeout ends a hang; this bounds torchrun itself (start-up, rendezvous)
                completed = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parent.parent,
                                           timeout=args.timeout_s + LAUNCH_GRACE_S * (args.steps + args.warmup))
            except subprocess.TimeoutExpired:
                raise UserError(f"the run with world size {world_size} did not finish in time; no results file "
                                "written", EXIT_FAILURE) from None
            if completed.returncode != 0 or not part.is_file():
                raise UserError(f"the run with world size {world_size} failed (torchrun exit status "
                                f"{completed.returncode}); no results file written", EXIT_FAILURE)
            runs.append(read_json(part))
    payload = scaling_record(info, args, strong, runs)
    write_json_atomic(out, payload)
    print(format_scaling_table(payload))
    print(f"results written to {out}")
    return 0


def format_scaling_table(payload: dict) -> str:
    """Markdown table of a scaling results file, efficiency from :func:`scaling_efficiency` against the
    smallest world size."""
    runs = sorted(payload["runs"], key=lambda run: run["world_size"])
    base = runs[0]
    lines = ["| world size | threads/rank | global batch | step ms | images/s | all-reduce share | efficiency |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        share = "—" if run["allreduce_share"] is None else f"{run['allreduce_share']:.1%}"
        lines.append(f"| {run['world_size']} | {run['threads_per_rank']} | {run['global_batch_size']} | "
                     f"{run['step_seconds'] * 1e3:.0f} | {run['images_per_second']:.1f} | {share} | "
                     f"{scaling_efficiency(run, base, payload['device']):.0%} |")
    caveats = [(run["world_size"], efficiency_caveat(run, base, payload["device"])) for run in runs]
    lines += [f"Efficiency at world size {size} is not reliable: {caveat}." for size, caveat in caveats if caveat]
    return "\n".join(lines)


@cli.command
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    return scaling_main(argv)


if __name__ == "__main__":
    sys.exit(main())
