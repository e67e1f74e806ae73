"""python -m harness.gpu_benchmark OUT_DIR (or ``capsbench gpu-benchmark``): everything capsbench measures on
a GPU machine, in one command, into one folder and one archive.

Run it in an environment that already has torch with CUDA, CuPy, nvidia-ml-py and asv (it installs and
downloads nothing), from a git checkout of this repository (asv names results by commit), with MNIST in
``$CAPSBENCH_DATA_DIR``.  The steps, in order, each timed and logged (``OUT_DIR/logs/<step>.log``):

1. ``facts``: the machine (GPU, driver, CUDA, library versions) and ``capsbench list``;
2. ``check``: ``harness.check`` of the CUDA implementations, small network in float32 and float64, paper
   network in float32;
3. ``suite``: the asv suite on the CUDA implementations only, in this environment (``--python=same``,
   the commit hash set), with the ``gpu`` profile, results into ``OUT_DIR/asv`` (and the facts beside);
4. ``profile``: ``harness.profile --device cuda`` at batch 128;
5. ``train``: one MNIST epoch of ``torch-vectorised-cuda`` and of ``cupy-vectorised``;
6. ``report``: ``harness.report`` of all of it, into ``OUT_DIR/report``;
7. ``archive``: one ``.tar.gz`` of ``OUT_DIR`` (framework traces left out if it would pass 16 MiB).

One line per step with its time; the first step that fails ends the run (exit status 1), keeping what the
earlier steps wrote.  Where no GPU can be used it ends at once with one line saying what is missing (exit
status 2).  ``capsbench keep --from OUT_DIR`` then copies the results into ``results/``.

``--device cpu --smoke`` runs the same steps on the CPU implementations with the small network, the
``smoke`` profile and a few hundred images: how the command itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import options, registry
from harness.data import DATA_DIR_ENV
from harness.environment import machine_facts
from harness.results import REPO_ROOT, write_json_atomic, write_text_atomic

ARCHIVE_LIMIT_BYTES = 16 * 2**20
GPU_TRAINING = ("torch-vectorised-cuda", "cupy-vectorised")
CPU_TRAINING = ("torch-vectorised", "numpy-vectorised")
# asv: a fixed number of samples per figure (and one round), so the time the suite takes is known
ASV_ATTRIBUTES = ("rounds=1", "repeat=5", "number=1", "warmup_time=0")
ASV_BENCHMARKS = "TrainStep|Forward|Backward|Routing|GpuMemory|CudaContext|GemmPeak|MachineFacts|Correctness"


class StepFailed(RuntimeError):
    """A step that did not succeed; the message is its one line."""


def gpu_problem() -> str | None:
    """None where a CUDA implementation and NVML can run here, else what is missing, in one line."""
    from harness.memory import nvml_status

    reasons = [f"{info.name}: {info.availability().reason}" for info in registry.entries() if info.device == "cuda"]
    if not registry.available("cuda"):
        return "no usable GPU: " + ("; ".join(reasons[:2]) if reasons else "no CUDA implementation is registered")
    nvml = nvml_status()
    return f"NVML cannot be used ({nvml}): the GPU memory figures need it" if nvml else None


@dataclass
class Plan:
    """What the steps run with: the device, the implementations, sizes, and where everything goes."""

    out: Path
    device: str
    implementations: list[str]
    training: list[str]
    smoke: bool
    data_dir: str | None
    machine: str

    @property
    def logs(self) -> Path:
        return self.out / "logs"


def run_logged(plan: Plan, step: str, command: list[str], env: dict | None = None) -> str:
    """Run ``command`` (a Python module of this repository, or asv) with its output in the step's log;
    StepFailed with the command's last error line when it fails."""
    plan.logs.mkdir(parents=True, exist_ok=True)
    log = plan.logs / f"{step}.log"
    with open(log, "a", encoding="utf-8") as stream:
        stream.write(f"$ {' '.join(command)}\n")
        stream.flush()
        completed = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, stdout=stream,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    if completed.returncode != 0:
        lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        raise StepFailed(f"{' '.join(command[:4])} ... exited {completed.returncode}: {last.strip()[:300]} "
                         f"(log: {log})")
    return log.read_text(encoding="utf-8")


def module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


