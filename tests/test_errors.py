"""One error path for the commands: a mistake a user can fix is a :class:`harness.errors.UserError`, raised
anywhere, and printed once, as one line ``error: MESSAGE``, by the wrapper every command's ``main`` uses
(:func:`harness.cli.command`), which returns its exit status (the table is in docs/development.md)."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from harness import cli, contract, errors, registry
from harness.__main__ import COMMANDS

from conftest import REPO_ROOT

COMMAND_MODULES = sorted({module for module, _ in COMMANDS.values()})
WRAPPED = cli.command(lambda argv: 0).__code__

# "error: " lines a command still prints itself, each for a reason the wrapper cannot serve: a rank under torchrun
# says why it stops (its data, or a failure) before it shuts its process group down, which may wait on the other
# ranks (scaling's workers here; train's ranks in harness/training/ddp.py, which the command calls), and the
# profile goes on to the next implementation after one fails
OWN_ERROR_LINES = {"harness.scaling": 1, "harness.profile": 1}


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_every_command_main_is_wrapped(module):
    main = importlib.import_module(module).main
    assert main.__code__ is WRAPPED and inspect.unwrap(main) is not main, f"{module}.main is not @cli.command"


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_no_command_prints_its_own_error_line_and_status(module):
    path = REPO_ROOT / (module.replace(".", "/") + ".py")
    found = len(re.findall(r"""print\(\s*f?["']error: """, path.read_text(encoding="utf-8")))
    assert found == OWN_ERROR_LINES.get(module, 0), f"{path}: raise errors.UserError(message[, status]) instead"


def test_a_user_error_raised_below_main_is_one_line_with_its_status(capsys):
    def main(argv):
        raise errors.UserError(f"--flag {argv[0]}: not a number")

    assert cli.command(main)(["x"]) == errors.EXIT_USAGE == 2
    assert capsys.readouterr().err == "error: --flag x: not a number\n"

    def failing(argv):
        raise errors.UserError("nothing to keep", errors.EXIT_FAILURE)

    assert cli.command(failing)([]) == errors.EXIT_FAILURE == 1
    assert capsys.readouterr().err == "error: nothing to keep\n"


def test_any_other_exception_is_left_to_python():
    def broken(argv):
        raise ZeroDivisionError("a bug, with its traceback")

    with pytest.raises(ZeroDivisionError):
        cli.command(broken)([])


def test_the_library_errors_a_command_stops_at_are_user_errors_and_keep_their_own_class():
    from harness.data import DataError
    from harness.figures import CheckpointError
    from harness.profile import ProfileError
    from harness.readme import ReadmeError
    from harness.results import ResultsFileError
    from harness.training.ddp import LaunchError
    from harness.training.loop import TrainingOptionError

    for cls, base in [(registry.UnknownImplementationError, LookupError), (DataError, RuntimeError),
                      (contract.UnavailableImplementationError, RuntimeError), (ResultsFileError, ValueError),
                      (TrainingOptionError, ValueError), (CheckpointError, ValueError), (ProfileError, RuntimeError),
                      (LaunchError, RuntimeError), (ReadmeError, ValueError)]:
        assert issubclass(cls, errors.UserError) and issubclass(cls, base), cls
    assert ReadmeError("x").status == 1 and DataError("x").status == 2
    assert str(registry.UnknownImplementationError("unknown implementation 'x'")) == "unknown implementation 'x'"


def test_the_front_door_prints_a_command_error_once(capsys):
    from harness.__main__ import main

    assert main(["check", "--impl", "no-such-implementation"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and err.startswith("error: unknown implementation 'no-such-implementation'")
