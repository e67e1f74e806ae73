"""python -m harness.gpu_benchmark OUT_DIR --budget SECONDS (or ``capsbench gpu-benchmark``): everything capsbench
measures on a GPU machine, within one short lease, into one folder and one archive that survive any failure.

A GPU lease is short (one command at most 10 minutes), so the run is a list of stages in order of value,
each with an estimate made from measured per-process costs (:data:`COSTS`, docs/gpu-machines.md):

1. ``facts``: the machine (GPU, driver, CUDA, libraries), ``capsbench list``, what is missing;
2. ``parity``: ``harness.check`` of each implementation in a process of its own (one crash hides nothing),
   small network float32, then paper network float32 (a few at once: parity does not depend on timing);
3. ``gpu-tests``: the test files that only a GPU exercises;
4. ``suite``: the asv phases and GPU memory of the eager implementations on a grid sized to fit;
5. ``suite-compiled``: the same for the compiling ones (torch.compile, CUDA graphs), their persistent
   compile caches (TorchInductor's, CuPy's) in ``OUT_DIR/compile-cache`` so a later process reuses them;
6. ``profile``: ``harness.profile`` of the implementations that passed parity, at batch 128;
7. ``report``: ``harness.report`` of all of it;
8. ``archive``: one ``.tar.gz`` of ``OUT_DIR`` (traces left out past 16 MiB).

Before each stage one line gives its estimate and the budget left; a stage that cannot fit (with the report
and archive still to come) is skipped with that reason.  Each stage runs its commands under a cap (a few
times its estimate, never past the budget): a stage that hangs is killed at its cap, one that fails is
recorded with its log's last line, and the run goes on.  ``steps.json`` (and its copy beside the archive)
and the archive are rewritten after every stage, so a run killed at the lease's end (SIGKILL) still leaves
everything done before.  Up front, one line for each thing missing (asv, MNIST, pandas/matplotlib, NVML);
without asv the suite stages are skipped and the rest runs.  Exit status: 0 when no stage failed, 1 when one
did (the archive is written either way), 2 when nothing could run.

Without ``--impl``, the looped variants of the compiling implementations are left out (the costliest
first, only as far as needed) until the estimate fits the budget; the run names them (``left_out`` in
``steps.json``) for a later lease.

``--stage accuracy`` is the second command: the paper's recipe (``--schedule paper``, batch 128, shifts) on
the fastest implementation that passed parity in the first command's run (``--from`` its folder or archive),
for as many epochs as the budget allows (at most 30), resumable (a results file already in ``OUT_DIR`` is
continued), then its report and archive.

``--device cpu --smoke`` runs the same stages on the CPU implementations with the small network, the smoke
asv profile and a few hundred images: how the command itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from harness import cli, options, registry
from harness.errors import UserError
from harness.results import PROFILE_CSV, write_json_atomic, write_text_atomic
from harness.settings import (
    ASV_COMMIT_ENV,
    ASV_CONFIG_ENV,
    ASV_MACHINE_ENV,
    DATA_DIR_ENV,
    IMPLEMENTATIONS_ENV,
    PROFILE_ENV,
    REPO_ROOT,
    THREADS_ENV,
)

ARCHIVE_LIMIT_BYTES = 16 * 2**20
DEFAULT_BUDGET_S = 540.0  # one 10-minute device command, less a minute for start-up and transfers
CAP_FACTOR = 1.5  # a stage is killed at this many times its estimate (never past the budget): an overrun
# eats the later stages' time
CAP_MINIMUM_S = 60.0
# asv: a fixed number of samples per figure (and one round), so the time the suite takes is known
ASV_ATTRIBUTES = ("rounds=1", "repeat=5", "number=1", "warmup_time=0")
GPU_TESTS = ("tests/test_contract.py", "tests/test_cupy_fused.py", "tests/test_torch_cuda_graph.py",
             "tests/test_cupy_capsnet.py", "tests/test_memory.py")
CPU_TESTS = ("tests/test_memory.py",)  # --device cpu: the stage itself tested, on a fast file
# the GPU implementations' tests only (their names carry cuda or cupy; NVML's): the CPU ones ran in CI
GPU_TESTS_SELECTION = "cuda or cupy or nvml"
ACCURACY_EPOCHS = 30  # the paper's figure, 99.6 % or more, needs about 30 epochs
ACCURACY_RESULTS = "training/accuracy.json"


class StageFailed(RuntimeError):
    """A stage that did not succeed; the message is its one line."""


class StageTimedOut(StageFailed):
    """A stage killed at its cap."""


# What the estimates are made of ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """Seconds one unit of work takes on a device: what each figure of :data:`COSTS` is, where it comes from
    and how the plan adds them up are in docs/gpu-machines.md ("The arithmetic")."""

    facts_s: float  # machine facts and the list (imports every framework)
    check_s: dict  # one harness.check process of one implementation, by network size
    compile_s: float  # what torch.compile adds to one check process (it compiles 3 times)
    capture_s: float  # what CUDA-graph capture adds to one check process
    parallel: int  # parity processes at once
    tests_s: float  # the GPU-only test files
    asv_discovery_s: float  # asv importing the suite once per asv run
    asv_point_s: float  # one timed grid point: a forked process, the model built and warmed up, 5 samples
    asv_skip_s: float  # one grid point that only reads the memory stage's cache or skips
    asv_compile_s: float  # what torch.compile adds to one timed grid point (the persistent cache warm or not)
    memory_impl_s: float  # one implementation's memory grid in its fresh process (start, build, steps)
    profile_impl_s: float  # one implementation in harness.profile
    report_s: float
    archive_s: float
    epoch_s: float  # one paper-recipe MNIST epoch of the fastest implementation, evaluation included


COSTS = {
    # an H200 behind 16 cores (docs/gpu-machines.md: the CPU's figures with CUDA's start-up added)
    "cuda": Costs(facts_s=10, check_s={"small": 10, "paper": 15}, compile_s=30, capture_s=5, parallel=6,
                  tests_s=60, asv_discovery_s=10, asv_point_s=2.5, asv_skip_s=0.5, asv_compile_s=30,
                  memory_impl_s=8, profile_impl_s=4, report_s=20, archive_s=5, epoch_s=12),
    # this repository's CI machine (2 shared cores, loaded), smoke sizes (docs/gpu-machines.md)
    "cpu": Costs(facts_s=10, check_s={"small": 45, "paper": 120}, compile_s=60, capture_s=10, parallel=1,
                 tests_s=10, asv_discovery_s=90, asv_point_s=1.5, asv_skip_s=0.5, asv_compile_s=60,
                 memory_impl_s=10, profile_impl_s=15, report_s=30, archive_s=2, epoch_s=45),
}

# The suite's grid on a lease: the whole training step at every batch of the profile; GPU memory at every
# batch (measured once per implementation in its own process, then read by one light process per figure)
SUITE_TIMED = ("bench_phases.TrainStep.time_train_step",)
SUITE_MEMORY = ("bench_memory.GpuMemory.track_gpu_memory_nvml", "bench_memory.GpuMemory.track_gpu_memory_nvml_increase",
                "bench_memory.GpuMemory.track_gpu_memory_allocator_live",
                "bench_memory.GpuMemory.track_gpu_memory_allocator_reserved")
SUITE_ONCE = ("bench_memory.CudaContext", "bench_peak.GemmPeak", "bench_environment.MachineFacts")


def compile_cost(costs: Costs, name: str, compile_s: float) -> float:
    """What compiling or capturing adds to one process of ``name`` (0 for an eager implementation)."""
    if not registry.get(name).cls.first_call_compiles:
        return 0.0
    return costs.capture_s if "graph" in name else compile_s


# The plan ----------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the stages run with: the device, the implementations, sizes, the budget, where everything goes."""

    out: Path
    device: str
    implementations: list[str]
    smoke: bool
    data_dir: str | None
    machine: str
    budget_s: float = DEFAULT_BUDGET_S
    archive_path: Path | None = None
    missing: dict = field(default_factory=dict)  # thing -> one line
    left_out: list = field(default_factory=list)  # the default selection's names dropped to fit the budget
    started: float = field(default_factory=time.monotonic)

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def costs(self) -> Costs:
        return COSTS[self.device]

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    @property
    def compiling(self) -> list[str]:
        return [name for name in self.implementations if registry.get(name).cls.first_call_compiles]

    @property
    def eager(self) -> list[str]:
        return [name for name in self.implementations if name not in self.compiling]

    def profile(self, compiling: bool = False) -> str:
        """The asv profile of a suite stage: the compiling implementations at one batch size."""
        return "smoke" if self.smoke else "gpu-compiled" if compiling else "gpu"

    def batch_sizes(self, compiling: bool = False) -> list[int]:
        from harness.suite.sizes import load_suite_profile

        return load_suite_profile(self.profile(compiling))[1]["batch_sizes"]


