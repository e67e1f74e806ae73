"""python -m harness.distributed train: data-parallel CapsNet training on torch.distributed, one process per rank
under torchrun::

    torchrun --standalone --nproc-per-node 2 -m harness.distributed train --impl torch-vectorised \\
        --data-dir DIR --epochs 1 --batch-size 64      # per-rank batch: the global batch is 2 x 64

The training run, its options and its errors are :mod:`harness.training.ddp`'s.
"""

from __future__ import annotations

import sys

from harness import cli
from harness.training.ddp import TORCHRUN_EXAMPLE, parser, train_main


@cli.command
@cli.command
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):  # the options of the one command, train
        parser().print_help()
        return 0
    if argv[:1] != ["train"]:
        print("usage: python -m harness.distributed train ...  (under torchrun: "
              f"{TORCHRUN_EXAMPLE}; the scaling measurement is python -m harness.scaling)", file=sys.stderr)
        return 2
    return train_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
