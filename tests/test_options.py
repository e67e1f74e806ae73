"""The shared command-line options (harness.options): every command declares --impl, --config, --dtype,
--threads, --out ... through it, so each option has one spelling, metavar, type and set of choices; a
--config default other than the paper's network says why, in --help and on the command's first line."""

from __future__ import annotations

import argparse
import importlib

import pytest

from harness import options
from harness.contract import DTYPES
from harness.spec import CONFIGS

COMMANDS = ("check", "profile", "gpu_benchmark", "train", "distributed", "scaling", "figures")


def actions(module: str) -> dict[str, argparse.Action]:
    parser = importlib.import_module(f"harness.{module}").parser()
    return {action.option_strings[0]: action for action in parser._actions if action.option_strings}


@pytest.mark.parametrize("module", COMMANDS)
def test_shared_options_are_the_same_everywhere(module):
    found = actions(module)
    assert "--impl" in found and found["--impl"].metavar == "NAME" and "capsbench list" in found["--impl"].help
    if "--dtype" in found:
        assert list(found["--dtype"].choices) == list(DTYPES)
    if "--config" in found:
        assert sorted(found["--config"].choices) == sorted(CONFIGS)
        default = found["--config"].default
        assert default in (options.DEFAULT_CONFIG, None) or f"not {options.DEFAULT_CONFIG}:" in found["--config"].help
    for name in ("--threads", "--batch-size", "--steps"):
        if name in found and found[name].type is not int:
            assert found[name].type is options.positive_int, f"{module} {name}"


def test_impl_takes_one_name_or_several_as_the_command_says():
    assert actions("profile")["--impl"].nargs == "+" and actions("check")["--impl"].nargs == "+"
    assert actions("train")["--impl"].nargs is None and actions("scaling")["--impl"].nargs is None


def test_a_config_default_other_than_the_paper_needs_a_reason():
    with pytest.raises(ValueError, match="say why"):
        options.add_config(argparse.ArgumentParser(), default="small")


def test_check_says_why_its_network_is_small_first(capsys):
    from harness import check

    check.main(["--impl", "torch-vectorised", "--dtype", "float64"])
    first = capsys.readouterr().out.splitlines()[0]
    assert "config small (the default, not paper:" in first


@pytest.mark.parametrize("text, value", [("1", 1), ("12", 12)])
def test_positive_int_accepts(text, value):
    assert options.positive_int(text) == value


@pytest.mark.parametrize("validator, text", [(options.positive_int, "0"), (options.non_negative_int, "-1"),
                                             (options.positive_float, "0")])
def test_validators_refuse_with_the_bound(validator, text):
    with pytest.raises(argparse.ArgumentTypeError, match="must be"):
        validator(text)
