"""The front door: `capsbench COMMAND` is each `python -m harness.COMMAND`, with --version, a description per
command, and every option's help showing its default."""

from __future__ import annotations

import argparse
import importlib

import pytest

from harness import __version__
from harness.__main__ import COMMANDS

from conftest import run_module

MODULE_PARSERS = {name: module for name, (module, _) in COMMANDS.items() if name != "list"}


def test_version_and_the_list_of_commands():
    version = run_module("harness", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"capsbench {__version__}"
    helped = run_module("harness", "--help")
    assert helped.returncode == 0
    for name, (_, summary) in COMMANDS.items():
        assert name in helped.stdout and summary[:40] in " ".join(helped.stdout.split())


def test_an_unknown_command_names_the_known_ones():
    result = run_module("harness", "benchmark")
    assert result.returncode == 2 and "invalid choice: 'benchmark'" in result.stderr and "check" in result.stderr


@pytest.mark.parametrize("name", sorted(MODULE_PARSERS))
def test_every_option_says_its_default(name):
    parser = importlib.import_module(MODULE_PARSERS[name]).parser()
    assert parser.description
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        assert action.help and "default" in action.help, f"{name} {action.option_strings[0]}: {action.help!r}"


@pytest.mark.parametrize("name", ["check", "train", "profile", "report", "keep", "scaling", "gpu-benchmark"])
def test_the_front_door_runs_the_module(name):
    door, module = run_module("harness", name, "--help"), run_module(MODULE_PARSERS[name], "--help")
    assert door.returncode == module.returncode == 0
    assert door.stdout == module.stdout


def test_the_list_command_is_the_same_through_both_doors():
    assert run_module("harness", "list").stdout == run_module("harness.__main__", "list").stdout


def test_check_and_train_say_their_default_network():
    from harness import check, train

    assert "(default: small)" in check.parser().format_help()
    assert "(default: paper)" in " ".join(train.parser().format_help().split())