# The steps ----------------------------------------------------------------------------------------------------


def step_facts(plan: Plan) -> None:
    from harness.__main__ import list_implementations
    from harness.threads import thread_facts

    write_json_atomic(plan.out / "facts.json", {**machine_facts(), "threads": thread_facts()})
    write_text_atomic(plan.out / "list.txt", list_implementations() + "\n")


def step_check(plan: Plan) -> None:
    impls = ["--impl", *plan.implementations]
    run_logged(plan, "check", module("harness.check", *impls, "--config", "small"))
    if not plan.smoke:
        run_logged(plan, "check", module("harness.check", *impls, "--config", "paper", "--dtype", "float32"))


def asv_config(plan: Plan) -> Path:
    """A copy of asv.conf.json whose results go to OUT_DIR/asv (the repository's own stay untouched)."""
    lines = (REPO_ROOT / "asv.conf.json").read_text(encoding="utf-8").splitlines()
    conf = json.loads("\n".join(line for line in lines if not line.strip().startswith("//")))
    conf.update(repo=str(REPO_ROOT), benchmark_dir=str(REPO_ROOT / "benchmarks"), results_dir=str(plan.out / "asv"),
                env_dir=str(plan.out / "asv-env"), html_dir=str(plan.out / "asv-html"))
    path = plan.out / "asv.conf.json"
    path.write_text(json.dumps(conf, indent=1), encoding="utf-8")
    return path


def head_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise StepFailed("asv names results by commit, and this is not a git checkout: run from a clone of the "
                         "repository (with its .git)") from None


def step_suite(plan: Plan) -> None:
    config, commit = asv_config(plan), head_commit()
    env = {"CAPSBENCH_PROFILE": "smoke" if plan.smoke else "gpu",
           "CAPSBENCH_IMPLEMENTATIONS": ",".join(plan.implementations), "CAPSBENCH_ASV_COMMIT": commit,
           "CAPSBENCH_ASV_CONFIG": str(config), "CAPSBENCH_ASV_MACHINE": plan.machine}
    run_logged(plan, "suite", ["asv", "machine", "--yes", "--machine", plan.machine, "--config", str(config)], env)
    attributes = [argument for pair in ASV_ATTRIBUTES for argument in ("-a", pair)]
    run_logged(plan, "suite", ["asv", "run", "--config", str(config), "--python=same", "--set-commit-hash", commit,
                               "--machine", plan.machine, "--launch-method", "forkserver", "--bench", ASV_BENCHMARKS,
                               *attributes, "--show-stderr"], env)


def step_profile(plan: Plan) -> None:
    sizes = ["--config", "small", "--batch-size", "8", "--steps", "2", "--gemm-size", "256"] if plan.smoke else \
        ["--batch-size", "128", "--steps", "5"]
    run_logged(plan, "profile", module("harness.profile", "--impl", *plan.implementations, *sizes,
                                       "--out", str(plan.out / "profile")))


def step_train(plan: Plan) -> None:
    data = ["--data-dir", plan.data_dir] if plan.data_dir else []
    sizes = ["--config", "small", "--limit", "256", "--test-limit", "200"] if plan.smoke else []
    for name in plan.training:
        run_logged(plan, "train", module("harness.train", "--impl", name, *data, "--epochs", "1", "--batch-size",
                                         "128", *sizes, "--out", str(plan.out / "training" / f"{name}_epoch1.json")))


def step_report(plan: Plan) -> None:
    run_logged(plan, "report", module("harness.report", "--results", str(plan.out), "--out",
                                      str(plan.out / "report")))


def archive(plan: Plan, path: Path) -> Path:
    """``OUT_DIR`` as one .tar.gz (without the asv environment); without the framework traces if the
    whole would pass the 16 MiB a results transfer allows; StepFailed if even that is too large."""
    def pack(skip_traces: bool) -> int:
        temporary = path.with_name(f".{path.name}.tmp")
        with tarfile.open(temporary, "w:gz") as tar:
            for item in sorted(plan.out.rglob("*")):
                relative = item.relative_to(plan.out)
                if not item.is_file() or relative.parts[0] in ("asv-env", "asv-html") or item == path:
                    continue
                if skip_traces and "traces" in relative.parts:
                    continue
                tar.add(item, arcname=str(Path(plan.out.name) / relative))
        os.replace(temporary, path)
        return path.stat().st_size

    path.parent.mkdir(parents=True, exist_ok=True)
    if pack(skip_traces=False) > ARCHIVE_LIMIT_BYTES and pack(skip_traces=True) > ARCHIVE_LIMIT_BYTES:
        raise StepFailed(f"{path} is {path.stat().st_size / 2**20:.1f} MiB even without traces, over 16 MiB")
    return path


