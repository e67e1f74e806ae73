"""python -m harness.keep: copy runs from ``runs/`` (every command's default, git-ignored) into ``results/``,
the results this repository ships and README and docs/ cite.

Nothing is ever deleted or overwritten with less: asv run files, machine descriptions and facts, training
results, scaling results and profiles are copied file by file (atomically); ``benchmarks.json`` becomes the
union of the kept one and the newer one (the newer description of a benchmark wins, and a benchmark only
older runs measured keeps its description, so their results keep their parameter names).  Framework traces
and checkpoints stay behind (large, and not what README and docs/ cite).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from harness import cli
from harness.errors import EXIT_FAILURE, UserError
from harness.results import (
    ResultsFileError,
    atomic_output,
    read_json,
    unwritable_line,
    writable_folder,
    write_json_atomic,
)
from harness.settings import (
    ASV_RESULTS_SUBDIR,
    FACTS_SUBDIR,
    PROFILE_SUBDIR,
    RESULTS_DIR,
    RUNS_DIR,
    SCALING_SUBDIR,
    TRAINING_SUBDIR,
)

KINDS = {"asv": (ASV_RESULTS_SUBDIR, FACTS_SUBDIR), "training": (TRAINING_SUBDIR,),
         "scaling": (SCALING_SUBDIR,), "profile": (PROFILE_SUBDIR,)}
KEPT_SUFFIXES = {".json", ".csv", ".md"}


def copy_file(source: Path, target: Path) -> None:
    with atomic_output(target) as temporary:
        shutil.copyfile(source, temporary)


def merged_benchmarks(new: Path, old: Path) -> dict:
    """The kept benchmarks.json updated by the newer one; the newer alone where the kept one is unreadable."""
    try:
        kept = read_json(old)
    except ResultsFileError as error:
        print(f"warning: {error}; replaced by {new}", file=sys.stderr)
        kept = {}
    return {**kept, **read_json(new)}


def keep(source: Path, target: Path, kinds: list[str], machine: str | None = None) -> list[Path]:
    """Copy the chosen kinds of results from ``source`` into ``target``; the files written."""
    written = []
    for kind in kinds:
        for folder in KINDS[kind]:
            base = source / folder
            if not base.is_dir():
                continue
            for path in sorted(base.rglob("*")):
                relative = path.relative_to(base)
                if not path.is_file() or path.suffix not in KEPT_SUFFIXES or path.name.startswith("."):
                    continue
                if machine and kind == "asv" and len(relative.parts) > 1 and relative.parts[0] != machine:
                    continue
                if path.name.endswith((".checkpoint.npz", ".trace.json")):
                    continue
                destination = target / folder / relative
                if relative.name == "benchmarks.json" and destination.exists():
                    write_json_atomic(destination, merged_benchmarks(path, destination))
                else:
                    copy_file(path, destination)
                written.append(destination)
    return written


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=cli.prog("keep"), description=cli.description(__doc__))
    parser.add_argument("--from", dest="source", type=Path, default=RUNS_DIR,
                        help="the folder the runs are in (default: %(default)s)")
    parser.add_argument("--to", dest="target", type=Path, default=RESULTS_DIR,
                        help="the folder to copy them into (default: %(default)s)")
    parser.add_argument("--what", nargs="+", choices=sorted(KINDS), default=sorted(KINDS),
                        help="which results to keep (default: all)")
    parser.add_argument("--machine", help="only this machine's asv results (default: every machine's)")
    return parser


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.source.is_dir():
        raise UserError(f"{args.source} does not exist: nothing to keep (commands write their runs there)",
                        EXIT_FAILURE)
    try:
        writable_folder(args.target)
    except OSError as error:
        raise UserError(unwritable_line(args.target, error, "the kept results", "--to")) from None
    written = keep(args.source, args.target, args.what, args.machine)
    print(f"kept {len(written)} file(s) in {args.target}")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
