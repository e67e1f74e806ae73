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
        assert not action.help.startswith("("), f"{name} {action.option_strings[0]} says only {action.help!r}"


@pytest.mark.parametrize("name", ["check", "train", "profile", "report", "keep", "scaling"])
def test_the_front_door_runs_the_module_and_its_usage_line_says_what_the_user_typed(name):
    door, module = run_module("harness", name, "--help"), run_module(MODULE_PARSERS[name], "--help")
    assert door.returncode == module.returncode == 0
    assert door.stdout.startswith(f"usage: capsbench {name} ")
    assert module.stdout.startswith(f"usage: python -m {MODULE_PARSERS[name]} ")
    typed_as_module = door.stdout.replace(f"capsbench {name}", f"python -m {MODULE_PARSERS[name]}")
    assert typed_as_module.split() == module.stdout.split()  # the same text, wrapped for the longer name


def test_the_gpu_benchmark_runs_through_the_front_door():
    door, module = run_module("harness", "gpu-benchmark", "--help"), run_module("harness.gpu_benchmark", "--help")
    assert door.returncode == module.returncode == 0 and door.stdout == module.stdout


# gpu-benchmark's description is left out: docs/development.md ("Known gaps") says why
WHOLE_SENTENCE_PARSERS = sorted(set(MODULE_PARSERS) - {"gpu-benchmark"})


def is_a_whole_sentence(text: str) -> bool:
    return bool(text) and text[0].isupper() and text.rstrip().endswith((".", ")")) and not text.endswith(",")


@pytest.mark.parametrize("name", WHOLE_SENTENCE_PARSERS)
def test_every_command_describes_itself_in_whole_sentences(name):
    description = importlib.import_module(MODULE_PARSERS[name]).parser().description
    assert is_a_whole_sentence(description) and description.endswith("."), description
    assert "``" not in description and ":mod:" not in description


def test_every_summary_of_the_front_door_is_a_whole_sentence():
    for name, (_, summary) in COMMANDS.items():
        assert summary[0].isupper() and summary.endswith("."), f"{name}: {summary!r}"


def test_distributed_help_shows_the_options_of_its_training():
    helped = run_module("harness", "distributed", "--help")
    assert helped.returncode == 0
    for option in ("--impl", "--epochs", "--batch-size", "--timeout-s", "--resume", "--overwrite"):
        assert option in helped.stdout


def test_the_list_command_is_the_same_through_both_doors():
    assert run_module("harness", "list").stdout == run_module("harness.__main__", "list").stdout


def test_check_and_train_say_their_default_network():
    from harness import check, train

    assert "(default: small)" in check.parser().format_help()
    assert "(default: paper)" in " ".join(train.parser().format_help().split())