@dataclass
class Stage:
    """One stage: its name, its estimate (seconds), what it does, and why it cannot run (None: it can)."""

    name: str
    estimate_s: float
    action: Callable
    blocked: str | None = None


# Running commands under a cap ------------------------------------------------------------------------------


def last_line(text: str) -> str:
    """The line that says what went wrong: the last one naming an error, else the last one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = (line for line in reversed(lines) if "error" in line.lower() and "skipped" not in line)  # asv's skips
    return next(errors, lines[-1] if lines else "")[:300]


class Runner:
    """Runs a stage's commands with their output in the stage's log, each killed (its whole process group)
    when the stage's deadline passes."""

    def __init__(self, plan: Plan, stage: str, deadline: float) -> None:
        self.plan, self.stage, self.deadline = plan, stage, deadline
        plan.logs.mkdir(parents=True, exist_ok=True)
        self.log = plan.logs / f"{stage}.log"

    def run(self, command: list[str], env: dict | None = None, check: bool = True, log: Path | None = None,
            cap_s: float | None = None) -> int:
        """The command's exit status; StageFailed (with the log's last line) when it fails and ``check``;
        StageTimedOut when it passes the stage's deadline (or its own ``cap_s``)."""
        log = log or self.log
        timeout = self.deadline - time.monotonic()
        timeout = min(timeout, cap_s) if cap_s else timeout
        with open(log, "a", encoding="utf-8") as stream:
            stream.write(f"$ {' '.join(command)}\n")
            stream.flush()
            env = {**os.environ, **compile_caches(self.plan), **(env or {})}
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=stream,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                       start_new_session=True)
            try:
                status = process.wait(timeout=max(timeout, 0.1))
            except subprocess.TimeoutExpired:
                kill_group(process)
                stream.write(f"killed after {timeout:.0f} s, at the stage's cap\n")
                raise StageTimedOut(f"killed at its cap ({timeout:.0f} s left of it): "
                                    f"{' '.join(command[:4])} ...; last line: {tail(log)}") from None
            except BaseException:
                kill_group(process)
                raise
        if status != 0 and check:
            raise StageFailed(f"{' '.join(command[:4])} ... exited {status}: {tail(log)} (log: {log.name})")
        return status