STEPS = ("facts", "check", "suite", "profile", "train", "report", "archive")


def default_actions(archive_path: Path) -> dict:
    return {"facts": step_facts, "check": step_check, "suite": step_suite, "profile": step_profile,
            "train": step_train, "report": step_report, "archive": lambda plan: archive(plan, archive_path)}


def run_steps(plan: Plan, archive_path: Path, actions: dict | None = None, stream=sys.stdout) -> int:
    """Every step in order, a line each; the first failure ends the run (status 1)."""
    actions = actions or default_actions(archive_path)
    total = time.perf_counter()
    timings = {}
    for number, name in enumerate(STEPS, start=1):
        start = time.perf_counter()
        try:
            actions[name](plan)
        except StepFailed as error:
            print(f"step {number}/{len(STEPS)} {name}: FAILED after {time.perf_counter() - start:.1f} s: {error}",
                  file=stream, flush=True)
            write_json_atomic(plan.out / "steps.json", {"steps": timings, "failed": name, "reason": str(error)})
            return 1
        timings[name] = time.perf_counter() - start
        print(f"step {number}/{len(STEPS)} {name}: ok in {timings[name]:.1f} s", file=stream, flush=True)
        write_json_atomic(plan.out / "steps.json", {"steps": timings})
    print(f"all {len(STEPS)} steps in {time.perf_counter() - total:.1f} s; archive: {archive_path}", file=stream)
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.gpu_benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="folder for everything the run writes")
    parser.add_argument("--archive", type=Path, help="the archive (default: OUT_DIR.tar.gz, beside OUT_DIR)")
    options.add_device(parser, default="cuda",
                       help="cuda (default); cpu runs the same steps on the CPU implementations, to test it")
    parser.add_argument("--smoke", action="store_true",
                        help="small network, the smoke asv profile, a few hundred images (tests; default: off)")
    options.add_impl(parser, several=True, help="only these implementations",
                     default_help="every one on the device that can run here")
    options.add_data_dir(parser, help="MNIST folder")
    parser.add_argument("--machine", help="asv machine name (default: gpu-<GPU name>, or the host name on a CPU)")
    return parser


def machine_name(device: str) -> str:
    facts = machine_facts()
    gpu = facts.get("gpu") or {}
    name = f"gpu-{gpu['name']}" if device == "cuda" and gpu.get("available") else facts["hostname"]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.device == "cuda":
        problem = gpu_problem()
        if problem:
            print(f"error: {problem}; nothing was run", file=sys.stderr)
            return 2
    implementations = registry.available(args.device)
    unknown = sorted(set(args.impl or []) - set(implementations))
    if unknown:
        print(f"error: {', '.join(unknown)}: not an implementation on {args.device} that can run here (those: "
              f"{', '.join(implementations) or 'none'})", file=sys.stderr)
        return 2
    implementations = args.impl or implementations
    if not implementations:
        print(f"error: no implementation on {args.device} can run here", file=sys.stderr)
        return 2
    training = [name for name in (GPU_TRAINING if args.device == "cuda" else CPU_TRAINING) if name in implementations]
    plan = Plan(args.out.resolve(), args.device, implementations, training, args.smoke,
                args.data_dir or os.environ.get(DATA_DIR_ENV), args.machine or machine_name(args.device))
    plan.out.mkdir(parents=True, exist_ok=True)
    archive_path = (args.archive or plan.out.with_name(plan.out.name + ".tar.gz")).resolve()
    print(f"capsbench on {args.device}: {len(implementations)} implementation(s) ({', '.join(implementations)}); "
          f"machine {plan.machine}; output {plan.out}", flush=True)
    return run_steps(plan, archive_path)


if __name__ == "__main__":
    sys.exit(main())
