"""The command-line options the commands share, and the validators of their values (as asv's
``common_args.py``): each shared option is declared here once, with one spelling, one metavar, one help
text and one default, so that ``--impl``, ``--config``, ``--dtype``, ``--threads``, ``--out`` ... mean the
same in ``check``, ``profile``, ``gpu-benchmark``, ``train``, ``distributed``, ``scaling`` and ``figures``.

A command that takes one implementation says ``several=False``, one that takes a list ``several=True``;
a command whose ``--config`` default is not :data:`DEFAULT_CONFIG` says why, and the reason is in its
``--help`` (and the command says it on its first output line, :func:`config_note`).

Every ``add_*`` function adds its option to ``parser`` (the command's ``argparse.ArgumentParser``) and returns
nothing; its keywords are the option's help text (``help``, without the default, which it appends), its
default, and ``required``; adding one option twice to a parser raises argparse's ``ArgumentError``.  The
validators are argparse types: each takes the option's text and returns its value, or raises
``argparse.ArgumentTypeError`` (or ValueError for text that is no number), which argparse turns into its usage
error (exit status 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import routing_algorithms
from harness.contract import DEVICES, DTYPES
from harness.settings import DATA_DIR_ENV
from harness.spec import CONFIGS, DEFAULT_ROUTING_ALGORITHM, ROUTING_GRADIENTS

DEFAULT_CONFIG = "paper"  # the network of the paper; a command that defaults to another says why
DEFAULT_DTYPE = "float32"


# Validators (argparse types) ----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: ``text`` as an integer of at least 1; ArgumentTypeError for a smaller one."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: ``text`` as an integer of at least 0; ArgumentTypeError for a negative one."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: ``text`` as a float greater than 0; ArgumentTypeError for one that is not (NaN
    included)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


# Shared options --------------------------------------------------------------------------------------------


def add_impl(parser, *, several: bool, help: str, default: str | None = None, default_help: str = "",
             required: bool = False) -> None:
    """``--impl NAME`` (one implementation) or ``--impl NAME [NAME ...]`` (``several``); ``help`` says what
    they are for, ``default`` is a name (or None), ``default_help`` what is chosen without the option where the
    default is not a name.  The names are not checked here: :func:`harness.registry.get` does that."""
    text = f"{help}; see `capsbench list`"
    if default is not None:
        text += " (default: %(default)s)"
    elif default_help:
        text += f" (default: {default_help})"
    parser.add_argument("--impl", nargs="+" if several else None, metavar="NAME", default=default,
                        required=required, help=text)


def add_config(parser, *, default: str | None = DEFAULT_CONFIG, why: str = "", help: str = "network size",
               required: bool = False) -> None:
    """``--config``: a network of :data:`harness.spec.CONFIGS`.  A default other than :data:`DEFAULT_CONFIG`
    needs ``why``, which --help shows (and :func:`config_note` for the first output line); ``default`` None
    with ``required``: the command has no default.  Raises ValueError for another default without ``why``."""
    if default not in (DEFAULT_CONFIG, None) and not why:
        raise ValueError(f"--config defaults to {default!r}, not {DEFAULT_CONFIG!r}: say why")
    note = config_note(default, why)
    text = help if required else f"{help} (default: %(default)s)" + (f", {note}" if note else "")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None if required else default,
                        required=required, help=text)


def config_note(default: str | None, why: str) -> str:
    """``"not paper: <why>"`` where a command's --config default is not :data:`DEFAULT_CONFIG`, else
    nothing: what --help and a command's first output line say beside the network's name."""
    return f"not {DEFAULT_CONFIG}: {why}" if default not in (DEFAULT_CONFIG, None) and why else ""


def add_dtype(parser, *, several: bool = False, help: str = "floating-point type of parameters and data",
              default: str | None = DEFAULT_DTYPE) -> None:
    """``--dtype``, one of :data:`harness.contract.DTYPES`, defaulting to ``default``; ``several``: repeatable,
    each given once, None where none is given (the command chooses)."""
    if several:
        parser.add_argument("--dtype", choices=DTYPES, action="append", help=help)
    else:
        parser.add_argument("--dtype", choices=DTYPES, default=default, help=f"{help} (default: %(default)s)")


def add_device(parser, *, help: str, default: str | None = None, allow_all: bool = False) -> None:
    """``--device``, one of :data:`harness.contract.DEVICES` (or ``all`` where ``allow_all``), defaulting to
    ``default``; ``help`` says the default itself."""
    parser.add_argument("--device", choices=[*DEVICES, "all"] if allow_all else DEVICES, default=default, help=help)


def add_threads(parser, *, help: str = "CPU threads for torch, BLAS and OpenMP", default_help: str =
                "the CPUs this process may use", required: bool = False) -> None:
    """``--threads N``, a positive integer, None where not given (``default_help`` says what is used then)."""
    text = help if required else f"{help} (default: {default_help})"
    parser.add_argument("--threads", type=positive_int, required=required, help=text)


def add_out(parser, *, help: str, default: Path | None = None, required: bool = False) -> None:
    """``--out PATH``: a results file or folder; ``help`` says which, and its default."""
    parser.add_argument("--out", type=Path, default=default, required=required, help=help)


def add_data_dir(parser, *, help: str = "folder with the four MNIST IDX files, .gz or not") -> None:
    """``--data-dir``: the MNIST folder, None where not given (:func:`harness.data.resolve_data_dir` then
    reads the environment variable :data:`DATA_DIR_ENV`)."""
    parser.add_argument("--data-dir", help=f"{help} (default: ${DATA_DIR_ENV})")


def add_seed(parser, *, help: str) -> None:
    """``--seed N`` (default 0); ``help`` says what it seeds."""
    parser.add_argument("--seed", type=int, default=0, help=f"{help} (default: %(default)s)")


def add_batch_size(parser, *, help: str, default: int | None, required: bool = False) -> None:
    """``--batch-size N``, a positive integer, defaulting to ``default``."""
    parser.add_argument("--batch-size", type=positive_int, default=default, required=required,
                        help=f"{help} (default: %(default)s)")


def add_steps(parser, *, help: str, default: int | None = None, required: bool = False) -> None:
    """``--steps N`` timed steps, a positive integer, defaulting to ``default`` (:func:`add_warmup` adds the
    untimed ones before them)."""
    parser.add_argument("--steps", type=positive_int, default=default, required=required,
                        help=help if required else f"{help} (default: %(default)s)")


def add_warmup(parser, *, help: str = "untimed steps first", default: int | None = None,
               required: bool = False) -> None:
    """``--warmup N`` untimed steps before the timed ones, a non-negative integer, defaulting to ``default``."""
    parser.add_argument("--warmup", type=non_negative_int, default=default, required=required,
                        help=help if required else f"{help} (default: %(default)s)")


def add_timeout(parser, *, help: str, default: float) -> None:
    """``--timeout-s SECONDS``, a positive number, defaulting to ``default``."""
    parser.add_argument("--timeout-s", type=positive_float, default=default, help=f"{help} (default: %(default)s)")


def routing_algorithm(text: str) -> str:
    """argparse type: ``text`` as a known routing algorithm's name (:func:`harness.routing_algorithms.names`,
    a plugin's included); ArgumentTypeError naming the known ones for another."""
    known = routing_algorithms.names()
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown routing algorithm {text!r}; known routing algorithms: "
                                         f"{', '.join(known)}")
    return text