def compile_caches(plan: Plan) -> dict:
    """The frameworks' persistent compile caches in OUT_DIR/compile-cache, for every command of the run: a
    shape one process compiled (TorchInductor's FX graph and kernels, CuPy's NVRTC modules), a later one
    loads."""
    cache = plan.out / "compile-cache"
    return {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
            "CUPY_CACHE_DIR": str(cache / "cupy")}


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def tail(log: Path) -> str:
    return last_line(log.read_text(encoding="utf-8", errors="replace")) if log.exists() else ""


def module(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", name, *args]


# What is missing ---------------------------------------------------------------------------------------------


def asv_problem() -> str | None:
    if importlib.util.find_spec("asv") is None:
        return ("asv is not installed: the suite stages are skipped (carry its wheels, docs/gpu-machines.md, "
                "and put them on PYTHONPATH)")
    return None


def mnist_problem(data_dir: str | None) -> str | None:
    """None where the four MNIST files are found, else the data module's one line."""
    from harness.data import MNIST_FILES, DataError, find_idx_file, resolve_data_dir

    try:
        folder = resolve_data_dir(data_dir)
        for stems in MNIST_FILES.values():
            for stem in stems:
                find_idx_file(folder, stem)
    except DataError as error:
        return str(error)
    return None


def missing_things(device: str, data_dir: str | None) -> dict:
    """{thing: one line} for each thing a stage needs that is not here (the stages that need it skip)."""
    missing = {}
    if (problem := asv_problem()) is not None:
        missing["asv"] = problem
    if (problem := mnist_problem(data_dir)) is not None:
        missing["mnist"] = f"{problem}: the accuracy stage cannot run"
    absent = [name for name in ("pandas", "matplotlib") if importlib.util.find_spec(name) is None]
    if absent:
        missing["report"] = f"{' and '.join(absent)} not installed: the report stage is skipped"
    if device == "cuda":
        from harness.measure.memory import nvml_status

        if (problem := nvml_status()) is not None:
            missing["nvml"] = f"NVML cannot be used ({problem}): the GPU memory figures are skipped"
    return missing


def gpu_problem() -> str | None:
    """None where a CUDA implementation can run here, else why not, in one line."""
    reasons = [f"{info.name}: {info.availability().reason}" for info in registry.entries() if info.device == "cuda"]
    if not registry.available("cuda"):
        return "no usable GPU: " + ("; ".join(reasons[:2]) if reasons else "no CUDA implementation is registered")
    return None


# The stages --------------------------------------------------------------------------------------------------


def stage_facts(plan: Plan, runner: Runner) -> str:
    from harness.measure.machine import machine_facts
    from harness.registry import list_implementations
    from harness.threads import thread_facts

    write_json_atomic(plan.out / "facts.json", {**machine_facts(), "threads": thread_facts(),
                                                "missing": plan.missing, "left_out": plan.left_out,
                                                "budget_s": plan.budget_s})
    write_text_atomic(plan.out / "list.txt", list_implementations() + "\n")
    return f"{len(plan.implementations)} implementation(s)"


def parity_configs(plan: Plan) -> list[str]:
    return ["small"] if plan.smoke else ["small", "paper"]


def check_estimate(plan: Plan, name: str) -> float:
    return sum(plan.costs.check_s[config] + compile_cost(plan.costs, name, plan.costs.compile_s)
               for config in parity_configs(plan))


def parity_estimate(plan: Plan) -> float:
    each = [check_estimate(plan, name) for name in plan.implementations]
    return max(sum(each) / plan.costs.parallel, max(each, default=0.0))


def stage_parity(plan: Plan, runner: Runner) -> str:
    """Each implementation in its own processes, a few at once; parity.json says, per implementation and
    network, passed or the line that says why not."""
    threads = str(max(1, (os.cpu_count() or 1) // plan.costs.parallel))
    env = {THREADS_ENV: threads, "OMP_NUM_THREADS": threads}
    results: dict[str, dict] = {}

    def check(name: str) -> None:
        results[name] = {}
        for config in parity_configs(plan):
            log = plan.logs / f"parity-{name}-{config}.log"
            try:
                status = runner.run(module("harness.check", "--impl", name, "--config", config, "--dtype", "float32"),
                                    env, check=False, log=log)
                results[name][config] = "passed" if status == 0 else f"failed: {tail(log)}"
            except StageFailed as error:
                results[name][config] = f"failed: {error}"

    with ThreadPoolExecutor(plan.costs.parallel) as pool:
        list(pool.map(check, plan.implementations))
    ordered = {name: results[name] for name in plan.implementations}
    write_json_atomic(plan.out / "parity.json", ordered)
    failed = [name for name, outcome in ordered.items() if any(value != "passed" for value in outcome.values())]
    if failed:
        raise StageFailed(f"{len(failed)} of {len(ordered)} disagree or failed: {', '.join(failed)} (parity.json)")
    return f"all {len(ordered)} agree"


def passed_parity(plan: Plan) -> list[str]:
    """The implementations that passed every parity check of this run (all of them before parity ran)."""
    path = plan.out / "parity.json"
    if not path.exists():
        return plan.implementations
    recorded = json.loads(path.read_text(encoding="utf-8"))
    return [name for name in plan.implementations
            if name in recorded and all(value == "passed" for value in recorded[name].values())]


def stage_gpu_tests(plan: Plan, runner: Runner) -> str:
    selection = ["-k", GPU_TESTS_SELECTION, *GPU_TESTS] if plan.device == "cuda" else list(CPU_TESTS)
    runner.run(module("pytest", "-q", "-p", "no:cacheprovider", *selection))
    lines = [line for line in runner.log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else ""


def asv_config(plan: Plan) -> Path:
    """A copy of asv.conf.json whose results go to OUT_DIR/asv (the repository's own stay untouched)."""
    lines = (REPO_ROOT / "asv.conf.json").read_text(encoding="utf-8").splitlines()
    conf = json.loads("\n".join(line for line in lines if not line.strip().startswith("//")))
    conf.update(repo=str(REPO_ROOT), benchmark_dir=str(REPO_ROOT / "benchmarks"), results_dir=str(plan.out / "asv"),
                env_dir=str(plan.out / "asv-env"), html_dir=str(plan.out / "asv-html"))
    path = plan.out / "asv.conf.json"
    write_text_atomic(path, json.dumps(conf, indent=1))
    return path


def head_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise StageFailed("asv names results by commit, and this is not a git checkout: run from a clone of the "
                          "repository (with its .git)") from None


def suite_selection(names: list[str], memory: bool) -> list[str]:
    """asv ``--bench`` patterns for the lease's grid (asv matches ``name(param, ...)``): only these points
    start a process, not the whole registered grid (the profile gives the batch sizes)."""
    if not names:
        return []
    impls = "|".join(re.escape(name) for name in names)
    return [rf"^{re.escape(benchmark)}\('({impls})', " for benchmark in SUITE_TIMED + (SUITE_MEMORY if memory else ())]


def suite_estimate(plan: Plan, names: list[str], compiling: bool) -> float:
    """asv's discovery, the timed points, the memory grid (a fresh process per implementation) and the
    light processes that read it, plus (eager stage) the one-off benchmarks."""
    costs, batches = plan.costs, plan.batch_sizes(compiling)
    if not names:
        return 0.0
    points = len(names) * len(batches) * len(SUITE_TIMED)
    compiled = sum(compile_cost(costs, name, costs.asv_compile_s) for name in names) * len(batches) * len(SUITE_TIMED)
    memory = 0.0 if "nvml" in plan.missing else len(names) * (costs.memory_impl_s + len(batches) * len(SUITE_MEMORY)
                                                              * costs.asv_skip_s)
    once = 0.0 if compiling else len(SUITE_ONCE) * costs.asv_point_s
    return costs.asv_discovery_s + points * costs.asv_point_s + compiled + memory + once


def run_suite(plan: Plan, runner: Runner, names: list[str], compiling: bool) -> str:
    if not names:
        return "no implementation in this stage"
    config, commit = asv_config(plan), head_commit()
    env = {PROFILE_ENV: plan.profile(compiling), IMPLEMENTATIONS_ENV: ",".join(names),
           ASV_COMMIT_ENV: commit, ASV_CONFIG_ENV: str(config), ASV_MACHINE_ENV: plan.machine}
    asv = [sys.executable, "-m", "asv"]
    runner.run([*asv, "machine", "--yes", "--machine", plan.machine, "--config", str(config)], env)
    patterns = suite_selection(names, memory="nvml" not in plan.missing)
    patterns += [] if compiling else [rf"^{re.escape(benchmark)}\." for benchmark in SUITE_ONCE]
    selection = [argument for pattern in patterns for argument in ("--bench", pattern)]
    attributes = [argument for pair in ASV_ATTRIBUTES for argument in ("-a", pair)]
    status = runner.run([*asv, "run", "--config", str(config), "--python=same", "--set-commit-hash", commit,
                         "--machine", plan.machine, "--launch-method", "forkserver", *selection, *attributes,
                         "--show-stderr"], env, check=False)
    if status not in (0, 2):  # 2: some benchmark failed, the others' results are saved
        raise StageFailed(f"asv run exited {status}: {tail(runner.log)}")
    if status == 2:
        raise StageFailed(f"asv run: some benchmarks failed, the rest are saved; {tail(runner.log)}")
    return f"{len(names)} implementation(s)"


def stage_profile(plan: Plan, runner: Runner) -> str:
    names = passed_parity(plan)
    if not names:
        raise StageFailed("no implementation passed parity: nothing to profile")
    sizes = ["--config", "small", "--batch-size", "8", "--steps", "2", "--gemm-size", "256"] if plan.smoke else \
        ["--batch-size", "128", "--steps", "5"]
    runner.run(module("harness.profile", "--impl", *names, *sizes, "--out", str(plan.out / "profile")))
    return f"{len(names)} implementation(s)"


def stage_report(plan: Plan, runner: Runner) -> str:
    runner.run(module("harness.report", "--results", str(plan.out), "--out", str(plan.out / "report")))
    return "report/report.md"


def archive(plan: Plan) -> Path:
    """``OUT_DIR`` as one .tar.gz (without the asv environment, compile caches and training checkpoints);
    without the framework traces if the whole would pass the 16 MiB a results transfer allows; StageFailed
    if even that is."""
    path = plan.archive_path

    def pack(skip_traces: bool) -> int:
        temporary = path.with_name(f".{path.name}.tmp")
        with tarfile.open(temporary, "w:gz") as tar:
            for item in sorted(plan.out.rglob("*")):
                relative = item.relative_to(plan.out)
                if not item.is_file() or relative.parts[0] in ("asv-env", "asv-html", "compile-cache", "first-run"):
                    continue
                if item.name.endswith(".checkpoint.npz"):  # the paper network's is ~100 MB: it stays here
                    continue
                if skip_traces and "traces" in relative.parts:
                    continue
                tar.add(item, arcname=str(Path(plan.out.name) / relative))
        os.replace(temporary, path)
        return path.stat().st_size

    path.parent.mkdir(parents=True, exist_ok=True)
    if pack(skip_traces=False) > ARCHIVE_LIMIT_BYTES and pack(skip_traces=True) > ARCHIVE_LIMIT_BYTES:
        raise StageFailed(f"{path} is {path.stat().st_size / 2**20:.1f} MiB even without traces, over 16 MiB")
    return path


def benchmark_stages(plan: Plan) -> list[Stage]:
    """The first command's stages, in order of value, with their estimates and what blocks them."""
    costs = plan.costs
    no_asv = plan.missing.get("asv")
    return [
        Stage("facts", costs.facts_s, stage_facts),
        Stage("parity", parity_estimate(plan), stage_parity),
        Stage("gpu-tests", costs.tests_s, stage_gpu_tests),
        Stage("suite", suite_estimate(plan, plan.eager, compiling=False),
              lambda plan, runner: run_suite(plan, runner, [n for n in plan.eager if n in passed_parity(plan)], False),
              no_asv),
        Stage("suite-compiled", suite_estimate(plan, plan.compiling, compiling=True),
              lambda plan, runner: run_suite(plan, runner, [n for n in plan.compiling if n in passed_parity(plan)],
                                             True), no_asv if plan.compiling else "no compiling implementation"),
        Stage("profile", costs.facts_s + sum(costs.profile_impl_s + compile_cost(costs, name, costs.asv_compile_s / 3)
                                             for name in plan.implementations), stage_profile),
        Stage("report", costs.report_s, stage_report, plan.missing.get("report")),
    ]


# The accuracy stage ------------------------------------------------------------------------------------------


def fastest_passing(first_run: Path) -> tuple[str, str]:
    """(implementation, why it was chosen): the fastest training step at batch 128 of those that passed
    parity in the first command's run (from its profile, else its list order)."""
    parity = json.loads((first_run / "parity.json").read_text(encoding="utf-8"))
    passed = [name for name, outcome in parity.items() if all(value == "passed" for value in outcome.values())]
    if not passed:
        raise StageFailed(f"no implementation passed parity in {first_run}: nothing to train")
    profile = first_run / "profile" / PROFILE_CSV
    if profile.exists():
        import csv

        times: dict[str, float] = {}
        with open(profile, encoding="utf-8") as stream:
            for row in csv.DictReader(stream):  # a step's time: its layers' times summed over the phases
                if row["implementation"] in passed:
                    times[row["implementation"]] = times.get(row["implementation"], 0.0) + float(row["time_s"])
        if times:
            name = min(times, key=times.get)
            return name, (f"fastest step in the first run's profile ({times[name] * 1e3:.2f} ms) of {len(passed)} "
                          "that passed parity")
    return passed[0], f"first of {len(passed)} that passed parity (no profile to rank them)"


def accuracy_stages(plan: Plan, first_run: Path | None, max_epochs: int = ACCURACY_EPOCHS) -> list[Stage]:
    """The second command's stages: facts, as many paper-recipe epochs as fit (at most ``max_epochs``),
    resuming a results file already in OUT_DIR, the report; without a first run, the first ``--impl``."""
    costs = plan.costs
    blocked = plan.missing.get("mnist")

    def train(plan: Plan, runner: Runner) -> str:
        if first_run is not None:
            name, why = fastest_passing(first_run)
        else:
            name, why = plan.implementations[0], "named with --impl"
        results = plan.out / ACCURACY_RESULTS
        results.parent.mkdir(parents=True, exist_ok=True)
        data = ["--data-dir", plan.data_dir] if plan.data_dir else []
        sizes = ["--config", "small", "--limit", "256", "--test-limit", "200"] if plan.smoke else []
        if not results.exists():
            runner.run(module("harness.train", "--impl", name, *data, "--schedule", "paper", "--batch-size", "128",
                              "--epochs", "1", *sizes, "--out", str(results)))
        record = json.loads(results.read_text(encoding="utf-8"))
        done = len(record["epochs"])
        epoch_s = max(entry["wall_seconds"] for entry in record["epochs"]) if record["epochs"] else costs.epoch_s
        room = runner.deadline - time.monotonic() - costs.report_s - costs.archive_s
        target = min(max_epochs, done + max(0, int(room // (epoch_s * 1.1))))
        if target > done:
            try:
                runner.run(module("harness.train", "--resume", str(results), *data, "--epochs", str(target)))
            except StageTimedOut:
                pass  # every completed epoch is in the results file: the next command resumes from it
        record = json.loads(results.read_text(encoding="utf-8"))
        accuracies = [entry["test_accuracy"] for entry in record["epochs"]]
        return (f"{record.get('implementation', name)} ({why}): {len(accuracies)} epoch(s), best test accuracy "
                f"{max(accuracies):.2%}")

    epochs_estimate = plan.budget_s - costs.report_s - costs.archive_s - costs.facts_s
    return [Stage("facts", costs.facts_s, stage_facts),
            Stage("accuracy", min(epochs_estimate, costs.facts_s + costs.epoch_s * max_epochs), train, blocked),
            Stage("report", costs.report_s, stage_report, plan.missing.get("report"))]


# Running the stages ------------------------------------------------------------------------------------------


def record_steps(plan: Plan, steps: dict) -> None:
    """steps.json in OUT_DIR, and its copy beside the archive (what comes back even if the run is killed)."""
    payload = {"budget_s": plan.budget_s, "missing": plan.missing, "left_out": plan.left_out, "stages": steps}
    write_json_atomic(plan.out / "steps.json", payload)
    if plan.archive_path is not None:
        write_json_atomic(plan.archive_path.with_name(plan.archive_path.name.split(".")[0] + ".steps.json"), payload)


def run_stages(plan: Plan, stages: list[Stage], stream=sys.stdout) -> int:
    """Every stage in order, two lines each (its estimate and budget left; its outcome); the archive after
    each; 0 when none failed, else 1."""
    final = plan.costs.archive_s + next((stage.estimate_s for stage in stages if stage.name == "report"), 0.0)
    steps: dict[str, dict] = {}
    total = len(stages) + 1
    for number, stage in enumerate(stages, start=1):
        left = plan.left_s()
        reserve = 0.0 if stage.name == "report" else final
        print(f"stage {number}/{total} {stage.name}: estimate {stage.estimate_s:.0f} s, budget left {left:.0f} s",
              file=stream, flush=True)
        if stage.blocked or stage.estimate_s + reserve > left:
            reason = stage.blocked or (f"does not fit: needs about {stage.estimate_s:.0f} s (+{reserve:.0f} s for "
                                       f"the report and archive), {left:.0f} s left")
            steps[stage.name] = {"status": "skipped", "reason": reason, "estimate_s": stage.estimate_s}
            print(f"stage {number}/{total} {stage.name}: skipped: {reason}", file=stream, flush=True)
        else:
            cap = min(max(stage.estimate_s * CAP_FACTOR, CAP_MINIMUM_S), left - reserve)
            steps[stage.name] = {"status": "running", "estimate_s": stage.estimate_s, "cap_s": cap}
            record_steps(plan, steps)
            start = time.monotonic()
            try:
                note = stage.action(plan, Runner(plan, stage.name, start + cap))
                outcome = {"status": "ok", "note": str(note or "")}
            except StageFailed as error:
                outcome = {"status": "timed out" if isinstance(error, StageTimedOut) else "failed",
                           "reason": str(error)}
            except Exception as error:  # a stage's own bug must not lose the others
                outcome = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
            outcome.update(seconds=round(time.monotonic() - start, 1), estimate_s=stage.estimate_s, cap_s=cap)
            steps[stage.name] = outcome
            said = outcome.get("note") or outcome.get("reason", "")
            print(f"stage {number}/{total} {stage.name}: {outcome['status']} in {outcome['seconds']:.1f} s"
                  f"{': ' + said if said else ''}", file=stream, flush=True)
        pack(plan, steps, stream)
    print(f"stage {total}/{total} archive: {plan.archive_path} ({plan.archive_path.stat().st_size / 2**20:.2f} MiB); "
          f"{time.monotonic() - plan.started:.0f} s of {plan.budget_s:.0f}", file=stream, flush=True)
    return 1 if any(step["status"] in ("failed", "timed out") for step in steps.values()) else 0


def pack(plan: Plan, steps: dict, stream) -> None:
    """steps.json and the archive, as they stand now."""
    record_steps(plan, steps)
    try:
        archive(plan)
    except (StageFailed, OSError) as error:
        steps["archive"] = {"status": "failed", "reason": str(error)}
        record_steps(plan, steps)
        print(f"archive: failed: {error}", file=stream, flush=True)


# The command -------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.gpu_benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, metavar="OUT_DIR", help="folder for everything the run writes")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help="the whole run's time; stages that cannot fit are skipped (default: "
                             f"{DEFAULT_BUDGET_S:.0f}, one 10-minute device command with a margin)")
    parser.add_argument("--stage", choices=("benchmark", "accuracy"), default="benchmark",
                        help="benchmark: facts, parity, tests, suite, profile, report (default); accuracy: the "
                             "paper's recipe on the fastest implementation that passed parity (--from)")
    parser.add_argument("--from", dest="first_run", type=Path, metavar="DIR_OR_ARCHIVE",
                        help="--stage accuracy: the first command's OUT_DIR or archive (default: OUT_DIR itself)")
    parser.add_argument("--max-epochs", type=int, default=ACCURACY_EPOCHS,
                        help=f"--stage accuracy: epochs in all, at most (default: {ACCURACY_EPOCHS})")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the stages and their estimates for every implementation registered on the "
                             "device (available here or not), run nothing (default: off)")
    parser.add_argument("--archive", type=Path, help="the archive (default: OUT_DIR.tar.gz, beside OUT_DIR)")
    options.add_device(parser, default="cuda",
                       help="cuda (default); cpu runs the same stages on the CPU implementations, to test it")
    parser.add_argument("--smoke", action="store_true",
                        help="small network, the smoke asv profile, a few hundred images (tests; default: off)")
    options.add_impl(parser, several=True, help="only these implementations",
                     default_help="every one on the device that can run here")
    options.add_data_dir(parser, help="MNIST folder")
    parser.add_argument("--machine", help="asv machine name (default: gpu-<GPU name>, or the host name on a CPU)")
    return parser


def machine_name(device: str) -> str:
    from harness.measure.machine import machine_facts

    facts = machine_facts()
    gpu = facts.get("gpu") or {}
    name = f"gpu-{gpu['name']}" if device == "cuda" and gpu.get("available") else facts["hostname"]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()


def unpacked(first_run: Path, out: Path) -> Path:
    """The first run's folder: itself, or its archive unpacked into OUT_DIR/first-run."""
    if first_run.is_dir():
        return first_run
    target = out / "first-run"
    with tarfile.open(first_run) as tar:
        tar.extractall(target, filter="data")
    folders = [path for path in target.iterdir() if path.is_dir()]
    return folders[0] if len(folders) == 1 else target


def plan_estimate(plan: Plan) -> float:
    """The first command's estimated seconds: its stages and the archive."""
    return sum(stage.estimate_s for stage in benchmark_stages(plan)) + plan.costs.archive_s


def fit_to_budget(device: str, names: list[str], smoke: bool, budget: float) -> tuple[list[str], list[str]]:
    """The default selection, less the looped variants of the compiling implementations (the costliest to
    compile, their vectorised twins and the eager looped ones measured all the same), the most expensive
    first, until the first command's estimate fits the budget: (kept, left out).  A selection given with
    --impl is never trimmed; its stages that cannot fit are skipped with the reason."""
    kept, left_out = list(names), []

    def estimate(selection: list[str]) -> float:
        return plan_estimate(Plan(Path("OUT_DIR"), device, selection, smoke, None, "fit", budget))

    droppable = [info.name for info in map(registry.get, names)
                 if info.cls.first_call_compiles and info.routing_variant == "looped"]
    while droppable and estimate(kept) > budget:
        # the largest saving is the smallest estimate left without it
        costliest = min(droppable, key=lambda name: estimate([n for n in kept if n != name]))
        droppable.remove(costliest)
        kept.remove(costliest)
        left_out.append(costliest)
    return kept, left_out


def left_out_line(left_out: list[str], budget: float) -> str:
    return (f"left out to fit the {budget:.0f} s budget: {', '.join(left_out)} (measure them on a later lease: "
            f"--impl {' '.join(left_out)})")


def dry_run(device: str, names: list[str] | None, smoke: bool, budget: float) -> str:
    """The first command's stages with their estimates, one line each, and their sum against the budget."""
    left_out: list[str] = []
    if not names:
        names, left_out = fit_to_budget(device, [info.name for info in registry.entries() if info.device == device],
                                        smoke, budget)
    plan = Plan(Path("OUT_DIR"), device, names, smoke, None, "dry-run", budget)
    lines = [f"{len(names)} implementation(s) on {device}: {len(plan.eager)} eager, {len(plan.compiling)} compiling"]
    lines += [left_out_line(left_out, budget)] if left_out else []
    lines += [f"  {stage.name:<15} {stage.estimate_s:6.1f} s" for stage in benchmark_stages(plan)]
    lines += [f"  {'archive':<15} {plan.costs.archive_s:6.1f} s",
              f"  {'total':<15} {plan_estimate(plan):6.1f} s of a {budget:.0f} s budget"]
    return "\n".join(lines)


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.budget <= 0:
        raise UserError(f"--budget {args.budget:g}: give the seconds the run may take, e.g. --budget 540")
    if args.dry_run:
        print(dry_run(args.device, args.impl, args.smoke, args.budget))
        return 0
    if args.device == "cuda" and (problem := gpu_problem()):
        raise UserError(f"{problem}; nothing was run")
    implementations = registry.available(args.device)
    unknown = sorted(set(args.impl or []) - set(implementations))
    if unknown:
        raise UserError(f"{', '.join(unknown)}: not an implementation on {args.device} that can run here (those: "
                        f"{', '.join(implementations) or 'none'})")
    left_out: list[str] = []
    if not args.impl and args.stage != "accuracy":
        implementations, left_out = fit_to_budget(args.device, implementations, args.smoke, args.budget)
    implementations = args.impl or implementations
    if not implementations:
        raise UserError(f"no implementation on {args.device} can run here")
    out = args.out.resolve()
    data_dir = args.data_dir or os.environ.get(DATA_DIR_ENV)
    plan = Plan(out, args.device, implementations, args.smoke, data_dir, args.machine or machine_name(args.device),
                args.budget, (args.archive or out.with_name(out.name + ".tar.gz")).resolve(),
                missing_things(args.device, data_dir), left_out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"capsbench {args.stage} on {args.device}: {len(implementations)} implementation(s) "
          f"({', '.join(implementations)}); machine {plan.machine}; budget {plan.budget_s:.0f} s; output {out}",
          flush=True)
    for line in plan.missing.values():
        print(f"missing: {line}", flush=True)
    if left_out:
        print(left_out_line(left_out, plan.budget_s), flush=True)
    if args.stage == "accuracy":
        first = args.first_run or (out if (out / "parity.json").exists() else None)
        if first is not None and not first.exists():
            raise UserError(f"--from {first}: no such folder or archive (give the first command's OUT_DIR or "
                            "archive)")
        stages = accuracy_stages(plan, unpacked(first, out) if first is not None else None, args.max_epochs)
    else:
        stages = benchmark_stages(plan)
    return run_stages(plan, stages)


if __name__ == "__main__":
    sys.exit(main())
