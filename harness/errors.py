"""The one exception for a mistake a user can fix, and the exit statuses of the commands.

Any module may raise :class:`UserError` (or a subclass) for an option, a path or a file the user can change;
the wrapper every command's ``main`` uses (:func:`harness.cli.command`) prints it once, as one line
``error: MESSAGE`` on stderr, and returns its :attr:`UserError.status`.  docs/development.md has the table of
exit statuses.
"""

from __future__ import annotations

EXIT_FAILURE = 1  # the work ran and failed (a check out of tolerance, a crashed run, nothing readable to report)
EXIT_USAGE = 2  # a mistake found before the work (as argparse's own): an option, a name, a path; nothing was run


class UserError(Exception):
    """A mistake the user can fix, said in one line that names it and the fix.

    ``message`` is that line, without the ``error: `` the wrapper puts before it; ``status`` is the exit status
    of the command it ends (:data:`EXIT_FAILURE` for a mistake found only once the work ran), where not given the
    class's :attr:`status` (:data:`EXIT_USAGE`; a subclass may set its own)."""

    status: int = EXIT_USAGE

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
