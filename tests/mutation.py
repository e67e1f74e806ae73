"""Mutation testing of the modules whose figures users read, with mutmut (a development tool, not CI).

    python tests/mutation.py flops             # mutate harness/measure/flops.py, run the tests that cover it
    python tests/mutation.py flops --keep DIR  # the same, keeping mutmut's folder (mutmut show NAME there)
    python tests/mutation.py tables-report     # a second run of one module: other tests, some functions
    python tests/mutation.py --list            # the runs: module, functions and tests

Each module is mutated alone in a scratch copy of the repository (tracked and untracked-but-not-ignored
files, as tests/planted_bugs.py copies them), with mutmut's configuration (a ``[mutmut]`` section of
``setup.cfg``) written there: the module to mutate and the tests of :data:`RUN_TESTS` that cover it, a
small subset so that one module takes minutes.  A run named ``MODULE-WHAT`` (:data:`FUNCTIONS`) mutates
only some functions of MODULE, those whose tests are too slow to run for every mutant of the module (the
tables the report alone reaches, through its slower tests).  Prints the score (killed / all mutants) and
every mutant that no test killed; ``mutmut show NAME`` in the kept folder prints its diff.  Needs ``pip
install -e .[dev]`` (mutmut 3 and a system with fork).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planted_bugs import scratch_copy  # noqa: E402

from harness.threads import THREAD_ENV_VARIABLES  # noqa: E402

RUN_TESTS = {
    # not tests/test_train.py: its mutants' forked children hang (a lock held by a thread at the fork) and
    # time out one by one; tests/test_gates.py pins what it pins without a training run
    "loop": ["tests/test_gates.py", "tests/test_data.py"],
    "check": ["tests/test_check.py"],
    "tables": ["tests/test_tables.py"],
    "flops": ["tests/test_flops.py"],
    "scaling": ["tests/test_distributed.py",
                "tests/test_report.py::test_distributed_scaling_results_give_a_table_and_a_plot",
                "tests/test_gates.py",
                "-k", "by_hand or median_paired or unreliable or share_of_the_batch or judged_by "
                      "or distributed_scaling_results or scaling_options_reach or scaling_command_launches "
                      "or world_size_that_fails or scaling_refuses or scaling_options_default"],
    "spec": ["tests/test_spec.py"],
    "ranking": ["tests/test_ranking.py"],
    "run_order": ["tests/test_run_order.py", "-k", "by_hand or git_is_asked"],  # not the report-drawing tests
    "tables-report": ["tests/test_report.py::test_every_derived_figure_of_the_summary_is_the_one_computed_by_hand",
                      "tests/test_report.py::test_gemm_peak_and_gpu_memory_give_peak_share_and_gpu_memory_plots",
                      "tests/test_report.py::test_distributed_scaling_results_give_a_table_and_a_plot",
                      "tests/test_report.py::test_an_unreliable_scaling_efficiency_is_said_so_in_the_report",
                      "tests/test_report.py::test_the_routing_gradient_saving_is_a_section_and_a_plot",
                      "tests/test_plots.py"],
}
FUNCTIONS = {"tables-report": ["memory_table", "distributed_table", "step_iterations"]}
# a run's name up to its first hyphen -> the module it mutates, its path under harness/ without ".py"
MODULES = {"loop": "training/loop", "check": "check", "tables": "reporting/tables", "flops": "measure/flops",
           "scaling": "measure/scaling", "spec": "spec",
           "ranking": "reporting/ranking", "run_order": "suite/run_order"}


def module_of(run: str) -> str:
    """The harness module a run mutates (its path under harness/ without ".py"): named by the run's name up to
    its first hyphen."""
    return MODULES[run.split("-")[0]]


def mutant_patterns(run: str) -> list[str]:
    """mutmut's names of the mutants a run tests (fnmatch patterns; none: every mutant of the module)."""
    return [f"harness.{module_of(run).replace('/', '.')}.x_{function}__mutmut_*" for function in FUNCTIONS.get(run, [])]


def mutmut_config(run: str) -> str:
    """The [mutmut] section: mutate the run's module only, select the run's tests."""
    selection = "\n".join(f"    {argument}" for argument in RUN_TESTS[run])
    return ("[mutmut]\nsource_paths=harness/\n"
            f"only_mutate=harness/{module_of(run)}.py\n"
            "also_copy=\n    implementations/\n    benchmarks/\n    results/\n"
            f"pytest_add_cli_args_test_selection=\n{selection}\n")


def run_module(run: str, root: Path, children: int) -> tuple[Counter, list[str]]:
    """(count of mutants by status, names of the survivors) of one run, mutmut run in ``root``."""
    (root / "setup.cfg").write_text(mutmut_config(run), encoding="utf-8")
    patterns = mutant_patterns(run)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # mutmut's copy comes first
    # mutmut forks a child per mutant from a process that has run the tests: a child of a process whose
    # OpenMP pool has threads can hang on its first parallel region, so the pools keep one thread
    env.update(dict.fromkeys(THREAD_ENV_VARIABLES, "1"))
    subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *patterns], cwd=root,
                   env=env, stdout=subprocess.DEVNULL, check=False)
    listed = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=root, env=env,
                            capture_output=True, text=True, check=True).stdout
    statuses = dict(line.strip().rsplit(": ", 1) for line in listed.splitlines() if ": " in line)
    if patterns:
        statuses = {name: status for name, status in statuses.items()
                    if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)}
    return Counter(statuses.values()), sorted(name for name, status in statuses.items() if status != "killed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/mutation.py", description=__doc__.split("\n")[0])
    parser.add_argument("module", nargs="?", choices=sorted(RUN_TESTS),
                        help="harness module to mutate, or MODULE-WHAT: some of its functions, other tests")
    parser.add_argument("--list", action="store_true", help="the runs: module, functions, tests (default: run)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it (default: a temporary "
                                                                 "folder, removed)")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default: 1)")
    args = parser.parse_args(argv)
    if args.list or not args.module:
        for run, tests in RUN_TESTS.items():
            functions = f" ({', '.join(FUNCTIONS[run])})" if run in FUNCTIONS else ""
            print(f"{run}: harness/{module_of(run)}.py{functions}  [{' '.join(tests)}]")
        return 0
    with tempfile.TemporaryDirectory(prefix="capsbench-mutation-") as folder:
        root = args.keep or Path(folder)
        root.mkdir(parents=True, exist_ok=True)
        counts, survivors = run_module(args.module, scratch_copy(root), args.max_children)
    total = sum(counts.values())
    print(f"{args.module} (harness/{module_of(args.module)}.py): {counts['killed']} of {total} mutants killed "
          f"({counts['killed'] / max(total, 1):.0%}); " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for name in survivors:
        print(f"    {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
