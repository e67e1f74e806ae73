"""capsbench (or python -m harness): the front door to every command of the harness.

``capsbench COMMAND [options]`` is the same as ``python -m harness.COMMAND [options]`` (those stay); ``list``
shows every registered implementation, what it is and whether it can run here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from harness import __version__, cli, registry

# command -> (module whose main() runs it, one line on what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("harness.__main__", "List every registered implementation, what it is, and whether it can run here."),
    "check": ("harness.check", "Check every implementation against the float64 reference, number by number."),
    "train": ("harness.train", "Train one implementation on MNIST and record loss, accuracy and images/s per "
                               "epoch."),
    "profile": ("harness.profile", "Profile where the time and memory of a training step go, layer by layer."),
    "figures": ("harness.figures", "Draw reconstructions, the paper's capsule-dimension perturbations and "
                                   "per-class errors from a training checkpoint."),
    "report": ("harness.report", "Make tables and plots from benchmark, training, profile and scaling results."),
    "distributed": ("harness.distributed", "Train data-parallel (DDP), one process per rank under torchrun."),
    "scaling": ("harness.scaling", "Measure how data-parallel training scales with the ranks on this machine."),
    "gpu-benchmark": ("harness.gpu_benchmark", "Measure everything capsbench measures on a GPU machine, in one "
                                               "command."),
    "readme": ("harness.readme", "Rewrite the measured tables of README and docs/ from results/ (--check compares)."),
    "keep": ("harness.keep", "Copy runs from runs/ into results/, the folder this repository ships."),
}


def list_main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="capsbench list", description=COMMANDS["list"][1]).parse_args(argv)
    print(registry.list_implementations())
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsbench", description="capsbench: a benchmarking and profiling harness for Capsule Networks.",
        epilog="`capsbench COMMAND --help` shows a command's options (each is also `python -m harness.COMMAND`).")
    parser.add_argument("--version", action="version", version=f"capsbench {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


@cli.command
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser().parse_args(argv)  # --help, --version, or the error naming the commands
        return 2
    name, rest = argv[0], argv[1:]
    if name == "list":
        return list_main(rest)
    module = importlib.import_module(COMMANDS[name][0])
    with cli.through_front_door():  # usage lines say `capsbench NAME`, as the user typed
        return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
