"""What the commands' command lines share: the program name their usage line shows and their description.

A command run through the front door (``capsbench check``) shows ``usage: capsbench check ...``, the same
command run as a module (``python -m harness.check``) shows that: the usage line is what the user typed.
A command's description is the first paragraph of its module's docstring, whole (never cut mid-sentence).
Every command's ``main`` is wrapped in :func:`command`, the one place a :class:`~harness.errors.UserError`
becomes its ``error: ...`` line and exit status.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from collections.abc import Callable, Iterator

from harness.errors import UserError

_front_door = [False]  # True while harness.__main__ runs a command


@contextlib.contextmanager
def through_front_door() -> Iterator[None]:
    """While it lasts, :func:`prog` names commands as ``capsbench COMMAND``."""
    _front_door[0], before = True, _front_door[0]
    try:
        yield
    finally:
        _front_door[0] = before


def prog(command: str, suffix: str = "") -> str:
    """The program name of ``command`` (as ``capsbench`` spells it: ``gpu-benchmark``) for its usage line."""
    name = f"capsbench {command}" if _front_door[0] else f"python -m harness.{command.replace('-', '_')}"
    return f"{name} {suffix}".rstrip()


def description(doc: str | None) -> str:
    """The first paragraph of a module docstring as one sentence for --help: without its leading
    ``python -m harness.X:``, its reStructuredText markup, and starting with a capital."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    paragraph = re.sub(r"^python -m harness\.\w+(?: \([^)]*\))?: ", "", paragraph)
    paragraph = re.sub(r":\w+:`~?([^`]*)`", r"\1", paragraph).replace("``", "")
    return paragraph[:1].upper() + paragraph[1:]


def command(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """``main`` (a command's, taking its argv and returning its exit status) that prints a
    :class:`~harness.errors.UserError` raised anywhere below it as one line, ``error: MESSAGE`` on stderr,
    and returns the error's status instead of a traceback."""

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return error.status

    return wrapped