def add_routing_algorithm(parser, *, consequence: str = "") -> None:
    """``--routing-algorithm NAME`` (:mod:`harness.routing_algorithms`: dynamic, self-attention, a plugin's;
    default dynamic); ``consequence`` says what the command does with an implementation that lacks it."""
    text = ("the routing algorithm (harness.spec): the paper's dynamic routing (dynamic), Efficient-CapsNet's "
            "self-attention routing (self-attention), or an installed plugin's")
    parser.add_argument("--routing-algorithm", type=routing_algorithm, default=DEFAULT_ROUTING_ALGORITHM,
                        metavar="NAME",
                        help=text + (f"; {consequence}" if consequence else "") + " (default: %(default)s)")


def add_routing_gradient(parser, *, consequence: str = "") -> None:
    """``--routing-gradient full|final`` (:data:`harness.spec.ROUTING_GRADIENTS`, default full);
    ``consequence`` says what the command does with an implementation that lacks the one asked for."""
    text = ("how the gradient flows through routing (harness.spec): every iteration, as the paper (full), or the "
            "last one's weighted sum alone, as XifengGuo's implementations (final)")
    parser.add_argument("--routing-gradient", choices=ROUTING_GRADIENTS, default="full",
                        help=text + (f"; {consequence}" if consequence else "") + " (default: %(default)s)")
